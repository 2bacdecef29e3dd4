"""The host's restart policy, in virtual time: backoff that grows, and starts over when healthy."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from eventcore_trio import NewEvent, RecordedEvent
from eventcore_trio.memory import MemoryStore, open_memory_store
from eventcore_trio.projection import (
    ProjectionConfig,
    ProjectionContext,
    projector,
    run_projections,
)

CONFIG = ProjectionConfig(
    restart_initial_backoff=1.0, restart_max_backoff=8.0, restart_reset_after=60.0
)


async def _attempts_within(store: MemoryStore, seconds: float, handler: object) -> int:
    attempts = 0

    @projector("unlucky")
    async def unlucky(event: RecordedEvent, ctx: ProjectionContext) -> None:
        nonlocal attempts
        attempts += 1
        assert callable(handler)
        handler()

    with trio.move_on_after(seconds):
        await run_projections(store, [unlucky], CONFIG)
    return attempts


class TestRestartBackoff:
    """A projector that fails at once every time backs off up to the cap."""

    async def test_backoff_grows_for_a_projector_that_always_fails(
        self, autojump_clock: trio.testing.MockClock
    ) -> None:
        """Failures at 0, 1, 3, 7, 15, 23, 31, 39 s: eight attempts in 40 s, not forty."""

        def fail() -> None:
            raise RuntimeError("always")

        async with open_memory_store() as store:
            await store.append("s", [NewEvent("A", {})])
            attempts = await _attempts_within(store, 40.5, fail)
        assert attempts == 8

    async def test_a_lock_lost_again_and_again_backs_off_too(
        self, autojump_clock: trio.testing.MockClock
    ) -> None:
        """Leadership lost during every batch: the first loss retries at once, then backoff."""
        async with open_memory_store() as store:
            await store.append("s", [NewEvent("A", {})])
            attempts = await _attempts_within(
                store, 40.5, lambda: store.admin.revoke_leadership("unlucky")
            )
        # 0, 0 (first loss: straight back), then 1, 2, 4, 8, 8, 8 s apart: 0,0,1,3,7,15,23,31,39.
        assert attempts == 9

    @pytest.mark.parametrize("healthy_for", [59.0, 61.0])
    async def test_backoff_starts_over_only_after_a_healthy_run(
        self, autojump_clock: trio.testing.MockClock, healthy_for: float
    ) -> None:
        """A run that lasted restart_reset_after seconds resets the delay; a shorter one not."""
        async with open_memory_store() as store:
            failures: list[float] = []

            @projector("flaky")
            async def flaky(event: RecordedEvent, ctx: ProjectionContext) -> None:
                failures.append(trio.current_time())
                if len(failures) == 4:
                    # The fourth run lives a while before failing.
                    await trio.sleep(healthy_for)
                raise RuntimeError("flaky")

            await store.append("s", [NewEvent("A", {})])
            with trio.move_on_after(200):
                await run_projections(store, [flaky], CONFIG)
        gap = failures[4] - failures[3] - healthy_for
        # After three quick failures the delay is 8 s (capped); after a healthy run, 1 s.
        assert gap == pytest.approx(1.0 if healthy_for >= 60 else 8.0)
