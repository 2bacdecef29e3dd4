"""One call shape: `run_projection` and `replay_dead_letters` take the store first.

The projector-first order of 0.3 still works for one release, with a `DeprecationWarning`
pointing at the caller; arguments that fit neither order raise `InvalidArgument`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio

from eventcore_trio import InvalidArgument, NewEvent, RecordedEvent, Store, open_memory_store
from eventcore_trio.projection import (
    Failure,
    FailureStrategy,
    ProjectionContext,
    projector,
    replay_dead_letters,
    run_projection,
)

RUN_WARNING = (
    r"pass the store first: run_projection\(store, projector\); the old order is removed in 0\.5"
)
REPLAY_WARNING = (
    r"pass the store first: replay_dead_letters\(store, projector\); "
    r"the old order is removed in 0\.5"
)


class Counter:
    """A class-based projector that records the versions it applied (a batch that fails is
    applied again, hence a set); it fails (skipped into a dead letter) on events marked bad
    until it is fixed."""

    name = "counter"

    def __init__(self) -> None:
        self.applied: set[int] = set()
        self.fixed = False

    async def apply(self, event: RecordedEvent, ctx: ProjectionContext) -> None:
        if event.data.get("bad") and not self.fixed:
            raise ValueError("bad event")
        self.applied.add(event.stream_version)

    def on_error(self, failure: Failure) -> FailureStrategy:
        return FailureStrategy.SKIP


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    async with open_memory_store() as opened:
        await opened.append("s", [NewEvent("E", {}), NewEvent("E", {"bad": True})])
        yield opened


async def test_the_store_first_runs_without_a_warning(store: Store) -> None:
    """``run_projection(store, projector)``: the suite turns any warning into an error."""
    counter = Counter()
    result = await run_projection(store, counter)
    assert (result.events_applied, counter.applied) == (1, {1})
    counter.fixed = True
    replayed = await replay_dead_letters(store, counter)
    assert (replayed.replayed, replayed.failed, counter.applied) == (1, 0, {1, 2})


async def test_the_old_order_still_runs_and_warns_at_the_caller(store: Store) -> None:
    counter = Counter()
    with pytest.warns(DeprecationWarning, match=RUN_WARNING) as run_warnings:
        result = await run_projection(counter, store)  # type: ignore[arg-type]
    assert (result.events_applied, counter.applied) == (1, {1})
    counter.fixed = True
    with pytest.warns(DeprecationWarning, match=REPLAY_WARNING) as replay_warnings:
        replayed = await replay_dead_letters(counter, store)  # type: ignore[arg-type]
    assert (replayed.replayed, counter.applied) == (1, {1, 2})
    # The stacklevel names this file, where the call in the old order is, not the library.
    assert [w.filename for w in [*run_warnings, *replay_warnings]] == [__file__, __file__]


async def test_the_old_order_of_a_decorated_function_warns(store: Store) -> None:
    seen: set[int] = set()

    @projector("decorated")
    async def decorated(event: RecordedEvent, ctx: ProjectionContext) -> None:
        seen.add(event.stream_version)

    with pytest.warns(DeprecationWarning, match=RUN_WARNING):
        await run_projection(decorated, store)  # type: ignore[arg-type]
    assert seen == {1, 2}


async def test_the_old_order_through_nursery_start_warns(store: Store) -> None:
    counter = Counter()
    with pytest.warns(DeprecationWarning, match=RUN_WARNING):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_projection, counter, store)
    assert counter.applied == {1}
    counter.fixed = True
    with pytest.warns(DeprecationWarning, match=REPLAY_WARNING):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replay_dead_letters, counter, store)  # type: ignore[arg-type]
    assert counter.applied == {1, 2}


async def test_the_new_order_through_nursery_start(store: Store) -> None:
    counter = Counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_projection, store, counter)
    assert counter.applied == {1}


Call = Callable[[object, object], Awaitable[Any]]
FUNCTIONS: list[tuple[str, Call]] = [
    ("run_projection", run_projection),  # type: ignore[list-item]
    ("replay_dead_letters", replay_dead_letters),  # type: ignore[list-item]
]


@pytest.mark.parametrize(("name", "function"), FUNCTIONS, ids=[n for n, _ in FUNCTIONS])
async def test_two_stores_are_refused(store: Store, name: str, function: Call) -> None:
    async with open_memory_store() as other:
        with pytest.raises(InvalidArgument, match=rf"{name}\(store, projector\) got two stores"):
            await function(store, other)


@pytest.mark.parametrize(("name", "function"), FUNCTIONS, ids=[n for n, _ in FUNCTIONS])
async def test_two_projectors_are_refused(store: Store, name: str, function: Call) -> None:
    with pytest.raises(InvalidArgument) as info:
        await function(Counter(), Counter())
    message = str(info.value)
    assert f"{name}(store, projector) takes a store first" in message
    assert "got projector 'counter', then projector 'counter'" in message
    assert await store.load_checkpoint("counter") is None


@pytest.mark.parametrize(("name", "function"), FUNCTIONS, ids=[n for n, _ in FUNCTIONS])
async def test_a_string_is_refused_in_either_place(store: Store, name: str, function: Call) -> None:
    with pytest.raises(InvalidArgument, match=r"takes a store first .*got 'eventcore' \(str\)"):
        await function("eventcore", Counter())
    with pytest.raises(InvalidArgument, match=r"'counter' is not a projector|not a projector"):
        await function(store, "counter")
    # A string where the projector would be in the old order: neither order fits.
    with pytest.raises(
        InvalidArgument,
        match=rf"{name}\(store, projector\) takes the store first, then the projector; "
        r"got 'counter' \(str\), then a store \(MemoryStore\): .* is not a projector",
    ):
        await function("counter", store)
    assert await store.load_checkpoint("counter") is None


async def test_a_broken_projector_in_the_old_order_says_what_is_wrong(store: Store) -> None:
    """It is not mistaken for the old order: the projector's own defect is named."""

    class SyncApply:
        name = "sync"

        def apply(self, event: RecordedEvent, ctx: ProjectionContext) -> None:
            pass

    with pytest.raises(InvalidArgument, match=r"projector 'sync' needs an `async def apply"):
        await run_projection(SyncApply(), store)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"projector 'sync' needs an `async def apply"):
        await run_projection(store, SyncApply())
