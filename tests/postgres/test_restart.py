"""A database restart or crash, or Ctrl-C, while a store is open: clear errors, clean exits."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import trio

from eventcore_trio import StoreConnectionError, open_postgres_store
from eventcore_trio.testing import EmbeddedPostgres, PostgresHarness, events, read_all

from ..helpers import dsn_environment, start_interruptible, until_it_works


class TestRestart:
    """The store survives the server going away and coming back."""

    @pytest.mark.parametrize("how", ["restart", "crash"])
    async def test_calls_fail_clearly_then_recover(
        self, own_server: EmbeddedPostgres, how: str
    ) -> None:
        """While the server is down calls raise StoreConnectionError; afterwards they work."""
        async with open_postgres_store(own_server.dsn) as store:
            await store.append("s", events("Before"), expected_version=0)
            async with store.try_acquire("proj") as leadership:
                if how == "crash":
                    await trio.to_thread.run_sync(own_server.kill)
                else:
                    await trio.to_thread.run_sync(own_server.stop)
                with pytest.raises(StoreConnectionError):
                    await store.append("s", events("While down"))
                with trio.fail_after(5):
                    await leadership.wait_lost()
            await trio.to_thread.run_sync(own_server.start)
            await until_it_works(lambda: store.append("s", events("After"), expected_version=1))
            assert [e.type for e in await read_all(store)] == ["Before", "After"]
            async with store.try_acquire("proj") as again:
                assert again.is_held


@pytest.mark.parametrize("attempt", range(2))
def test_ctrl_c_under_load_cancels_cleanly(harness: PostgresHarness, attempt: int) -> None:
    """KeyboardInterrupt under load comes out of the run, every time (``run_program``).

    With Trio's default delivery the interrupt sometimes lands inside trio-asyncio's or
    asyncpg's callbacks (in a quarter to three quarters of runs here, by load): swallowed,
    TrioInternalError, or a crash.
    """
    process = start_interruptible(
        [
            sys.executable,
            str(Path(__file__).parent / "busy_process.py"),
            harness.schema,
        ],
        env=dsn_environment(harness.dsn),
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "busy"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == 130, err
    assert out.strip() == "interrupted"
    assert "TrioInternalError" not in err
