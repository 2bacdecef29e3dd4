"""Connection strings: validated before any I/O, and libpq keyword strings turned into URIs.

asyncpg understands only the URI form (``postgresql://user@host:port/db?param=value``), while
libpq, psql and most deployment tooling also accept keyword strings (``host=db port=5432
dbname=app``). Both are accepted here, so a DSN copied from a psql command line works; a
malformed one is a `ConfigurationError` that names the problem instead of a driver traceback
or a misleading "cannot reach the server".

A DSN usually holds a password, and errors end up in logs and tracebacks: no message here
quotes text from the DSN that could be part of one (a value, or the text where parsing
failed), and none chains an exception that does. They name the keyword or the part of the
URI instead, and say where the problem starts by character offset.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Final

from .._errors import ConfigurationError

_URI_SCHEMES: Final = ("postgresql://", "postgres://")

# libpq keywords that are parts of the URI itself; every other keyword becomes a query
# parameter, which asyncpg reads as a connection option or a server setting.
_HOST_KEYWORDS: Final = ("host", "port", "dbname", "user", "password")

# libpq connection options that asyncpg does not read, with what to do instead where there
# is something. asyncpg sends every query parameter it does not know to the server as a
# setting, and PostgreSQL refuses these at connect ("unrecognized configuration parameter"),
# so they are refused here, before any I/O.
_KEEPALIVES: Final = "the store sets TCP keepalives on the sessions that need them"
_LIBPQ_ONLY: Final[dict[str, str | None]] = {
    "connect_timeout": "the store's own connect_timeout option (10 s) bounds connecting",
    "keepalives": _KEEPALIVES,
    "keepalives_idle": _KEEPALIVES,
    "keepalives_interval": _KEEPALIVES,
    "keepalives_count": _KEEPALIVES,
    "hostaddr": "put the address in host",
    "requiressl": "use sslmode=require",
    "fallback_application_name": None,
    "channel_binding": None,
    "require_auth": None,
    "gssencmode": None,
    "gssdelegation": None,
    "sslcompression": None,
    "sslcertmode": None,
    "sslcrldir": None,
    "sslsni": None,
    "requirepeer": None,
    "load_balance_hosts": None,
}

# The libpq keywords named in messages: a keyword taken from a malformed DSN is quoted only
# if it is one of these, since what stands where a keyword should be may be password text.
_KNOWN_KEYWORDS: Final = frozenset(
    (
        *_HOST_KEYWORDS,
        *_LIBPQ_ONLY,
        "application_name",
        "client_encoding",
        "gsslib",
        "krbsrvname",
        "options",
        "passfile",
        "service",
        "ssl_max_protocol_version",
        "ssl_min_protocol_version",
        "sslcert",
        "sslcrl",
        "sslkey",
        "sslmode",
        "sslnegotiation",
        "sslpassword",
        "sslrootcert",
        "target_session_attrs",
    )
)

# A URI starts with a scheme (RFC 3986); anything else is a keyword string, which may hold
# "://" inside a value (a password, say).
_SCHEME: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_KEYWORD: Final = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*")
# A value as libpq's conninfo_parse reads it: 'single quoted' (backslash escapes \' and \\),
# or, not starting with a quote, a run of non-blank characters (backslash escapes too).
_QUOTED: Final = re.compile(r"'((?:[^'\\]|\\.)*)'", re.DOTALL)
_BARE: Final = re.compile(r"((?:[^\s\\]|\\.)*)", re.DOTALL)
_ESCAPE: Final = re.compile(r"\\(.)", re.DOTALL)
# A % not followed by two hex digits: libpq refuses such a URI ("invalid percent-encoded
# token"); asyncpg would pass it through as text.
_BAD_PERCENT: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")

_ENCODE: Final = (
    "percent-encode these characters in the user name and password: / as %2F, ? as %3F, "
    "# as %23, @ as %40, % as %25 (urllib.parse.quote(password, safe=''))"
)


def normalize_dsn(dsn: object, *, option: str = "dsn") -> str:
    """Return *dsn* as a URI, or raise `ConfigurationError` saying what is wrong with it.

    Args:
        dsn: a ``postgresql://`` URI or a libpq keyword string.
        option: the option's name, for the message.
    """
    if not isinstance(dsn, str):
        raise ConfigurationError(f"{option} must be a str, got {type(dsn).__name__}")
    if "\x00" in dsn:
        raise ConfigurationError(
            f"{option} contains a NUL character, which no PostgreSQL connection string may "
            "hold; check how it was built (an unterminated C string?)"
        )
    text = dsn.strip()
    if not text:
        raise ConfigurationError(f"{option} is empty: pass 'postgresql://user@host/db'")
    if text.startswith(_URI_SCHEMES):
        _check_uri(text, option)
        _check_parameters(text, option)
        return text
    scheme = _SCHEME.match(text)
    if scheme is not None:
        raise ConfigurationError(
            f"{option} has the scheme {scheme.group(1)!r}; use postgresql://user@host:port/db "
            "or a libpq keyword string (host=... dbname=...)"
        )
    uri = _keywords_to_uri(text, option)
    _check_parameters(uri, option)
    return uri


def _check_parameters(uri: str, option: str) -> None:
    # Parameters that are neither connection options nor server settings: refused here, since
    # the server would refuse them at connect as a DatabaseError that names no option. Any
    # other unknown name is the server's to judge (extensions add settings of their own), and
    # open_postgres_store turns its refusal into a ConfigurationError too.
    for keyword in urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query, keep_blank_values=True):
        if keyword in _LIBPQ_ONLY:
            instead = _LIBPQ_ONLY[keyword]
            raise ConfigurationError(
                f"{option} has the libpq option {keyword}=, which asyncpg does not read (it "
                "would reach the server as an unknown setting): remove it"
                + ("" if instead is None else f"; {instead}")
            )


def _check_uri(uri: str, option: str) -> None:
    # Every message here names the part of the URI, never its text: a password with a
    # character that needs percent-encoding moves the URI's boundaries, so the "port" or the
    # "query" may be password text.
    parts = _split(uri)
    if parts is None:
        raise ConfigurationError(
            f"{option} is not a valid connection URI (its host part does not parse: an "
            f"unclosed [ of an IPv6 address, or a stray character?); {_ENCODE}"
        )
    netloc = parts.netloc
    if "#" in uri:
        raise ConfigurationError(
            f"{option} contains '#', which ends a URI (nothing after it reaches the server); "
            f"if it is part of the password, {_ENCODE}"
        )
    if _BAD_PERCENT.search(uri):
        raise ConfigurationError(
            f"{option} has a '%' that does not start a percent-encoded byte (%XX); if it is "
            f"part of the password, {_ENCODE}"
        )
    if netloc.count("@") > 1:
        raise ConfigurationError(
            f"{option} has more than one '@' before the host, so the user name and password "
            f"end at the first of them; {_ENCODE}"
        )
    if "@" not in netloc and "@" in parts.path:
        raise ConfigurationError(
            f"{option} has an '@' after its host part: a '/' or '?' in the user name or "
            f"password ends the host part early; {_ENCODE} (and in a database name, @ as %40)"
        )
    if not _is_query(parts.query):
        raise ConfigurationError(
            f"{option} has a query (after '?') that is not name=value pairs joined by '&'; "
            f"if '?' is part of the password, {_ENCODE}"
        )
    # The port is never quoted: the host part may hold password text even after an '@'
    # (a password with an unencoded '@', ':' and '/' leaves one '@' before the cut).
    advice = f" (if it is part of a password, {_ENCODE})"
    hosts = netloc.rsplit("@", 1)[-1]
    for host in hosts.split(","):
        # [::1]:5432, host:5432 or host; the port, when present, must be a number.
        port = host.rsplit("]", 1)[-1].rpartition(":")[2] if ":" in host else ""
        if port and not _valid_port(port):
            raise ConfigurationError(
                f"{option} has a port after the host's colon that is not a number from 1 to "
                f"65535{advice}"
            )
    query = urllib.parse.parse_qs(parts.query)
    for port in ",".join(query.get("port", [])).split(","):
        if port and not _valid_port(port):
            raise ConfigurationError(f"{option} has a port= that is not a number from 1 to 65535")


# urllib's errors are not raised from within their except clauses: their messages quote the
# text (the host part, a query field), which may be password text, and an error raised there
# keeps them as its __context__ even "from None" (which only hides them from tracebacks).


def _split(uri: str) -> urllib.parse.SplitResult | None:
    try:
        return urllib.parse.urlsplit(uri)
    except ValueError:
        return None


def _is_query(query: str) -> bool:
    # As asyncpg parses it (strictly: a field without "=" is an error).
    try:
        urllib.parse.parse_qs(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return False
    return True


def _valid_port(port: str) -> bool:
    return port.isdigit() and 0 < int(port) < 65536


def _keywords_to_uri(text: str, option: str) -> str:
    pairs = _parse_keywords(text, option)
    for port in pairs.get("port", "").split(","):
        if port and not _valid_port(port):
            raise ConfigurationError(
                f"{option} has port={port!r}, which is not a number from 1 to 65535"
            )
    quote = urllib.parse.quote
    userinfo = ""
    if "user" in pairs:
        userinfo = quote(pairs["user"], safe="")
        if "password" in pairs:
            userinfo += ":" + quote(pairs["password"], safe="")
        userinfo += "@"
    elif "password" in pairs:
        userinfo = ":" + quote(pairs["password"], safe="") + "@"
    query: dict[str, str] = {k: v for k, v in pairs.items() if k not in _HOST_KEYWORDS}
    host = pairs.get("host", "")
    netloc = userinfo
    if host.startswith("/") or "," in host:
        # A Unix socket directory (or a host list) cannot sit in the URI's host part.
        query = {"host": host, **query}
        if "port" in pairs:
            query["port"] = pairs["port"]
    else:
        netloc += f"[{host}]" if ":" in host else host
        if "port" in pairs:
            netloc += f":{pairs['port']}"
    path = "/" + quote(pairs["dbname"], safe="") if "dbname" in pairs else ""
    encoded = urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
    return f"postgresql://{netloc}{path}" + (f"?{encoded}" if encoded else "")


def _parse_keywords(text: str, option: str) -> dict[str, str]:
    # keyword = value pairs as libpq's conninfo_parse reads them. A malformed string is
    # refused by where it goes wrong (a character offset, the last keyword read), never by
    # quoting it: an unquoted password with a space, or an unclosed quote, puts password
    # text exactly where the parsing stops.
    pairs: dict[str, str] = {}
    position = 0
    previous: str | None = None
    while text[position:].strip():
        keyword = _KEYWORD.match(text, position)
        if keyword is None:
            start = len(text) - len(text[position:].lstrip()) + 1
            after = "" if previous is None else f", after the value of {_name(previous)}"
            raise ConfigurationError(
                f"{option} is neither a postgresql:// URI nor a valid libpq keyword string "
                f"(keyword=value pairs separated by spaces): no keyword= at character {start}"
                f"{after}. Quote a value that holds spaces (password='a b'), and write a "
                "quote inside a quoted value as \\'"
            )
        name = keyword.group(1)
        position = keyword.end()
        if text.startswith("'", position):
            value = _QUOTED.match(text, position)
            if value is None:
                raise ConfigurationError(
                    f"{option} is not a valid libpq keyword string: the value of "
                    f"{_name(name)} opens a quote at character {position + 1} that is never "
                    "closed. Close it, and write a quote inside the value as \\'"
                )
        else:
            value = _BARE.match(text, position)
            assert value is not None  # it matches the empty string
        pairs[name] = _ESCAPE.sub(r"\1", value.group(1))
        position = value.end()
        previous = name
    return pairs


def _name(keyword: str) -> str:
    return f"{keyword}=" if keyword in _KNOWN_KEYWORDS else "a keyword"
