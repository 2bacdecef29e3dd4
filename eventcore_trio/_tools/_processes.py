"""Child processes that announce readiness on stdout: demo hosts, benchmark and test hosts."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import IO, TypeVar, TypeVarTuple, Unpack

import trio

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


async def run_ready_process(
    argv: Sequence[str],
    *,
    ready: bytes = b"ready",
    startup_limit: float = 60,
    stop_grace: float = 0,
    stderr: int | IO[bytes] | None = None,
    env: Mapping[str, str] | None = None,
    task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run *argv* until it exits or this task is cancelled; for ``nursery.start``.

    ``nursery.start`` returns the `trio.Process` once its stdout has shown *ready* (within
    *startup_limit* seconds). On cancellation the process gets SIGTERM and *stop_grace*
    seconds to exit cleanly (0: none), then SIGKILL; it is always reaped and its pipe closed,
    shielded from cancellation. Its stderr goes to *stderr* (default: this process's). *env*
    adds to this process's environment: pass secrets such as a DSN with a password there, never
    in *argv*, which every user of the machine can read (``ps``).

    Raises:
        RuntimeError: the process exited before it was ready.
        trio.TooSlowError: it was not ready within *startup_limit*.
    """
    environment = None if env is None else {**os.environ, **env}
    process = await trio.lowlevel.open_process(
        list(argv), stdout=subprocess.PIPE, stderr=stderr, env=environment
    )
    assert process.stdout is not None
    try:
        output = b""
        with trio.fail_after(startup_limit):
            while ready not in output:
                chunk = await process.stdout.receive_some()
                if not chunk:
                    raise RuntimeError(f"{argv[:3]} exited before it was ready")
                output += chunk
        task_status.started(process)
        await process.wait()
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None and stop_grace > 0:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(stop_grace):
                    await process.wait()
            process.kill()
            await process.wait()
            await process.stdout.aclose()


def run_program(async_fn: Callable[[Unpack[Ts]], Awaitable[T]], *args: *Ts) -> T:
    """``trio.run`` for our programs (CLI, demo, host processes): Ctrl-C at checkpoints only.

    By default Trio raises KeyboardInterrupt wherever the signal lands, which under load is
    often inside trio-asyncio's loop or asyncpg's protocol callbacks; observed here: the
    interrupt swallowed, ``TrioInternalError``, and once a segfault. Delivered at a checkpoint
    of the main task instead, it cancels everything in order (docs/operations.md, "Ctrl-C").
    """
    return trio.run(async_fn, *args, restrict_keyboard_interrupt_to_checkpoints=True)
