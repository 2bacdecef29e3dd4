"""The ``eventcore-trio`` command.

Exit codes: 0 success (``run``: stopped by SIGTERM), 1 the command ran and found a problem (a
failed verification, a projection that is not found or is running, dead letters that failed
again), 2 bad usage or configuration (a ``run`` target that cannot be loaded, lock sessions
behind transaction pooling), 3 the database could not be reached, 130 interrupted (Ctrl-C,
SIGINT), after a clean shutdown.

Every command that opens the store takes the same options (`_StoreOptions`): ``--dsn``,
``--session-dsn``, ``--statement-cache-size`` and ``--schema``, the first three also from the
environment, which keeps passwords out of the process list.

About 850 lines: one short function per subcommand to build its parser and one to run it,
kept together so that the whole command line, its messages and its exit codes read in one place.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import math
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ._errors import (
    ConfigurationError,
    DeadLetterNotFound,
    EventCoreError,
    LeadershipUnavailable,
    PartitionsMismatch,
    ProjectionNotFound,
    StoreConnectionError,
    UnsupportedPooling,
)
from ._status import ForeignLock, ProjectionState, ProjectionStatus, status_json
from ._tools._processes import run_program

if TYPE_CHECKING:
    from .postgres import PostgresStore

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


def _add_dsn(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn",
        default=os.environ.get(DSN_VARIABLE),
        help=f"PostgreSQL DSN (default: the {DSN_VARIABLE} environment variable, which keeps "
        "a password out of the process list)",
    )


def _statement_cache_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"must be a whole number >= 0 (from --statement-cache-size or "
            f"{STATEMENT_CACHE_VARIABLE}), got {text!r}"
        )
    return value


def _add_store_options(parser: argparse.ArgumentParser) -> None:
    """--dsn, --session-dsn, --statement-cache-size and --schema: how to open the store."""
    _add_dsn(parser)
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
        type=_statement_cache_size,
        default=os.environ.get(STATEMENT_CACHE_VARIABLE) or None,
        help="prepared statements cached per pooled connection (default: the "
        f"{STATEMENT_CACHE_VARIABLE} environment variable, else 0 when --dsn goes through a "
        "proxy such as PgBouncer, which a transaction-pooling one requires, and 100 otherwise)",
    )
    parser.add_argument(
        "--schema", default="eventcore", help="the store's schema (default: eventcore)"
    )


@attrs.frozen(kw_only=True)
class _StoreOptions:
    """How a command opens the store, from its options (checked before any I/O)."""

    dsn: str
    # None: the same as dsn.
    session_dsn: str | None
    # None: chosen at each open, 0 behind a proxy, else the library's default.
    statement_cache_size: int | None
    schema: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> _StoreOptions:
        from .postgres import check_schema_name, normalize_dsn

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
        from .postgres import behind_proxy, open_postgres_store

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


def _pooling_message(exc: UnsupportedPooling) -> str:
    """*exc*'s message with its advice in terms of this command line, not the Python API."""
    from .postgres import POOLER_HINT

    message = str(exc)
    if "prepared statement" in message:
        # asyncpg's own text (first line) comes with a Python hint of its own: keep the first.
        return f"{message.splitlines()[0]}: {_STATEMENT_ADVICE}"
    if POOLER_HINT in message:
        return message.replace(POOLER_HINT, _SESSION_ADVICE)
    return f"{message.splitlines()[0]}; {_SESSION_ADVICE}"


def _add_demo_command(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="run the bank-account demo (embedded PostgreSQL unless --dsn or --memory)",
        description="Concurrent transfers as commands; three projector host processes compete "
        "for leadership and the leader is killed part-way; then the read model is verified "
        "against the event streams. Exits 0 only if the verification holds.",
    )
    _add_dsn(demo)
    demo.add_argument("--memory", action="store_true", help="use the in-memory store")
    demo.add_argument(
        "--duration",
        type=_seconds,
        default=30.0,
        help="seconds of transfers on PostgreSQL (default: 30); the leader dies part-way",
    )
    demo.add_argument(
        "--transfers",
        type=_at_least_one,
        default=150,
        help="transfers per writer with --memory (default: 150)",
    )


def _seconds(text: str) -> float:
    # float() takes "nan", "inf" and "-5": none of them is a duration.
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _add_torture_command(commands: Any) -> None:
    torture = commands.add_parser(
        "torture",
        help="inject faults under load and verify nothing was lost or applied twice",
        description="Writers and projector host processes run while faults are injected on a "
        "seeded schedule: SIGKILL and SIGTERM of the leader, pg_terminate_backend of lock and "
        "pooled sessions, network drops and stalls, and server restarts and crashes when the "
        "server is embedded (no --dsn). Then the event log is checked against the read model "
        "and the evidence the projection committed. Exits 0 only if nothing was lost, "
        "duplicated or regressed, there were never two leaders, and every fault was recovered.",
    )
    _add_dsn(torture)
    torture.add_argument(
        "--quick", action="store_true", help="a short run (40 s of faults, about a minute)"
    )
    torture.add_argument(
        "--duration", type=float, help="seconds of fault injection (default: 300; --quick: 40)"
    )
    torture.add_argument("--seed", type=int, help="make the schedule and the writers repeatable")
    torture.add_argument(
        "--hosts", type=int, default=3, help="projector host processes (default: 3)"
    )
    torture.add_argument("--writers", type=int, default=4, help="writer tasks (default: 4)")
    torture.add_argument(
        "--faults",
        help="comma-separated fault kinds to inject (default: all available): "
        + ", ".join(kind.value for kind in _fault_kinds()),
    )
    torture.add_argument(
        "--json", action="store_true", help="print the report as one JSON object on stdout"
    )


def _partition_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 2 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"must be a whole number from 2 to 1024, got {text!r}")
    return value


def _add_migrate_command(commands: Any) -> None:
    migrate = commands.add_parser(
        "migrate",
        help="create or upgrade the schema; grant a runtime role; build partition indexes",
        description="Create or upgrade the event store schema; safe to run concurrently. Run "
        "it as the schema's owner. It also builds the index of every partition count that "
        "the schema records (a runtime role that does not own the schema cannot), and "
        'grants a least-privilege runtime role its rights (docs/operations.md, "Roles and '
        'grants").',
    )
    _add_store_options(migrate)
    migrate.add_argument(
        "--grant",
        metavar="ROLE",
        help="then grant ROLE what a least-privilege runtime role needs: it appends, reads, "
        "checkpoints and hosts projections, and cannot write events by hand or run DDL",
    )
    migrate.add_argument(
        "--print",
        action="store_true",
        help="with --grant: print the statements instead, touching no database (no --dsn "
        "needed), for review or for psql",
    )
    migrate.add_argument(
        "--partition-index",
        metavar="N",
        type=_partition_count,
        action="append",
        default=[],
        help="also build the index that serves reads of N partitions (repeatable), ahead of "
        "a change of a projection to N partitions",
    )


def _add_status_command(commands: Any) -> None:
    status = commands.add_parser(
        "status",
        help="show every projection: state, leader, checkpoint, lag, errors",
        description="One line per projection; what holds every reader back, if anything.",
    )
    _add_store_options(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_dashboard_command(commands: Any) -> None:
    dashboard = commands.add_parser(
        "dashboard",
        help="serve a live web page of every unit, /status.json and /metrics",
        description="A page that updates every second: units, leaders, lag, units per host, "
        "dead letters, what holds readers back, recent failovers; /status.json for scripts "
        "and /metrics for Prometheus. Read-only unless --allow-actions. Needs the dashboard "
        "extra.",
    )
    _add_store_options(dashboard)
    dashboard.add_argument(
        "--bind",
        default="127.0.0.1:8000",
        help="HOST:PORT to listen on (default: 127.0.0.1:8000; 0.0.0.0 shows it to the "
        "network, without authentication)",
    )
    dashboard.add_argument(
        "--allow-actions",
        action="store_true",
        help="allow resetting a projection, and replaying dead letters of the --projectors, "
        "from the page (each asks for confirmation and the action token)",
    )
    dashboard.add_argument(
        "--action-token-file",
        metavar="PATH",
        help="a file (readable only by you) holding the secret token every action must carry, "
        f"needed by --allow-actions (default: the {DASHBOARD_TOKEN_VARIABLE} environment "
        "variable). Never the token itself on the command line: every user can read that",
    )
    dashboard.add_argument(
        "--projectors",
        metavar="MODULE:ATTR",
        help="the projectors whose dead letters the page may replay (with --allow-actions)",
    )
    dashboard.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or IP address (no port) the dashboard answers to besides "
        "localhost, 127.0.0.1, ::1 and the --bind host, e.g. the name your proxy forwards; "
        "repeat for several. Requests naming another host get 400 (DNS rebinding)",
    )


def _add_reset_command(commands: Any) -> None:
    reset = commands.add_parser(
        "reset",
        help="make a projection rebuild from the beginning",
        description="Forget a projection's checkpoint and dead letters; its next run "
        "rebuilds it. Refused while it runs: stop its hosts first. With --wait, stay and show "
        "the rebuild's progress once hosts run it again.",
    )
    _add_store_options(reset)
    reset.add_argument("name", help="the projection's name")
    reset.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    reset.add_argument(
        "--wait",
        action="store_true",
        help="then follow the rebuild (run by your hosts) with a progress bar until caught up",
    )


def _add_run_command(commands: Any) -> None:
    run = commands.add_parser(
        "run",
        help="host the projectors a module defines (like an ASGI server hosts an app)",
        description="Import MODULE:ATTR (a projector, a list of projectors, or a function "
        "returning them) and run them until SIGINT or SIGTERM.",
    )
    _add_store_options(run)
    run.add_argument("target", metavar="MODULE:ATTR", help="where the projectors are")


def _add_bench_command(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="run the benchmark harness (from a clone: python -m benchmarks)",
        description="Runs `python -m benchmarks` with the remaining arguments; see its --help.",
        add_help=False,
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER)


def _add_dead_letters_command(commands: Any) -> None:
    letters = commands.add_parser(
        "dead-letters", help="list or replay the events a projection skipped"
    )
    letter_commands = letters.add_subparsers(dest="letters_command", required=True)
    listing = letter_commands.add_parser("list", help="list a projection's dead letters")
    _add_store_options(listing)
    listing.add_argument("name", help="the projection's name")
    listing.add_argument("--json", action="store_true", help="print JSON")
    replay = letter_commands.add_parser(
        "replay", help="apply a projection's dead letters again (stop its hosts first)"
    )
    _add_store_options(replay)
    replay.add_argument("name", help="the projection's name")
    replay.add_argument(
        "--projectors", required=True, metavar="MODULE:ATTR", help="where the projector is"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventcore-trio",
        description="Trio-native event sourcing on PostgreSQL.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo_command(commands)
    _add_torture_command(commands)
    _add_migrate_command(commands)
    _add_status_command(commands)
    _add_reset_command(commands)
    _add_dashboard_command(commands)
    _add_run_command(commands)
    _add_bench_command(commands)
    _add_dead_letters_command(commands)
    return parser


def load_projectors(target: str) -> list[Any]:
    """Import ``MODULE:ATTR`` and return the projectors it names.

    ATTR may be a projector, a list or tuple of them, or a function returning either.

    Raises:
        ConfigurationError: the target cannot be imported (not found, a syntax error, an
            error raised while importing it), its function raises, or it names something
            that is not a projector. The message says which, without a traceback: the code
            is the user's, and the cause is in the message.
    """
    from .projection import check_projector

    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"expected MODULE:ATTR, got {target!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    except SyntaxError as exc:
        raise ConfigurationError(
            f"cannot import {module_name!r}: {exc.msg} ({exc.filename}, line {exc.lineno})"
        ) from exc
    except Exception as exc:
        raise ConfigurationError(
            f"cannot import {module_name!r}: importing it raised "
            f"{_described(exc)}{_where(exc, module_name)}"
        ) from exc
    finally:
        sys.path.pop(0)
    try:
        value = getattr(module, attribute)
    except AttributeError as exc:
        raise ConfigurationError(f"{module_name!r} has no attribute {attribute!r}") from exc
    if callable(value) and not hasattr(value, "name"):
        try:
            value = value()
        except Exception as exc:
            raise ConfigurationError(
                f"calling {target} raised {_described(exc)}{_where(exc, module_name)}"
            ) from exc
    projectors = list(value) if isinstance(value, list | tuple) else [value]
    if not projectors:
        raise ConfigurationError(f"{target} names no projectors")
    for candidate in projectors:
        try:
            check_projector(candidate)
        except EventCoreError as exc:
            raise ConfigurationError(
                f"{target} must name a projector, a list or tuple of them, or a function "
                f"returning either; {exc}"
            ) from exc
    return projectors


def _described(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _where(exc: BaseException, module_name: str) -> str:
    # The innermost frame of the user's module: where to look, without a traceback.
    tb = exc.__traceback__
    found = ""
    root = module_name.split(".")[0]
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "")
        if name == root or name.startswith(root + "."):
            found = f" ({tb.tb_frame.f_code.co_filename}, line {tb.tb_lineno})"
        tb = tb.tb_next
    return found


async def _migrate(options: _StoreOptions, grant: str | None, partitions: list[int]) -> int:
    from .postgres import LATEST_SCHEMA_VERSION, partition_index_advice

    async with options.open(migrate=True) as store:
        print(f"schema {options.schema!r} is at version {LATEST_SCHEMA_VERSION}")
        # Only the counts asked for: the projections table is the runtime role's to write,
        # so its counts are not the owner's to build (an index per invented count would slow
        # every append); recorded counts without their index are named instead.
        for count in sorted(set(partitions)):
            if not await store.admin.build_partition_index(count):
                print(
                    f"eventcore-trio: this role may not build the index of {count} partitions "
                    f"(only the owner of {options.schema}.events may): run "
                    f"`{partition_index_advice(options.schema, count)}` as the schema's owner",
                    file=sys.stderr,
                )
                return EXIT_FAILED
            print(f"partition index for {count} partitions: ready")
        missing = await store.admin.fetch(
            f'SELECT DISTINCT p.partitions FROM "{options.schema}".projections AS p '
            "WHERE p.partitions > 1 AND pg_catalog.to_regclass(pg_catalog.format("
            "'%I.events_partition_%s_idx', $1::text, p.partitions)) IS NULL "
            "ORDER BY 1",
            options.schema,
        )
        for row in missing:
            print(
                f"projections run as {row['partitions']} partitions without their read index: "
                f"`{partition_index_advice(options.schema, row['partitions'])}` builds it"
            )
        if grant is not None:
            statements = await store.admin.grant_runtime_role(grant)
            print(f"granted {grant!r} the rights of a runtime role ({len(statements)} statements)")
    return EXIT_OK


def _action_token(allow_actions: bool, token_file: str | None) -> str | None:
    """The dashboard's action token: from *token_file*, else the environment; None when
    actions are off. A token never comes from the command line, which ``ps`` shows."""
    from .dashboard._token import MAKE_TOKEN, check_action_token, read_action_token

    if not allow_actions:
        return None
    if token_file is not None:
        return read_action_token(token_file)
    token = os.environ.get(DASHBOARD_TOKEN_VARIABLE)
    if token:
        return check_action_token(token, source=DASHBOARD_TOKEN_VARIABLE)
    raise ConfigurationError(
        "--allow-actions needs a secret token, or any local process could reset projections: "
        "put one in a file only you can read and pass --action-token-file PATH, or set "
        f"{DASHBOARD_TOKEN_VARIABLE}; make one with: {MAKE_TOKEN}"
    )


async def _dashboard(
    options: _StoreOptions,
    bind: str,
    allow_actions: bool,
    projectors: list[Any],
    allowed_hosts: list[str],
    token_file: str | None,
) -> None:
    try:
        from .dashboard import serve_dashboard
        from .dashboard._allowed_hosts import allowed_host_names
        from .dashboard._serve import check_bind, check_listen
    except ImportError as exc:
        raise ConfigurationError(str(exc)) from exc

    # Bad options are usage errors (exit 2), reported before connecting to anything; raised
    # later, inside the nursery, they would reach main() as an exception group.
    check_bind(bind)
    allowed_host_names(allowed_hosts)
    action_token = _action_token(allow_actions, token_file)
    await check_listen(bind)
    async with options.open() as store, trio.open_nursery() as nursery:
        urls = await nursery.start(
            functools.partial(
                serve_dashboard,
                store,
                bind=bind,
                allow_actions=allow_actions,
                projectors=projectors,
                allowed_hosts=allowed_hosts,
                action_token=action_token,
            )
        )
        print(f"dashboard at {', '.join(urls)} (Ctrl-C to stop)", flush=True)


def _printable(value: object) -> str:
    """*value* as text that cannot steer a terminal: control characters, escape sequences
    and other unprintable characters (bidirectional overrides, line separators) are shown
    escaped, as ``\\x1b``, ``\\n``, ``\\u202e``. For text from outside this process: host
    names, queries, error messages, event data."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


#: Where the status's warning about foreign lock holders sends operators.
_LOCKS_ADVICE: Final = (
    "any role that may connect to the database can take the store's advisory locks: end "
    "the session (SELECT pg_terminate_backend(PID)) and keep untrusted roles out of the "
    "store's database (docs/operations.md, 'Advisory-lock keys and untrusted roles')"
)


def _status_lines(
    records: Sequence[ProjectionStatus], foreign: Sequence[ForeignLock] = ()
) -> list[str]:
    """The table `eventcore-trio status` prints, with every foreign string made printable.

    *foreign*: sessions from outside the store on its own locks, when no record says (a
    store where no projection has run)."""
    p = _printable
    lines = [
        f"{'projection':24} {'state':8} {'leader':22} {'checkpoint':18} "
        f"{'lag':>8} {'lag s':>7} {'dead':>5}"
    ]
    shown: set[tuple[str, int]] = set()
    for r in records:
        if r.partition is not None and (r.name, r.partitions) not in shown:
            # A partitioned projection: one summary line, then its partitions under it (per
            # partition count: during a change of count, the new count's units are listed
            # too, awaiting the split).
            units = [u for u in records if (u.name, u.partitions) == (r.name, r.partitions)]
            led = sum(1 for u in units if u.leader is not None)
            lines.append(
                f"{p(r.name):24} {f'{led}/{r.partitions} led':>8} {'':22} {'':18} "
                f"{sum(u.lag_events for u in units):>8} "
                f"{max(u.lag_seconds for u in units):>7.1f} "
                f"{sum(u.dead_letters for u in units):>5}"
            )
        shown.add((r.name, r.partitions))
        leader = "-" if r.leader is None else f"{r.leader.pid}@{p(r.leader.host)}"
        label = p(r.name) if r.partition is None else f"  [{r.partition}/{r.partitions}]"
        lines.append(
            f"{label:24} {r.state.value:8} {leader:22} {r.checkpoint or '-'!s:18} "
            f"{r.lag_events:>8} {r.lag_seconds:>7.1f} {r.dead_letters:>5}"
        )
        if r.last_error:
            lines.append(f"    last error: {p(r.last_error)}")
        if r.state is ProjectionState.AWAITING_SPLIT:
            lines.append(
                f"    runs once no unit of {p(r.name)}'s recorded partition count runs "
                "(hosts running the old count lead those meanwhile)"
            )
        if r.unrunnable:
            lacking = ", ".join(f"{h.pid}@{p(h.host)}" for h in r.lacking_hosts)
            lines.append(f"    no live host runs it (lacking: {lacking})")
        for lock in r.foreign_locks:
            if lock.unit is not None:
                lines.append(f"    WARNING: {p(lock.describe())}")
    if not records:
        lines.append("(no projection has run against this store)")
    hosts = Counter(f"{r.leader.pid}@{p(r.leader.host)}" for r in records if r.leader is not None)
    if hosts:
        lines.append(
            "units led per host: " + ", ".join(f"{h} {n}" for h, n in sorted(hosts.items()))
        )
    held = records[0].held_back_by if records else None
    if held is not None:
        lines.append(
            f"reads held back by transaction of pid {held.pid} ({held.application_name!r}, "
            f"{p(held.state)}, since {held.started_at}): {p(held.query)}"
        )
    # Every record has the store-wide ones: print them once.
    store_wide = [f for f in (records[0].foreign_locks if records else foreign) if f.unit is None]
    for lock in store_wide:
        lines.append(f"WARNING: {p(lock.describe())}")
    if store_wide or any(lock.unit is not None for r in records for lock in r.foreign_locks):
        lines.append(f"WARNING: {_LOCKS_ADVICE}")
    return lines


async def _status(options: _StoreOptions, as_json: bool) -> None:
    async with options.open() as store:
        records = await store.projection_status()
        # Each record carries them; without records, they are asked for alone.
        foreign = () if records else await store.admin.foreign_locks()
    if as_json:
        # json.dumps escapes control characters itself.
        print(json.dumps([status_json(r) for r in records], indent=2))
        return
    for line in _status_lines(records, foreign):
        print(line)


async def _reset(options: _StoreOptions, name: str, follow: bool) -> None:
    async with options.open() as store:
        await store.reset_projection(name)
        print(f"projection {name!r} reset: its next run rebuilds it from the beginning", flush=True)
        if not follow:
            return
        print("waiting for a host to rebuild it (start your hosts; Ctrl-C stops waiting)…")
        total: int | None = None
        live = sys.stdout.isatty()
        last_line = 0.0
        while True:
            units = [
                r
                for r in await store.projection_status()
                if r.name == name and r.state is not ProjectionState.AWAITING_SPLIT
            ]
            lag = sum(r.lag_events for r in units)
            if total is None or lag > total:
                total = lag
            done = total - lag
            if all(r.checkpoint is not None for r in units) and lag == 0:
                print(f"\rrebuilt: {total:,} events applied{' ' * 30}", flush=True)
                return
            fraction = done / total if total else 0.0
            bar = "#" * int(fraction * 30)
            states = Counter(r.state.value for r in units)
            state = ", ".join(f"{n} {v}" if len(units) > 1 else v for v, n in states.items())
            line = f"[{bar:<30}] {fraction:6.1%}  {done:,}/{total:,} events  ({state})"
            now = trio.current_time()
            if live:
                print(f"\r{line}", end="", flush=True)
            elif now - last_line >= 2:
                print(line, flush=True)
                last_line = now
            await trio.sleep(0.2)


async def _run(options: _StoreOptions, projectors: list[Any]) -> int:
    from .projection import run_host

    names = ", ".join(p.name for p in projectors)
    try:
        return await run_host(
            functools.partial(options.open, migrate=True),
            projectors,
            on_ready=lambda: print(f"hosting {names}; SIGINT or SIGTERM stops", flush=True),
            on_stop=lambda received: print(f"received {received.name}; stopping", flush=True),
        )
    except UnsupportedPooling as exc:
        # The host registers with a session lock of its own before it leads anything.
        raise UnsupportedPooling(f"cannot host {names}: {exc}") from exc


async def _list_letters(options: _StoreOptions, name: str, as_json: bool) -> None:
    async with options.open() as store:
        letters = await store.dead_letters(name)
        if not letters and not any(r.name == name for r in await store.projection_status()):
            # As `reset` says: a name that never ran is more likely a typo than a clean record.
            raise ProjectionNotFound(f"no projection named {name!r} has run against this store")
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "id": str(d.id),
                        "position": str(d.position),
                        "stream_id": d.event.stream_id,
                        "type": d.event.type,
                        "error_type": d.error_type,
                        "error_message": d.error_message,
                        "retries": d.retries,
                        "recorded_at": d.recorded_at.isoformat(),
                    }
                    for d in letters
                ],
                indent=2,
            )
        )
        return
    p = _printable
    for d in letters:
        print(
            f"{d.position}  {p(d.event.stream_id)}  {p(d.event.type)}  "
            f"{p(d.error_type)}: {p(d.error_message)}"
        )
    print(f"{len(letters)} dead letter(s) for {name!r}")


async def _replay_letters(options: _StoreOptions, name: str, target: str) -> int:
    from .projection import replay_dead_letters

    chosen = [p for p in load_projectors(target) if getattr(p, "name", None) == name]
    if not chosen:
        raise ConfigurationError(f"{target} defines no projector named {name!r}")
    async with options.open() as store:
        try:
            result = await replay_dead_letters(chosen[0], store)
        except PartitionsMismatch as exc:
            # Advice in terms of this command line; nothing was replayed.
            raise ConfigurationError(
                f"{target} defines {name!r} with partitions={exc.given}, but the projection "
                f"runs as {exc.recorded} partition(s), so nothing was replayed: point "
                "--projectors at the projectors its hosts run"
            ) from exc
        except DeadLetterNotFound as exc:
            print(f"eventcore-trio: {exc}", file=sys.stderr)
            return EXIT_FAILED
    print(f"replayed {result.replayed}, failed again {result.failed}")
    if result.failed:
        print(
            f"{result.failed} dead letter(s) of {name!r} failed again and were kept; see "
            f"`eventcore-trio dead-letters list {name}`",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _fault_kinds() -> list[Any]:
    from .torture import FaultKind

    return list(FaultKind)


def _torture(args: argparse.Namespace) -> int:
    from .torture import DEFAULT_DURATION, QUICK_DURATION, FaultKind, run_torture

    faults = None
    if args.faults:
        try:
            faults = [FaultKind(name.strip()) for name in args.faults.split(",") if name.strip()]
        except ValueError as exc:
            raise ConfigurationError(
                f"{exc}; choose from {', '.join(k.value for k in FaultKind)}"
            ) from None
    duration = args.duration or (QUICK_DURATION if args.quick else DEFAULT_DURATION)
    # asyncpg's pools log a traceback each time they fail to reconnect in the background;
    # under injected faults that is expected, and the run reports what matters.
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)
    # With --json, stdout carries the JSON object only; progress goes to stderr.
    stream = sys.stderr if args.json else sys.stdout

    def out(line: str) -> None:
        print(line, file=stream, flush=True)

    report = run_program(
        functools.partial(
            run_torture,
            args.dsn,
            duration=duration,
            seed=args.seed,
            hosts=args.hosts,
            writers=args.writers,
            faults=faults,
            out=out,
        )
    )
    for line in report.summary():
        out(line)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    return EXIT_OK if report.ok else EXIT_FAILED


def _print_grants(args: argparse.Namespace) -> int:
    # No database: what the schema's owner would run for the role (docs/operations.md).
    from .postgres import runtime_grants

    if args.grant is None:
        raise ConfigurationError("--print prints what --grant ROLE runs: give --grant ROLE")
    for statement in runtime_grants(args.grant, schema=args.schema):
        print(statement)
    return EXIT_OK


def _bench(rest: list[str]) -> int:
    # The harness lives in the repository (benchmarks/), not in the installed package.
    import subprocess

    if not os.path.isfile(os.path.join("benchmarks", "_harness.py")):
        print(
            "eventcore-trio: the benchmark harness is not here: run this from a clone of the "
            "eventcore-trio repository",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return subprocess.call([sys.executable, "-m", "benchmarks", *rest])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            from .demo._memory import demo_main

            return demo_main(
                args.dsn, memory=args.memory, scale=args.transfers, duration=args.duration
            )
        if args.command == "torture":
            return _torture(args)
        if args.command == "migrate" and args.print:
            return _print_grants(args)
        options = _StoreOptions.from_args(args)
        if args.command == "migrate":
            return run_program(_migrate, options, args.grant, args.partition_index)
        if args.command == "status":
            run_program(_status, options, args.json)
        elif args.command == "reset":
            if not args.yes:
                if not sys.stdin.isatty():
                    raise ConfigurationError(
                        f"resetting {args.name!r} makes it rebuild from the beginning; "
                        "confirm with --yes"
                    )
                answer = input(f"Reset projection {args.name!r} (it will rebuild)? [y/N] ")
                if answer.strip().lower() not in ("y", "yes"):
                    print("not reset")
                    return EXIT_FAILED
            run_program(_reset, options, args.name, args.wait)
        elif args.command == "dashboard":
            projectors = load_projectors(args.projectors) if args.projectors else []
            run_program(
                _dashboard,
                options,
                args.bind,
                args.allow_actions,
                projectors,
                args.allowed_host,
                args.action_token_file,
            )
        elif args.command == "run":
            projectors = load_projectors(args.target)
            return run_program(_run, options, projectors)
        elif args.command == "dead-letters":
            if args.letters_command == "list":
                run_program(_list_letters, options, args.name, args.json)
            else:
                return run_program(_replay_letters, options, args.name, args.projectors)
        return EXIT_OK
    except KeyboardInterrupt:
        # Trio has already cancelled everything and cleaned up (child processes stopped,
        # embedded servers removed); a traceback would say nothing more.
        print("eventcore-trio: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except StoreConnectionError as exc:
        print(f"eventcore-trio: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except LeadershipUnavailable as exc:
        # reset and dead-letters replay both need the projection stopped: same code, and
        # advice in terms of this command line rather than the Python API.
        print(
            f"eventcore-trio: projection {exc.name!r} is running on a host (see "
            "`eventcore-trio status`); stop the hosts that run it, then try again",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except ProjectionNotFound as exc:
        print(f"eventcore-trio: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except UnsupportedPooling as exc:
        print(f"eventcore-trio: {_pooling_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (ConfigurationError, EventCoreError) as exc:
        print(f"eventcore-trio: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
