"""The contract of `Store.try_acquire`: one leader per name, released on exit, exception
and cancellation, and a lost lock reported."""

from __future__ import annotations

import pytest
import trio

from ..._errors import (
    LeadershipUnavailable,
)
from ..._protocols import Store
from .._harness import BackendHarness


class LeadershipContract:
    """Leadership: exclusive, released however the block ends, loss reported."""

    # -- leadership --------------------------------------------------------------------

    async def test_leadership_acquired_and_exclusive(self, store: Store) -> None:
        """A held name cannot be acquired again; other names can."""
        async with store.try_acquire("proj") as leadership:
            assert leadership.is_held
            assert leadership.name == "proj"
            with pytest.raises(LeadershipUnavailable) as info:
                async with store.try_acquire("proj"):
                    pytest.fail("two leaders for one name")
            assert info.value.name == "proj"
            async with store.try_acquire("other") as other:
                assert other.is_held

    async def test_leadership_exclusive_across_stores(self, harness: BackendHarness) -> None:
        """Two stores on the same database (two processes, say) never both lead a name."""
        async with harness.open_store() as first, harness.open_store() as second:
            async with first.try_acquire("proj"):
                with pytest.raises(LeadershipUnavailable):
                    async with second.try_acquire("proj"):
                        pytest.fail("two leaders for one name")
            async with second.try_acquire("proj") as leadership:
                assert leadership.is_held

    async def test_leadership_released_on_exit(self, store: Store) -> None:
        """Leaving the block releases the name for the next leader."""
        async with store.try_acquire("proj") as leadership:
            pass
        assert not leadership.is_held
        async with store.try_acquire("proj") as again:
            assert again.is_held

    async def test_leadership_released_on_exception(self, store: Store) -> None:
        """An exception in the block releases the name and propagates unchanged."""

        class Boom(Exception):
            pass

        with pytest.raises(Boom):
            async with store.try_acquire("proj"):
                raise Boom
        async with store.try_acquire("proj") as again:
            assert again.is_held

    async def test_leadership_released_on_cancellation(self, store: Store) -> None:
        """Cancelling the task that leads releases the name."""
        acquired = trio.Event()

        async def lead() -> None:
            async with store.try_acquire("proj"):
                acquired.set()
                await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lead)
            await acquired.wait()
            nursery.cancel_scope.cancel()
        async with store.try_acquire("proj") as again:
            assert again.is_held

    async def test_lost_leadership_is_reported(self, store: Store, harness: BackendHarness) -> None:
        """When the lock's session ends from outside, the leader learns it and the name frees."""
        async with store.try_acquire("proj") as leadership:
            await harness.end_leadership_session(store, leadership)
            with trio.fail_after(5):
                await leadership.wait_lost()
            assert not leadership.is_held
            async with store.try_acquire("proj") as successor:
                assert successor.is_held
