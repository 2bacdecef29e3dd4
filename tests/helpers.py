"""Waiting helpers for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import attrs
import trio

from eventcore_trio import NewEvent, StoreConnectionError
from eventcore_trio._tools._processes import run_ready_process
from eventcore_trio.postgres import DSN_ENVIRONMENT_VARIABLE, PostgresStore
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
    "deadlocks",
)


def clean_findings(events: int) -> Findings:
    """A verification that found nothing wrong in *events* events."""
    zeros = {f.name: 0 for f in attrs.fields(Findings) if f.name != "events"}
    return Findings(events=events, **zeros)


#: A host process running the projectors named on its command line (`RecordingHosts`).
RECORDING_HOST = Path(__file__).parent / "postgres" / "recording_host.py"


async def create_applied_table(store: PostgresStore) -> str:
    """A new application schema with the ``applied`` table the recording hosts write; its
    name."""
    app = f"app_{uuid.uuid4().hex[:10]}"
    await store.admin.execute(
        f'CREATE SCHEMA "{app}"; '
        f'CREATE TABLE "{app}".applied (id bigserial PRIMARY KEY, projection text NOT NULL, '
        "partition int, partitions int NOT NULL, stream_id text NOT NULL, version bigint NOT NULL, "
        "event_id uuid NOT NULL, pid int NOT NULL)"
    )
    return app


async def append_orders(store: PostgresStore, stop: trio.Event) -> None:
    """Append to 30 order streams, one event every 5 ms, until *stop* is set."""
    n = 0
    while not stop.is_set():
        await store.append(f"order-{n % 30}", [NewEvent("Placed", {"n": n})])
        n += 1
        await trio.sleep(0.005)


async def caught_up(store: PostgresStore, projections: Iterable[str]) -> bool:
    """Whether every unit of *projections* has a checkpoint and no lag."""
    names = set(projections)
    status = [s for s in await store.projection_status() if s.name in names]
    return all(s.checkpoint is not None and s.lag_events == 0 for s in status)


class RecordingHosts:
    """Host processes of one test running `RECORDING_HOST`, started and killed by the test;
    with *logs*, each one's stderr goes to a file there (see `said`)."""

    def __init__(
        self, nursery: trio.Nursery, dsn: str, schema: str, app: str, logs: Path | None = None
    ) -> None:
        self._nursery = nursery
        self._dsn = dsn
        self._argv = [sys.executable, str(RECORDING_HOST), schema, app]
        self._logs = logs
        self.processes: dict[int, trio.Process] = {}
        # pid -> the projection names it runs
        self.runs: dict[int, set[str]] = {}
        self._stderr: dict[int, Path] = {}
        self._files: list[IO[bytes]] = []

    async def start(self, *specs: str) -> int:
        """Start a host running *specs* (``NAME`` or ``NAME:PARTITIONS``); its pid once ready."""
        file = None
        if self._logs is not None:
            log = self._logs / f"host-{len(self.runs)}.log"
            file = log.open("wb")
            self._files.append(file)
        process: trio.Process = await self._nursery.start(
            lambda task_status: run_ready_process(
                [*self._argv, *specs],
                env={DSN_ENVIRONMENT_VARIABLE: self._dsn},
                stderr=file,
                startup_limit=60,
                task_status=task_status,
            )
        )
        self.processes[process.pid] = process
        self.runs[process.pid] = {spec.partition(":")[0] for spec in specs}
        if file is not None:
            self._stderr[process.pid] = log
        return process.pid

    def kill(self, pid: int) -> None:
        """SIGKILL host *pid*."""
        self.processes.pop(pid).kill()

    def said(self, pid: int) -> str:
        """What host *pid* wrote to its stderr so far (needs *logs*)."""
        return self._stderr[pid].read_text()

    def close(self) -> None:
        """Close the stderr files."""
        for file in self._files:
            file.close()
