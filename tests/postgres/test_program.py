"""The host program (`run_host`, behind `eventcore-trio run`): waits for its database."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import trio

from eventcore_trio.testing import EmbeddedPostgres

from ..helpers import dsn_environment

ROOT = Path(__file__).parent.parent.parent


async def _read_until(stream: trio.abc.ReceiveStream, marker: bytes, seen: bytearray) -> None:
    with trio.fail_after(60):
        while marker not in seen:
            chunk = await stream.receive_some()
            assert chunk, f"the stream ended before {marker!r}: {bytes(seen)!r}"
            seen.extend(chunk)


async def test_run_started_before_its_database_comes_up_when_it_starts(
    own_server: EmbeddedPostgres,
) -> None:
    """`eventcore-trio run` against a stopped server waits, then hosts once the server starts."""
    own_server.stop()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "eventcore_trio.cli",
            "run",
            "tests.cli_projectors:ALL",
            "--schema",
            schema,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=dsn_environment(own_server.dsn),
    )
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        await _read_until(process.stderr, b"cannot open the store", bytearray())
        assert process.returncode is None
        await trio.to_thread.run_sync(own_server.start)
        await _read_until(process.stdout, b"hosting counter, picky", bytearray())
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()
        await process.stdout.aclose()
        await process.stderr.aclose()
