"""The host program (`run_host`, behind `eventcore-trio run`): waits for its database, and
says what it does: a FATAL unit stopped once, a line per dead letter."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import trio

from eventcore_trio import NewEvent, ProjectionState
from eventcore_trio.postgres import open_postgres_store
from eventcore_trio.projection import wait_for_projections
from eventcore_trio.testing import EmbeddedPostgres

from ..cli_projectors import picky
from ..helpers import dsn_environment

ROOT = Path(__file__).parent.parent.parent
RUN = (sys.executable, "-m", "eventcore_trio.cli", "run")


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


async def test_run_stops_a_fatal_unit_once_and_logs_each_dead_letter(
    own_server: EmbeddedPostgres,
) -> None:
    """`counter` fails FATAL on every event (its table refuses every row): the host says so
    once, with one traceback, and leaves it failed; `picky` skips a bad event with a
    WARNING line and goes on following new events."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    async with open_postgres_store(own_server.dsn, schema=schema) as store:
        await store.admin.execute(
            "CREATE TABLE public.cli_counted (event_id uuid PRIMARY KEY CHECK (false))"
        )
        await store.append("s", [NewEvent("E", {"bad": True})])
        process = await trio.lowlevel.open_process(
            [*RUN, "tests.cli_projectors:ALL", "--schema", schema],
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env=dsn_environment(own_server.dsn),
        )
        assert process.stderr is not None
        stderr = bytearray()
        try:
            await _read_until(process.stderr, b"unit counter stopped: FATAL failure", stderr)
            await _read_until(process.stderr, b"into a dead letter", stderr)
            # The host lives on: picky follows a new event.
            written = await store.append("s", [NewEvent("E", {"bad": False})])
            await wait_for_projections(store, [picky], written, timeout=30)
            status = {s.name: s for s in await store.projection_status()}
            assert status["counter"].state is ProjectionState.FAILED
            assert (status["counter"].leader, status["counter"].standbys) == (None, 0)
            assert status["picky"].state is ProjectionState.RUNNING
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                assert await process.wait() == 0
            while chunk := await process.stderr.receive_some():
                stderr.extend(chunk)
        finally:
            process.kill()
            await process.wait()
            await process.stderr.aclose()
    text = stderr.decode()
    assert text.count("stopped: FATAL failure") == 1, text
    # One traceback (with its chained causes), ending in the ProjectionFailed it was for.
    assert text.count("\neventcore_trio.ProjectionFailed: ") == 1, text
    assert "retry" not in text, text
    [dead_letter] = [line for line in text.splitlines() if "into a dead letter" in line]
    assert dead_letter.startswith("WARNING eventcore_trio.projection: unit picky: skipped event ")
    assert dead_letter.endswith(", stream s) into a dead letter: ValueError: bad event")
