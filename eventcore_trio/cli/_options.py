"""What every command shares: exit codes, the store options, and the checked numbers.

Every command that opens the store takes the same options (`StoreOptions`): ``--dsn``,
``--session-dsn``, ``--statement-cache-size`` and ``--schema``, all also from the environment,
which keeps passwords out of the process list. ``demo`` and ``torture`` take ``--dsn`` from the
command line only (`add_explicit_dsn`): without it they start an embedded server.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import logging
import math
import os
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final

import attrs

from .._errors import ConfigurationError, UnsupportedPooling

if TYPE_CHECKING:
    from ..postgres import PostgresStore

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130  # as shells report a SIGINT


#: The environment variables the store options default to. A DSN may hold a password, and a
#: command line is visible to every user of the machine (``ps``): prefer the variables then.
DSN_VARIABLE: Final = "EVENTCORE_DSN"
SESSION_DSN_VARIABLE: Final = "EVENTCORE_SESSION_DSN"
STATEMENT_CACHE_VARIABLE: Final = "EVENTCORE_STATEMENT_CACHE_SIZE"
SCHEMA_VARIABLE: Final = "EVENTCORE_SCHEMA"
#: ``--log-level``'s default, for ``run`` and ``dashboard``.
LOG_LEVEL_VARIABLE: Final = "EVENTCORE_LOG_LEVEL"
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")
#: ``--log-format``'s default, for ``run`` and ``dashboard``.
LOG_FORMAT_VARIABLE: Final = "EVENTCORE_LOG_FORMAT"
LOG_FORMATS: Final = ("text", "json")
#: The dashboard's action token, when no --action-token-file is given (the same name as
#: ``eventcore_trio.dashboard._token.TOKEN_VARIABLE``, which needs the dashboard extra).
DASHBOARD_TOKEN_VARIABLE: Final = "EVENTCORE_DASHBOARD_TOKEN"
#: asyncpg's statement cache size when the DSN is direct (open_postgres_store's default).
DEFAULT_STATEMENT_CACHE_SIZE: Final = 100


def add_dsn(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn",
        default=os.environ.get(DSN_VARIABLE),
        help=f"PostgreSQL DSN (default: the {DSN_VARIABLE} environment variable, which keeps "
        "a password out of the process list)",
    )


def add_explicit_dsn(parser: argparse.ArgumentParser, *, why: str) -> None:
    """--dsn from the command line only: without it, the command starts an embedded server.

    Not from ``EVENTCORE_DSN``, which getting-started has people export for the other
    commands: a program that writes (and torture, which injects faults) must never run
    against a database it was not explicitly given."""
    parser.add_argument(
        "--dsn",
        default=None,
        help="PostgreSQL DSN to run on instead of an embedded server. Only from the command "
        f"line: {DSN_VARIABLE} is ignored here, {why}",
    )


def add_log_level(parser: argparse.ArgumentParser, *, default: str) -> None:
    """--log-level: how much eventcore-trio logs (other libraries log warnings and errors)."""
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        type=_log_level,
        default=os.environ.get(LOG_LEVEL_VARIABLE) or default,
        help=f"{', '.join(LOG_LEVELS)}: what eventcore-trio logs (default: the "
        f"{LOG_LEVEL_VARIABLE} environment variable, else {default})",
    )


def _one_of(option: str, variable: str, choices: Sequence[str], text: str, value: str) -> str:
    # An option's value (or its environment variable's), checked against its choices.
    if value not in choices:
        raise argparse.ArgumentTypeError(
            f"must be one of {', '.join(choices)} (from {option} or {variable}), got {text!r}"
        )
    return value


def _log_level(text: str) -> str:
    return _one_of("--log-level", LOG_LEVEL_VARIABLE, LOG_LEVELS, text, text.strip().upper())


def add_log_format(parser: argparse.ArgumentParser) -> None:
    """--log-format: text lines for people, or one JSON object a line for log shippers."""
    parser.add_argument(
        "--log-format",
        metavar="FORMAT",
        type=_log_format,
        default=os.environ.get(LOG_FORMAT_VARIABLE) or "text",
        help="text, or json: one JSON object a line (time, level, logger, message, "
        f"exception) for log shippers (default: the {LOG_FORMAT_VARIABLE} environment "
        "variable, else text)",
    )


def _log_format(text: str) -> str:
    return _one_of("--log-format", LOG_FORMAT_VARIABLE, LOG_FORMATS, text, text.strip().lower())


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line: ``time`` (ISO 8601, UTC, to the millisecond), ``level``,
    ``logger``, ``message``, and ``exception`` (the traceback's text) when the record has
    one. A newline in a message or a traceback is escaped, so a record is always one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            # Cached as the text formatter does, for any other handler of the record.
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line)


def configure_logging(level: str = "WARNING", log_format: str = "text") -> None:
    """Log to stderr: eventcore-trio's loggers at *level*, other libraries' at WARNING (or
    *level*, when higher): at INFO, asyncpg's and the web server's chatter stays out.
    *log_format* ``"json"`` writes `JsonLogFormatter` lines instead of text."""
    number = logging.getLevelNamesMapping()[level]
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonLogFormatter()
        if log_format == "json"
        else logging.Formatter("%(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=max(number, logging.WARNING), handlers=[handler])
    if number != logging.WARNING:
        # WARNING is the root's own level: eventcore-trio's loggers keep inheriting it.
        logging.getLogger("eventcore_trio").setLevel(number)


def describe_database(dsn: str) -> str:
    """Which database *dsn* (a URI, as `normalize_dsn` returns) names: its host, port and
    name, as libpq's defaults complete them; never its user or password."""
    parts = urllib.parse.urlsplit(dsn)
    query = {k: v[-1] for k, v in urllib.parse.parse_qs(parts.query).items()}
    hosts = urllib.parse.unquote(parts.netloc.rpartition("@")[2])
    if not hosts:
        hosts = query.get("host") or os.environ.get("PGHOST") or "localhost"
        port = query.get("port") or os.environ.get("PGPORT") or "5432"
        hosts = f"{hosts}:{port}"
    elif not hosts.endswith("]") and ":" not in hosts.rpartition("]")[2]:
        # One host without a port (a list of hosts is shown as given).
        hosts = f"{hosts}:{query.get('port') or os.environ.get('PGPORT') or '5432'}"
    name = (
        urllib.parse.unquote(parts.path.lstrip("/"))
        or query.get("dbname")
        or os.environ.get("PGDATABASE")
        or parts.username
        or query.get("user")
        or os.environ.get("PGUSER")
        or getpass.getuser()
    )
    return f"database {name!r} at {hosts}"


def add_store_options(parser: argparse.ArgumentParser) -> None:
    """--dsn, --session-dsn, --statement-cache-size and --schema: how to open the store."""
    add_dsn(parser)
    parser.add_argument(
        "--session-dsn",
        metavar="DSN",
        default=os.environ.get(SESSION_DSN_VARIABLE) or None,
        help="where the sessions that must own a server session connect (leadership locks, "
        "LISTEN): directly to PostgreSQL or through session pooling, when --dsn goes through "
        f"a transaction-pooling proxy (default: the {SESSION_DSN_VARIABLE} environment "
        "variable, else --dsn)",
    )
    parser.add_argument(
        "--statement-cache-size",
        metavar="N",
        type=whole_number(0, source=f"--statement-cache-size or {STATEMENT_CACHE_VARIABLE}"),
        default=os.environ.get(STATEMENT_CACHE_VARIABLE) or None,
        help="prepared statements cached per pooled connection (default: the "
        f"{STATEMENT_CACHE_VARIABLE} environment variable, else 0 when --dsn goes through a "
        "proxy such as PgBouncer, which a transaction-pooling one requires, and 100 otherwise)",
    )
    parser.add_argument(
        "--schema",
        default=os.environ.get(SCHEMA_VARIABLE) or "eventcore",
        help=f"the store's schema (default: the {SCHEMA_VARIABLE} environment variable, else "
        "eventcore)",
    )


@attrs.frozen(kw_only=True)
class StoreOptions:
    """How a command opens the store, from its options (checked before any I/O)."""

    dsn: str
    # None: the same as dsn.
    session_dsn: str | None
    # None: chosen at each open, 0 behind a proxy, else the library's default.
    statement_cache_size: int | None
    schema: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StoreOptions:
        from ..postgres import check_schema_name, normalize_dsn

        if not args.dsn:
            raise ConfigurationError(f"no database given: pass --dsn or set {DSN_VARIABLE}")
        check_schema_name(args.schema)
        return cls(
            dsn=normalize_dsn(args.dsn, option="--dsn"),
            session_dsn=None
            if args.session_dsn is None
            else normalize_dsn(args.session_dsn, option="--session-dsn"),
            statement_cache_size=args.statement_cache_size,
            schema=args.schema,
        )

    def describe(self) -> str:
        """Which database and schema the command uses, without the DSN's password."""
        from ._status import printable

        return printable(f"{describe_database(self.dsn)}, schema {self.schema!r}")

    @asynccontextmanager
    async def open(self, *, migrate: bool = False) -> AsyncIterator[PostgresStore]:
        """Open the store; behind a proxy, with asyncpg's statement cache off unless the
        options say otherwise (a transaction-pooling proxy loses prepared statements)."""
        from ..postgres import behind_proxy, open_postgres_store

        cache = self.statement_cache_size
        if cache is None:
            cache = 0 if await behind_proxy(self.dsn) else DEFAULT_STATEMENT_CACHE_SIZE
        async with open_postgres_store(
            self.dsn,
            schema=self.schema,
            migrate=migrate,
            session_dsn=self.session_dsn,
            statement_cache_size=cache,
        ) as store:
            yield store


_SESSION_ADVICE: Final = (
    "the lock sessions go through a transaction-pooling proxy (PgBouncer pool_mode = "
    f"transaction?): point --session-dsn (or {SESSION_DSN_VARIABLE}) at PostgreSQL directly or "
    "at a session-pooling proxy"
)
_STATEMENT_ADVICE: Final = (
    "a transaction-pooling proxy (PgBouncer pool_mode = transaction) lost this connection's "
    "prepared statements: pass --statement-cache-size 0 (or set "
    f"{STATEMENT_CACHE_VARIABLE}=0; the default behind a proxy), and point --session-dsn (or "
    f"{SESSION_DSN_VARIABLE}) at PostgreSQL directly or at a session-pooling proxy"
)


def pooling_message(exc: UnsupportedPooling) -> str:
    """*exc*'s message with its advice in terms of this command line, not the Python API."""
    from ..postgres import POOLER_HINT

    message = str(exc)
    if "prepared statement" in message:
        # asyncpg's own text (first line) comes with a Python hint of its own: keep the first.
        return f"{message.splitlines()[0]}: {_STATEMENT_ADVICE}"
    if POOLER_HINT in message:
        return message.replace(POOLER_HINT, _SESSION_ADVICE)
    return f"{message.splitlines()[0]}; {_SESSION_ADVICE}"


def seconds(text: str) -> float:
    # float() takes "nan", "inf" and "-5": none of them is a duration.
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def whole_number(low: int, high: int | None = None, *, source: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number from *low* (up to *high*), else a message saying so
    (and naming *source*, where the value may come from, when given)."""
    wanted = f">= {low}" if high is None else f"from {low} to {high}"
    where = f" (from {source})" if source else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"must be a whole number {wanted}{where}, got {text!r}"
            )
        return value

    return parse
