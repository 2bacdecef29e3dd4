"""The ``eventcore-trio`` command.

Exit codes: 0 success (``run``: stopped by SIGTERM), 1 the command ran and found a problem (a
failed verification, a projection that is not found or is running, a version to retire that
serves, dead letters that failed again, a queried event that does not decode, a subject to
forget with no personal data, a subject asked about that is not forgotten), 2 bad usage or
configuration (a ``run`` target that cannot be loaded, lock sessions behind transaction
pooling, a query without criteria, an invalid subject id), 3 the database could not be
reached, 130 interrupted (Ctrl-C, SIGINT), after a clean shutdown.

`main` turns the command line into one call and any error into its exit code; the commands
live by family: `_options` (what every command shares, the store options among them),
`_parser` (every command's arguments and help), `_status`, `_query` (``query``), `_admin`
(``migrate``, ``reset``, ``run``, ``dead-letters``), `_versions` (``versions``, ``serve``,
``retire``), `_forget` (``forget``, ``forgotten``), `_programs` (``demo``, ``torture``,
``dashboard``, ``bench``) and `_projectors` (``MODULE:ATTR``).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence

from .._errors import (
    EventCoreError,
    LeadershipUnavailable,
    ProjectionNotFound,
    StoreConnectionError,
    UnsupportedPooling,
)
from .._tools._processes import run_program
from . import _admin, _forget, _programs, _query, _versions
from ._options import DASHBOARD_TOKEN_VARIABLE as DASHBOARD_TOKEN_VARIABLE
from ._options import DEFAULT_STATEMENT_CACHE_SIZE as DEFAULT_STATEMENT_CACHE_SIZE
from ._options import DSN_VARIABLE as DSN_VARIABLE
from ._options import EXIT_FAILED as EXIT_FAILED
from ._options import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from ._options import EXIT_OK as EXIT_OK
from ._options import EXIT_UNREACHABLE as EXIT_UNREACHABLE
from ._options import EXIT_USAGE as EXIT_USAGE
from ._options import LOG_FORMAT_VARIABLE as LOG_FORMAT_VARIABLE
from ._options import LOG_LEVEL_VARIABLE as LOG_LEVEL_VARIABLE
from ._options import SCHEMA_VARIABLE as SCHEMA_VARIABLE
from ._options import SESSION_DSN_VARIABLE as SESSION_DSN_VARIABLE
from ._options import STATEMENT_CACHE_VARIABLE as STATEMENT_CACHE_VARIABLE
from ._options import StoreOptions, configure_logging, pooling_message
from ._parser import parser
from ._projectors import load_projectors as load_projectors
from ._query import build_query
from ._status import status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _programs.bench(argv[1:])
    args = parser().parse_args(argv)
    # Lines as they are printed, also into a pipe or a file (a service's journal): what a
    # host says comes in order with what it logs, and before the process dies.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    configure_logging(getattr(args, "log_level", "WARNING"), getattr(args, "log_format", "text"))
    try:
        return _command(args)
    except KeyboardInterrupt:
        # Trio has already cancelled everything and cleaned up (child processes stopped,
        # embedded servers removed); a traceback would say nothing more.
        print("eventcore-trio: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EventCoreError as exc:
        code, message = _failure(exc)
        print(f"eventcore-trio: {message}", file=sys.stderr)
        return code


def _command(args: argparse.Namespace) -> int:
    # Every command but bench (run before parsing: its arguments are the harness's own).
    command = args.command
    if command == "demo":
        return _programs.demo(args)
    if command == "torture":
        return _programs.torture(args)
    if command == "migrate" and args.print:
        return _admin.print_grants(args)
    options = StoreOptions.from_args(args)
    if command == "migrate":
        return run_program(_admin.migrate, options, args.grant, args.partition_index)
    if command == "status":
        run_program(status, options, args.json)
    elif command == "query":
        event_query = build_query(args.types, args.tags)
        return run_program(_query.query, options, event_query, args.after, args.limit, args.json)
    elif command == "reset":
        if not _admin.confirm_reset(args.name, args.yes):
            return EXIT_FAILED
        run_program(_admin.reset, options, args.name, args.wait)
    elif command == "versions":
        return run_program(_versions.versions, options, args.name, args.json)
    elif command == "serve":
        question = f"Make version {args.version} of {args.name!r} serve reads now?"
        if not _versions.confirm(question, "not switched", args.yes):
            return EXIT_FAILED
        return run_program(_versions.serve, options, args.name, args.version)
    elif command == "retire":
        question = (
            f"Retire version {args.version} of {args.name!r} (its checkpoints, dead letters "
            "and read model are dropped)?"
        )
        if not _versions.confirm(question, "not retired", args.yes):
            return EXIT_FAILED
        return run_program(_versions.retire, options, args.name, args.version, args.wait)
    elif command == "dashboard":
        projectors = load_projectors(args.projectors) if args.projectors else []
        _programs.dashboard(options, args, projectors)
    elif command == "run":
        return run_program(_admin.run, options, load_projectors(args.target))
    elif command == "forget":
        question = _forget.forget_question(options, args.subject)
        if not _versions.confirm(question, "not forgotten", args.yes):
            return EXIT_FAILED
        return run_program(_forget.forget, options, args.subject, args.json)
    elif command == "forgotten":
        return run_program(_forget.forgotten, options, args.subject, args.json)
    elif command == "dead-letters":
        if args.letters_command == "list":
            run_program(_admin.list_letters, options, args.name, args.json)
        else:
            return run_program(_admin.replay_letters, options, args.name, args.projectors)
    return EXIT_OK


def _failure(exc: EventCoreError) -> tuple[int, str]:
    """The exit code of *exc*, and what to tell the user."""
    if isinstance(exc, StoreConnectionError):
        return EXIT_UNREACHABLE, str(exc)
    if isinstance(exc, LeadershipUnavailable):
        # reset and dead-letters replay both need the projection stopped: same code, and
        # advice in terms of this command line rather than the Python API.
        return EXIT_FAILED, (
            f"projection {exc.name!r} is running on a host (see `eventcore-trio status`); "
            "stop the hosts that run it, then try again"
        )
    if isinstance(exc, ProjectionNotFound):
        return EXIT_FAILED, str(exc)
    if isinstance(exc, UnsupportedPooling):
        return EXIT_USAGE, pooling_message(exc)
    # ConfigurationError and any other: the command was asked for what it cannot do.
    return EXIT_USAGE, str(exc)
