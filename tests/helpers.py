"""Waiting helpers for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from eventcore_trio import StoreConnectionError
from eventcore_trio.postgres import DSN_ENVIRONMENT_VARIABLE
from eventcore_trio.torture._report import Findings


def start_interruptible(argv: list[str], **popen: Any) -> subprocess.Popen[str]:
    """Start *argv* with text pipes and SIGINT at its default, ready to be sent Ctrl-C.

    A test runner may start us with SIGINT ignored, which children would inherit, and then
    a Python child never turns it into KeyboardInterrupt.
    """
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **popen,
    )


LEADER_SCRIPT = Path(__file__).parent / "postgres" / "leader_process.py"


def dsn_environment(dsn: str) -> dict[str, str]:
    """This process's environment with *dsn* in ``EVENTCORE_DSN``: how a child process gets
    its DSN, which holds the test server's password (a command line, unlike the environment,
    is visible to every local account)."""
    return {**os.environ, DSN_ENVIRONMENT_VARIABLE: dsn}


@asynccontextmanager
async def leader_process(
    dsn: str, schema: str, name: str
) -> AsyncIterator[tuple[trio.Process, int]]:
    """A process that leads *name* until killed; yields it and its lock session's backend pid."""
    process = await trio.lowlevel.open_process(
        [sys.executable, str(LEADER_SCRIPT), schema, name],
        stdout=subprocess.PIPE,
        env=dsn_environment(dsn),
    )
    try:
        assert process.stdout is not None
        output = b""
        with trio.fail_after(30):
            while not output.endswith(b"\n"):
                chunk = await process.stdout.receive_some()
                assert chunk, "the leader process exited early"
                output += chunk
        line = output.decode()
        assert line.startswith("acquired"), line
        yield process, int(line.split()[1])
    finally:
        process.kill()
        await process.wait()
        assert process.stdout is not None
        await process.stdout.aclose()


async def until_it_works(call: Callable[[], Awaitable[object]], *, within: float = 30) -> int:
    """Retry *call* while it raises StoreConnectionError (a server or network coming back).

    Returns how many attempts failed first; fails after *within* seconds.
    """
    failures = 0
    with trio.fail_after(within):
        while True:
            try:
                await call()
            except StoreConnectionError:
                failures += 1
                await trio.sleep(0.05)
            else:
                return failures


async def eventually(predicate: Callable[[], Awaitable[bool]], *, within: float = 10) -> None:
    """Wait until *predicate* holds, checking every 20 ms, or fail after *within* seconds.

    Only for state outside this process (rows and locks in PostgreSQL, another process's
    progress), for which no event can be awaited; in-process state uses trio.Event.
    """
    with trio.fail_after(within):
        while not await predicate():  # noqa: ASYNC110
            await trio.sleep(0.02)


#: What ``eventcore-trio torture --json`` promises at least (issue 5's list).
TORTURE_REPORT_FIELDS = (
    "events",
    "faults",
    "lost",
    "duplicated",
    "checkpoint_regressions",
    "double_leaders",
    "failover_ms_p50",
    "failover_ms_p99",
    "recovered_after_db_restart",
    # Issue 24: every write path, the reactor, the outbox and an independent follower.
    "events_by_path",
    "reactions_missing",
    "reactions_repeated",
    "outbox_mismatches",
    "follower_missed",
    "follower_repeated",
)


def clean_findings(events: int) -> Findings:
    """A verification that found nothing wrong in *events* events."""
    zeros = {f.name: 0 for f in attrs.fields(Findings) if f.name != "events"}
    return Findings(events=events, **zeros)
