"""The ``eventcore-trio`` command.

Exit codes: 0 success, 1 the command ran and found a problem (a failed verification),
2 bad usage or configuration, 3 the database could not be reached.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import trio

from ._errors import ConfigurationError, EventCoreError, StoreConnectionError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


def _add_dsn(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn",
        default=os.environ.get("EVENTCORE_DSN"),
        help="PostgreSQL DSN (default: the EVENTCORE_DSN environment variable)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventcore-trio",
        description="Trio-native event sourcing on PostgreSQL.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run the bank-account demo (embedded PostgreSQL unless --dsn or --memory)",
        description="Concurrent transfers between accounts, a projection of balances, and a "
        "verification against the event streams. Exits 0 only if the verification holds.",
    )
    _add_dsn(demo)
    demo.add_argument("--memory", action="store_true", help="use the in-memory store")
    demo.add_argument(
        "--transfers", type=int, default=150, help="transfers per writer (default: 150)"
    )

    migrate = commands.add_parser(
        "migrate",
        help="create or upgrade the schema",
        description="Create or upgrade the event store schema; safe to run concurrently.",
    )
    _add_dsn(migrate)
    migrate.add_argument("--schema", default="eventcore", help="schema name (default: eventcore)")
    return parser


async def _migrate(dsn: str, schema: str) -> None:
    from .postgres import LATEST_SCHEMA_VERSION, open_postgres_store

    async with open_postgres_store(dsn, schema=schema, migrate=True):
        print(f"schema {schema!r} is at version {LATEST_SCHEMA_VERSION}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from ._demo import demo_main

            return demo_main(args.dsn, memory=args.memory, scale=args.transfers)
        if args.command == "migrate":
            if not args.dsn:
                raise ConfigurationError("no database given: pass --dsn or set EVENTCORE_DSN")
            trio.run(_migrate, args.dsn, args.schema)
            return EXIT_OK
    except StoreConnectionError as exc:
        print(f"eventcore-trio: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (ConfigurationError, EventCoreError) as exc:
        print(f"eventcore-trio: {exc}", file=sys.stderr)
        return EXIT_USAGE
    raise AssertionError(f"unhandled command {args.command!r}")  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
