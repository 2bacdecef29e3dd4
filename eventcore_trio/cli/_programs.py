"""The commands that run programs of their own: ``demo``, ``torture``, ``dashboard`` and
``bench``."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from typing import Any, TextIO

from .._errors import ConfigurationError
from .._tools._processes import run_program
from ._options import DSN_VARIABLE, EXIT_FAILED, EXIT_OK, EXIT_USAGE, StoreOptions
from ._parser import bench_available


def _ignored_dsn_note(args: argparse.Namespace, command: str, stream: TextIO) -> None:
    # getting-started has people export EVENTCORE_DSN for the other commands: say why this
    # one does not use it, so that nobody wonders where the events went.
    if args.dsn is None and not getattr(args, "memory", False) and os.environ.get(DSN_VARIABLE):
        print(
            f"note: {command} ignores {DSN_VARIABLE} and starts an embedded server; pass "
            "--dsn to run on a database of yours",
            file=stream,
            flush=True,
        )


def demo(args: argparse.Namespace) -> int:
    """``eventcore-trio demo``: on the memory store, a DSN, or an embedded PostgreSQL."""
    from ..demo import demo_main

    _ignored_dsn_note(args, "demo", sys.stdout)
    return demo_main(args.dsn, memory=args.memory, scale=args.transfers, duration=args.duration)


def torture(args: argparse.Namespace) -> int:
    from ..torture import DEFAULT_DURATION, QUICK_DURATION, FaultKind, run_torture

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
    _ignored_dsn_note(args, "torture", stream)

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


def dashboard(options: StoreOptions, args: argparse.Namespace, projectors: list[Any]) -> None:
    """``eventcore-trio dashboard``: serve until interrupted."""
    try:
        from ..dashboard import run_dashboard
    except ImportError as exc:
        raise ConfigurationError(str(exc)) from exc

    run_program(
        functools.partial(
            run_dashboard,
            options.open,
            bind=args.bind,
            allow_actions=args.allow_actions,
            projectors=projectors,
            allowed_hosts=args.allowed_host,
            action_token_file=args.action_token_file,
            on_ready=lambda urls: print(
                f"dashboard at {', '.join(urls)} (Ctrl-C to stop)", flush=True
            ),
        )
    )


def bench(rest: list[str]) -> int:
    # The harness lives in the repository (benchmarks/), not in the installed package.
    import subprocess

    if not bench_available():
        print(
            "eventcore-trio: bench runs the benchmark harness (the benchmarks package), which "
            "is not installed with eventcore-trio: run it from the root of a clone of the "
            "eventcore-trio repository (`uv run eventcore-trio bench`)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return subprocess.call([sys.executable, "-m", "benchmarks", *rest])
