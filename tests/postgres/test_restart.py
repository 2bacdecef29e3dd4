"""A database restart or crash while a store is open: clear errors, then recovery."""

from __future__ import annotations

import pytest
import trio

from eventcore_trio import StoreConnectionError, open_postgres_store
from eventcore_trio.testing import EmbeddedPostgres, events, read_all


async def _until_it_works(store_call: object) -> int:
    failures = 0
    with trio.fail_after(30):
        while True:
            try:
                await store_call()  # type: ignore[operator]
            except StoreConnectionError:
                failures += 1
                await trio.sleep(0.1)
            else:
                return failures


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
            await _until_it_works(lambda: store.append("s", events("After"), expected_version=1))
            assert [e.type for e in await read_all(store)] == ["Before", "After"]
            async with store.try_acquire("proj") as again:
                assert again.is_held
