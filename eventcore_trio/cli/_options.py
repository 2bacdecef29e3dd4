"""What every command shares: exit codes, the store options, and the checked numbers.

Every command that opens the store takes the same options (`StoreOptions`): ``--dsn``,
``--session-dsn``, ``--statement-cache-size`` and ``--schema``, the first three also from the
environment, which keeps passwords out of the process list.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import AsyncIterator, Callable
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
        "--schema", default="eventcore", help="the store's schema (default: eventcore)"
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
