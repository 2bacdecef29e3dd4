"""Connection strings: validated before any I/O, and libpq keyword strings turned into URIs.

asyncpg understands only the URI form (``postgresql://user@host:port/db?param=value``), while
libpq, psql and most deployment tooling also accept keyword strings (``host=db port=5432
dbname=app``). Both are accepted here, so a DSN copied from a psql command line works; a
malformed one is a `ConfigurationError` that names the problem instead of a driver traceback
or a misleading "cannot reach the server".
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

# keyword = value, where value is 'single quoted' (backslash escapes \' and \\) or a run of
# non-blank characters (backslash escapes too), as in libpq's conninfo_parse.
_PAIR: Final = re.compile(
    r"""\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(?:'((?:[^'\\]|\\.)*)'|((?:[^\s'\\]|\\.)+))""",
    re.DOTALL,
)
_ESCAPE: Final = re.compile(r"\\(.)", re.DOTALL)


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
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise ConfigurationError(
            f"{option} has the scheme {scheme!r}; use postgresql://user@host:port/db or a "
            "libpq keyword string (host=... dbname=...)"
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
    netloc = urllib.parse.urlsplit(uri).netloc
    hosts = netloc.rsplit("@", 1)[-1]
    for host in hosts.split(","):
        # [::1]:5432, host:5432 or host; the port, when present, must be a number.
        port = host.rsplit("]", 1)[-1].rpartition(":")[2] if ":" in host else ""
        if port and not _valid_port(port):
            raise ConfigurationError(
                f"{option} has the port {port!r}, which is not a number from 1 to 65535: "
                "fix the part after the host's colon"
            )
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query)
    for port in ",".join(query.get("port", [])).split(","):
        if port and not _valid_port(port):
            raise ConfigurationError(
                f"{option} has port={port!r}, which is not a number from 1 to 65535"
            )


def _valid_port(port: str) -> bool:
    return port.isdigit() and 0 < int(port) < 65536


def _keywords_to_uri(text: str, option: str) -> str:
    pairs: dict[str, str] = {}
    position = 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _PAIR.match(text, position)
        if match is None:
            raise ConfigurationError(
                f"{option} is neither a postgresql:// URI nor a valid libpq keyword string "
                f"(keyword=value pairs separated by spaces); the problem starts at "
                f"{text[position : position + 30]!r}"
            )
        keyword, quoted, bare = match.groups()
        pairs[keyword] = _ESCAPE.sub(r"\1", quoted if quoted is not None else bare)
        position = match.end()
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
