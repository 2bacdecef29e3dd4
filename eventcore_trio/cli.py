"""The ``eventcore-trio`` command.

Exit codes: 0 success (``run``: stopped by SIGTERM), 1 the command ran and found a problem (a
failed verification, a projection that is not found or is running, dead letters that failed
again), 2 bad usage or configuration, 3 the database could not be reached, 130 interrupted
(Ctrl-C, SIGINT), after a clean shutdown.

About 500 lines: one short function per subcommand to build its parser and one to run it,
kept together so that the whole command line, its messages and its exit codes read in one place.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import trio

from ._concurrency import run_program
from ._errors import (
    ConfigurationError,
    DeadLetterNotFound,
    EventCoreError,
    LeadershipUnavailable,
    PartitionsMismatch,
    ProjectionNotFound,
    StoreConnectionError,
)
from ._status import ProjectionState, status_json

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130  # as shells report a SIGINT


def _add_dsn(parser: argparse.ArgumentParser, *, schema: bool = True) -> None:
    parser.add_argument(
        "--dsn",
        default=os.environ.get("EVENTCORE_DSN"),
        help="PostgreSQL DSN (default: the EVENTCORE_DSN environment variable)",
    )
    if schema:
        parser.add_argument(
            "--schema", default="eventcore", help="the store's schema (default: eventcore)"
        )


def _add_demo_command(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="run the bank-account demo (embedded PostgreSQL unless --dsn or --memory)",
        description="Concurrent transfers as commands; three projector host processes compete "
        "for leadership and the leader is killed part-way; then the read model is verified "
        "against the event streams. Exits 0 only if the verification holds.",
    )
    _add_dsn(demo, schema=False)
    demo.add_argument("--memory", action="store_true", help="use the in-memory store")
    demo.add_argument(
        "--duration",
        type=float,
        default=30.0,
        help="seconds of transfers on PostgreSQL (default: 30); the leader dies part-way",
    )
    demo.add_argument(
        "--transfers",
        type=int,
        default=150,
        help="transfers per writer with --memory (default: 150)",
    )


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
    _add_dsn(torture, schema=False)
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


def _add_migrate_command(commands: Any) -> None:
    migrate = commands.add_parser(
        "migrate",
        help="create or upgrade the schema",
        description="Create or upgrade the event store schema; safe to run concurrently.",
    )
    _add_dsn(migrate)


def _add_status_command(commands: Any) -> None:
    status = commands.add_parser(
        "status",
        help="show every projection: state, leader, checkpoint, lag, errors",
        description="One line per projection; what holds every reader back, if anything.",
    )
    _add_dsn(status)
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
    _add_dsn(dashboard)
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
        "from the page (each asks for confirmation)",
    )
    dashboard.add_argument(
        "--projectors",
        metavar="MODULE:ATTR",
        help="the projectors whose dead letters the page may replay (with --allow-actions)",
    )


def _add_reset_command(commands: Any) -> None:
    reset = commands.add_parser(
        "reset",
        help="make a projection rebuild from the beginning",
        description="Forget a projection's checkpoint and dead letters; its next run "
        "rebuilds it. Refused while it runs: stop its hosts first. With --wait, stay and show "
        "the rebuild's progress once hosts run it again.",
    )
    _add_dsn(reset)
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
    _add_dsn(run)
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
    _add_dsn(listing)
    listing.add_argument("name", help="the projection's name")
    listing.add_argument("--json", action="store_true", help="print JSON")
    replay = letter_commands.add_parser(
        "replay", help="apply a projection's dead letters again (stop its hosts first)"
    )
    _add_dsn(replay)
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
        ConfigurationError: the target cannot be imported or names nothing usable.
    """
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"expected MODULE:ATTR, got {target!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    finally:
        sys.path.pop(0)
    try:
        value = getattr(module, attribute)
    except AttributeError as exc:
        raise ConfigurationError(f"{module_name!r} has no attribute {attribute!r}") from exc
    if callable(value) and not hasattr(value, "name"):
        value = value()
    projectors = list(value) if isinstance(value, list | tuple) else [value]
    if not projectors:
        raise ConfigurationError(f"{target} names no projectors")
    return projectors


def _require_dsn(dsn: str | None) -> str:
    if not dsn:
        raise ConfigurationError("no database given: pass --dsn or set EVENTCORE_DSN")
    return dsn


async def _migrate(dsn: str, schema: str) -> None:
    from .postgres import LATEST_SCHEMA_VERSION, open_postgres_store

    async with open_postgres_store(dsn, schema=schema, migrate=True):
        print(f"schema {schema!r} is at version {LATEST_SCHEMA_VERSION}")


async def _dashboard(
    dsn: str, schema: str, bind: str, allow_actions: bool, projectors: list[Any]
) -> None:
    try:
        from .dashboard import serve_dashboard
        from .dashboard._serve import check_bind
    except ImportError as exc:
        raise ConfigurationError(str(exc)) from exc
    from .postgres import open_postgres_store

    check_bind(bind)
    async with (
        open_postgres_store(dsn, schema=schema, migrate=False) as store,
        trio.open_nursery() as nursery,
    ):
        urls = await nursery.start(
            functools.partial(
                serve_dashboard,
                store,
                bind=bind,
                allow_actions=allow_actions,
                projectors=projectors,
            )
        )
        print(f"dashboard at {', '.join(urls)} (Ctrl-C to stop)", flush=True)


async def _status(dsn: str, schema: str, as_json: bool) -> None:
    from .postgres import open_postgres_store

    async with open_postgres_store(dsn, schema=schema, migrate=False) as store:
        records = await store.projection_status()
    if as_json:
        print(
            json.dumps(
                [status_json(r) for r in records],
                indent=2,
            )
        )
        return
    header = (
        f"{'projection':24} {'state':8} {'leader':22} {'checkpoint':18} "
        f"{'lag':>8} {'lag s':>7} {'dead':>5}"
    )
    print(header)
    shown: set[tuple[str, int]] = set()
    for r in records:
        if r.partition is not None and (r.name, r.partitions) not in shown:
            # A partitioned projection: one summary line, then its partitions under it (per
            # partition count: during a change of count, the new count's units are listed
            # too, awaiting the split).
            units = [u for u in records if (u.name, u.partitions) == (r.name, r.partitions)]
            led = sum(1 for u in units if u.leader is not None)
            print(
                f"{r.name:24} {f'{led}/{r.partitions} led':>8} {'':22} {'':18} "
                f"{sum(u.lag_events for u in units):>8} "
                f"{max(u.lag_seconds for u in units):>7.1f} "
                f"{sum(u.dead_letters for u in units):>5}"
            )
        shown.add((r.name, r.partitions))
        leader = "-" if r.leader is None else f"{r.leader.pid}@{r.leader.host}"
        label = r.name if r.partition is None else f"  [{r.partition}/{r.partitions}]"
        print(
            f"{label:24} {r.state.value:8} {leader:22} {r.checkpoint or '-'!s:18} "
            f"{r.lag_events:>8} {r.lag_seconds:>7.1f} {r.dead_letters:>5}"
        )
        if r.last_error:
            print(f"    last error: {r.last_error}")
        if r.state is ProjectionState.AWAITING_SPLIT:
            print(
                f"    runs once no unit of {r.name}'s recorded partition count runs "
                "(hosts running the old count lead those meanwhile)"
            )
        if r.unrunnable:
            lacking = ", ".join(f"{h.pid}@{h.host}" for h in r.lacking_hosts)
            print(f"    no live host runs it (lacking: {lacking})")
    if not records:
        print("(no projection has run against this store)")
    hosts = Counter(f"{r.leader.pid}@{r.leader.host}" for r in records if r.leader is not None)
    if hosts:
        print("units led per host: " + ", ".join(f"{h} {n}" for h, n in sorted(hosts.items())))
    held = records[0].held_back_by if records else None
    if held is not None:
        print(
            f"reads held back by transaction of pid {held.pid} ({held.application_name!r}, "
            f"{held.state}, since {held.started_at}): {held.query}"
        )


async def _reset(dsn: str, schema: str, name: str, follow: bool) -> None:
    from .postgres import open_postgres_store

    async with open_postgres_store(dsn, schema=schema, migrate=False) as store:
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


async def _run(dsn: str, schema: str, projectors: list[Any]) -> int:
    from .postgres import open_postgres_store
    from .projection import run_host

    names = ", ".join(p.name for p in projectors)
    return await run_host(
        functools.partial(open_postgres_store, dsn, schema=schema),
        projectors,
        on_ready=lambda: print(f"hosting {names}; SIGINT or SIGTERM stops", flush=True),
        on_stop=lambda received: print(f"received {received.name}; stopping", flush=True),
    )


async def _list_letters(dsn: str, schema: str, name: str, as_json: bool) -> None:
    from .postgres import open_postgres_store

    async with open_postgres_store(dsn, schema=schema, migrate=False) as store:
        letters = await store.dead_letters(name)
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
    for d in letters:
        print(
            f"{d.position}  {d.event.stream_id}  {d.event.type}  {d.error_type}: {d.error_message}"
        )
    print(f"{len(letters)} dead letter(s) for {name!r}")


async def _replay_letters(dsn: str, schema: str, name: str, target: str) -> int:
    from .postgres import open_postgres_store
    from .projection import replay_dead_letters

    chosen = [p for p in load_projectors(target) if getattr(p, "name", None) == name]
    if not chosen:
        raise ConfigurationError(f"{target} defines no projector named {name!r}")
    async with open_postgres_store(dsn, schema=schema, migrate=False) as store:
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
        dsn = _require_dsn(args.dsn)
        if args.command == "migrate":
            run_program(_migrate, dsn, args.schema)
        elif args.command == "status":
            run_program(_status, dsn, args.schema, args.json)
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
            run_program(_reset, dsn, args.schema, args.name, args.wait)
        elif args.command == "dashboard":
            projectors = load_projectors(args.projectors) if args.projectors else []
            run_program(_dashboard, dsn, args.schema, args.bind, args.allow_actions, projectors)
        elif args.command == "run":
            projectors = load_projectors(args.target)
            return run_program(_run, dsn, args.schema, projectors)
        elif args.command == "dead-letters":
            if args.letters_command == "list":
                run_program(_list_letters, dsn, args.schema, args.name, args.json)
            else:
                return run_program(_replay_letters, dsn, args.schema, args.name, args.projectors)
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
    except (ConfigurationError, EventCoreError) as exc:
        print(f"eventcore-trio: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
