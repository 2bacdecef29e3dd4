"""The command line's parser: what each command takes, and its help."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Any

from .. import __version__
from ._options import (
    DASHBOARD_TOKEN_VARIABLE,
    add_explicit_dsn,
    add_log_format,
    add_log_level,
    add_store_options,
    seconds,
    whole_number,
)


def _add_demo_command(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="run the bank-account demo (embedded PostgreSQL unless --dsn or --memory)",
        description="Concurrent transfers as commands; three projector host processes compete "
        "for leadership and the leader is killed part-way; then the read model is verified "
        "against the event streams. Exits 0 only if the verification holds. Runs on an "
        "embedded PostgreSQL unless --dsn is given on the command line (EVENTCORE_DSN is "
        "ignored).",
    )
    add_explicit_dsn(demo, why="so that the demo never writes to a database by surprise")
    demo.add_argument("--memory", action="store_true", help="use the in-memory store")
    demo.add_argument(
        "--duration",
        type=seconds,
        default=30.0,
        help="seconds of transfers on PostgreSQL (default: 30); the leader dies part-way",
    )
    demo.add_argument(
        "--transfers",
        type=whole_number(1),
        default=150,
        help="transfers per writer with --memory (default: 150)",
    )


def _add_torture_command(commands: Any) -> None:
    from ..torture import FaultKind

    torture = commands.add_parser(
        "torture",
        help="inject faults under load and verify nothing was lost or applied twice",
        description="Writers and projector host processes run while faults are injected on a "
        "seeded schedule: SIGKILL and SIGTERM of the leader, pg_terminate_backend of lock and "
        "pooled sessions, network drops and stalls, and server restarts and crashes when the "
        "server is embedded (no --dsn). Then the event log is checked against the read model "
        "and the evidence the projection committed. Exits 0 only if nothing was lost, "
        "duplicated or regressed, there were never two leaders, and every fault was recovered. "
        "Runs on an embedded PostgreSQL unless --dsn is given on the command line "
        "(EVENTCORE_DSN is ignored: faults go only to a database named explicitly).",
    )
    add_explicit_dsn(torture, why="so that faults are never injected into a database by surprise")
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
        + ", ".join(kind.value for kind in FaultKind),
    )
    torture.add_argument(
        "--json", action="store_true", help="print the report as one JSON object on stdout"
    )


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
    add_store_options(migrate)
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
        type=whole_number(2, 1024),
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
    add_store_options(status)
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
    add_store_options(dashboard)
    add_log_level(dashboard, default="WARNING")
    add_log_format(dashboard)
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


def _add_query_command(commands: Any) -> None:
    from ._query import DEFAULT_LIMIT, MAX_LIMIT, event_type, position, tag

    query = commands.add_parser(
        "query",
        help="print the events of some types and tags, as a decision reads them",
        description="Read the events matching one query item (one of the --type values, any "
        "type without one; every --tag value) in the global order: each event's position, "
        "stream, version, type, tags and data, then the position up to which the read is "
        "complete (pass it to --after to read on). Give --type or --tag: a query matching "
        "every event would hold every append back while it reads. The read takes the "
        "query's locks for its statement, as a decision's read does: appends of matching "
        "events wait for it (docs/operations.md, 'Reading events by tags').",
    )
    add_store_options(query)
    query.add_argument(
        "--type",
        dest="types",
        metavar="TYPE",
        type=event_type,
        action="append",
        default=[],
        help="an event type the events may have (repeat for several: any of them)",
    )
    query.add_argument(
        "--tag",
        dest="tags",
        metavar="TAG",
        type=tag,
        action="append",
        default=[],
        help="a tag the events must carry (repeat for several: all of them)",
    )
    query.add_argument(
        "--limit",
        metavar="N",
        type=whole_number(1, MAX_LIMIT),
        default=DEFAULT_LIMIT,
        help=f"at most N events (default: {DEFAULT_LIMIT}; at most {MAX_LIMIT:,}: the read "
        "holds matching appends back while it runs, so page with --after)",
    )
    query.add_argument(
        "--after",
        metavar="POSITION",
        type=position,
        help="only events after this position (as printed: 1234:5), such as the position an "
        "earlier query was complete up to",
    )
    query.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object: {"events": [...], "position": ...}',
    )


def _add_reset_command(commands: Any) -> None:
    reset = commands.add_parser(
        "reset",
        help="make a projection rebuild from the beginning",
        description="Forget a projection's checkpoint and dead letters; its next run "
        "rebuilds it. Refused while it runs: stop its hosts first. With --wait, stay and show "
        "the rebuild's progress once hosts run it again.",
    )
    add_store_options(reset)
    reset.add_argument("name", help="the projection's name")
    reset.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    reset.add_argument(
        "--wait",
        action="store_true",
        help="then follow the rebuild (run by your hosts) with a progress bar until caught up",
    )


def _add_version_commands(commands: Any) -> None:
    versions = commands.add_parser(
        "versions",
        help="show which version of a projection serves, and the changelog of switches",
        description="The version whose read model serves reads, every version with its role "
        "(serving, building with its progress, superseded, withdrawn), and each switch of "
        "the serving version: when, from which version to which, at which position, why.",
    )
    add_store_options(versions)
    versions.add_argument("name", help="the projection's name (without a version)")
    versions.add_argument("--json", action="store_true", help="print JSON")
    serve = commands.add_parser(
        "serve",
        help="make a version of a projection serve now (back to a retained one too)",
        description="Switch the serving version by hand, whether it caught up or not. "
        "Versions above it are withdrawn: they stop and never take over on their own. A "
        "version switched back to applies events again once a host runs it; until then its "
        "read model is as old as its checkpoint.",
    )
    add_store_options(serve)
    serve.add_argument("name", help="the projection's name (without a version)")
    serve.add_argument("version", type=whole_number(1), help="the version to serve")
    serve.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    retire = commands.add_parser(
        "retire",
        help="drop a version of a projection that does not serve",
        description="Drop a version's checkpoints, dead letters, recorded partition count and "
        "read-model schema. Refused for the serving version (switch first) and while a unit "
        "of it runs (a superseded version's units stop on their own: --wait waits for that).",
    )
    add_store_options(retire)
    retire.add_argument("name", help="the projection's name (without a version)")
    retire.add_argument("version", type=whole_number(1), help="the version to drop")
    retire.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    retire.add_argument(
        "--wait", action="store_true", help="wait until no unit of that version runs"
    )


def _add_run_command(commands: Any) -> None:
    run = commands.add_parser(
        "run",
        help="host the projectors a module defines (like an ASGI server hosts an app)",
        description="Import MODULE:ATTR (a projector, a list of projectors, or a function "
        "returning them) and run them until SIGINT or SIGTERM. Says first which database and "
        "schema it uses; at INFO it logs leadership (leading, took over, handed off).",
    )
    add_store_options(run)
    add_log_level(run, default="INFO")
    add_log_format(run)
    run.add_argument("target", metavar="MODULE:ATTR", help="where the projectors are")


def _add_bench_command(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="run the benchmark harness (only in a clone of the repository)",
        description="Runs `python -m benchmarks` with the remaining arguments; see its --help. "
        "The harness is in the repository, not in the installed package: run it from a clone.",
        add_help=False,
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER)


def _add_dead_letters_command(commands: Any) -> None:
    letters = commands.add_parser(
        "dead-letters", help="list or replay the events a projection skipped"
    )
    letter_commands = letters.add_subparsers(dest="letters_command", required=True)
    listing = letter_commands.add_parser("list", help="list a projection's dead letters")
    add_store_options(listing)
    listing.add_argument("name", help="the projection's name")
    listing.add_argument("--json", action="store_true", help="print JSON")
    replay = letter_commands.add_parser(
        "replay", help="apply a projection's dead letters again (stop its hosts first)"
    )
    add_store_options(replay)
    replay.add_argument("name", help="the projection's name")
    replay.add_argument(
        "--projectors", required=True, metavar="MODULE:ATTR", help="where the projector is"
    )


def _add_forget_commands(commands: Any) -> None:
    from ._forget import subject

    forget = commands.add_parser(
        "forget",
        help="forget a data subject's personal data, for good (crypto-shredding)",
        description="Delete the subject's data key: its events stay and stay readable, "
        "without their personal fields, in every process. In the same transaction a "
        "SubjectForgotten event is appended (projections erase what they derived on it), the "
        "snapshots of the subject's streams are deleted and the forget is recorded (when, "
        "host, pid, position of the event). Forgetting a forgotten subject again prints the "
        "first record and changes nothing. Needs no key-encryption key "
        "(docs/personal-data.md).",
    )
    add_store_options(forget)
    forget.add_argument(
        "subject",
        metavar="SUBJECT",
        type=subject,
        help="the subject's id, as its events were appended with (after -- if it starts with -)",
    )
    forget.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    forget.add_argument("--json", action="store_true", help="print the record as JSON")
    forgotten = commands.add_parser(
        "forgotten",
        help="list the forgotten subjects: when, by which host and process",
        description="The audit of forgets, oldest first: when each subject was forgotten, the "
        "host and process id that forgot it, and the position of its SubjectForgotten event. "
        "With SUBJECT, that subject's record only; exit 1 if it has not been forgotten.",
    )
    add_store_options(forgotten)
    forgotten.add_argument(
        "subject",
        metavar="SUBJECT",
        type=subject,
        nargs="?",
        help="only this subject (exit 1 if not forgotten)",
    )
    forgotten.add_argument("--json", action="store_true", help="print JSON")


def bench_available() -> bool:
    """Whether ``python -m benchmarks`` here would run this repository's harness: the
    current directory is a clone (the harness is not in the installed package)."""
    sys.path.insert(0, os.getcwd())
    try:
        spec = importlib.util.find_spec("benchmarks")
    except (ImportError, ValueError):
        spec = None
    finally:
        sys.path.pop(0)
    # Another project's `benchmarks` package is not ours: look for our harness in it.
    places = (spec.submodule_search_locations or []) if spec is not None else []
    return any(os.path.isfile(os.path.join(place, "_harness.py")) for place in places)


def parser() -> argparse.ArgumentParser:
    """The whole command line: one subparser per command, built by a function each."""
    main = argparse.ArgumentParser(
        prog="eventcore-trio",
        description="Trio-native event sourcing on PostgreSQL.",
    )
    main.add_argument("--version", action="version", version=f"eventcore-trio {__version__}")
    commands = main.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo_command(commands)
    _add_torture_command(commands)
    _add_migrate_command(commands)
    _add_status_command(commands)
    _add_query_command(commands)
    _add_reset_command(commands)
    _add_version_commands(commands)
    _add_dashboard_command(commands)
    _add_run_command(commands)
    if bench_available():
        # Listed only where it can run; elsewhere `eventcore-trio bench` still says why not.
        _add_bench_command(commands)
    _add_dead_letters_command(commands)
    _add_forget_commands(commands)
    return main
