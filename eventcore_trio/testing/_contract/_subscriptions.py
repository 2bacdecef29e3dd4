"""The contract of `EventReader.subscribe`: live reading by ``async for`` yields what paging
`read_events` yields (order, filters, late commits), wakes on an append and polls without one,
reads only when its consumer asks, and ends cleanly with its block or its consumer."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import trio

from ..._errors import EventDecodeError, InvalidArgument
from ..._events import NewEvent, RecordedEvent, UndecodableEvent
from ..._filters import EventFilter
from ..._positions import Position
from ..._protocols import Store
from ..._status import ProjectionStatus
from ...projection import ProjectionContext, projector, run_projection
from .._harness import BackendHarness
from ._support import events, read_all

#: Bounds every wait of these tests: a failure ends the test, a pass never waits this long.
_PATIENCE = 30


class _Spy:
    """Counts a store's reads and waits, through instance attributes over its methods.

    A subscription reads through `read_events` and waits on `wait_for_events`, so the
    counts say what it did; `until` waits for a count to be reached, without sleeping.
    """

    def __init__(
        self, store: Store, monkeypatch: pytest.MonkeyPatch, *, wake_ups: bool = True
    ) -> None:
        self.reads = 0
        self.reads_done = 0
        self.waits = 0
        self.limits: list[int] = []
        self._changed = trio.Event()
        read_events = store.read_events
        wait_for_events = store.wait_for_events

        async def counting_read(*args: Any, **kwargs: Any) -> Any:
            self.reads += 1
            self.limits.append(kwargs["limit"])
            try:
                return await read_events(*args, **kwargs)
            finally:
                self.reads_done += 1
                self._wake()

        async def counting_wait() -> None:
            self.waits += 1
            self._wake()
            if not wake_ups:
                # A store whose hints never come: only polling finds new events.
                await trio.sleep_forever()
            await wait_for_events()

        monkeypatch.setattr(store, "read_events", counting_read)
        monkeypatch.setattr(store, "wait_for_events", counting_wait)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, condition: Callable[[], bool]) -> None:
        """Return once *condition* holds (checked after every read and wait)."""
        with trio.fail_after(_PATIENCE):
            while not condition():
                await self._changed.wait()


class SubscriptionContract:
    """Live subscriptions: `read_events`' guarantees, followed as events are written."""

    async def test_subscription_yields_everything_in_order_across_pages(self, store: Store) -> None:
        """A subscription yields every event, in the global order, across many pages."""
        for n in range(7):
            await store.append(f"s{n % 3}", events(f"E{n}"))
        seen: list[RecordedEvent] = []
        with trio.fail_after(_PATIENCE):
            async with store.subscribe(page_size=2) as subscription:
                assert subscription.position is None
                async for event in subscription:
                    seen.append(event)
                    if len(seen) == 7:
                        break
        assert seen == await read_all(store)
        assert subscription.position == seen[-1].position

    async def test_subscription_resumes_from_its_position(self, store: Store) -> None:
        """`position` is the last event yielded; a subscription after it yields the rest."""
        await store.append("s", events("A", "B", "C", "D", "E"))
        first: list[RecordedEvent] = []
        with trio.fail_after(_PATIENCE):
            async with store.subscribe(page_size=2) as subscription:
                async for event in subscription:
                    first.append(event)
                    if len(first) == 3:
                        break
            # Readable after the block, and a new subscription's start until it yields.
            resume = subscription.position
            assert resume == first[-1].position
            rest: list[RecordedEvent] = []
            async with store.subscribe(resume, page_size=2) as again:
                assert again.position == resume
                async for event in again:
                    rest.append(event)
                    if len(rest) == 2:
                        break
        assert [e.type for e in first + rest] == ["A", "B", "C", "D", "E"]

    async def test_subscription_applies_its_filter(self, store: Store) -> None:
        """Only matching events are yielded, however many others lie between them."""
        await store.append("s", events(*["Noise"] * 5, "Wanted"))
        await store.append("t", events("Noise", "Wanted", *["Noise"] * 5, "Wanted"))
        wanted = EventFilter(event_types=["Wanted"])
        seen: list[RecordedEvent] = []
        with trio.fail_after(_PATIENCE):
            async with store.subscribe(filter=wanted, page_size=2) as subscription:
                async for event in subscription:
                    seen.append(event)
                    if len(seen) == 3:
                        break
        assert seen == await read_all(store, filter=wanted)
        assert [(e.stream_id, e.type) for e in seen] == [("s", "Wanted")] + [("t", "Wanted")] * 2

    async def test_a_projection_with_a_tag_filter_applies_exactly_the_tagged_events(
        self, store: Store
    ) -> None:
        """A projector declaring tags and types applies exactly the events of those types
        carrying every one of the tags, whole or in partitions (each stream's events in
        order); a catch-up run ends at the last of them; status counts lag in them only."""
        per_run: list[list[tuple[str, int]]] = []

        def course_claims(name: str, partitions: int) -> Any:
            seen: list[tuple[str, int]] = []
            per_run.append(seen)

            @projector(name, event_types=["Claimed"], tags=["course:c1"], partitions=partitions)
            async def apply(event: RecordedEvent, ctx: ProjectionContext) -> None:
                seen.append((event.stream_id, event.data["n"]))

            return apply

        async def write(streams: range) -> list[tuple[str, int]]:
            wanted = []
            for i in streams:
                stream = f"student-{i}"
                await store.append(
                    stream,
                    [
                        NewEvent("Claimed", {"n": 1}, tags=["course:c1", f"student:{i}"]),
                        NewEvent("Claimed", {"n": 2}, tags=["course:c2", f"student:{i}"]),
                        NewEvent("Left", {"n": 3}, tags=["course:c1", f"student:{i}"]),
                        NewEvent("Claimed", {"n": 4}),
                        NewEvent("Claimed", {"n": 5}, tags=["course:c1"]),
                    ],
                )
                wanted += [(stream, 1), (stream, 5)]
            # Last in the log: events the projections skip.
            await store.append("noise", [NewEvent("Claimed", {"n": 0}, tags=["course:c2"])])
            return wanted

        def lag(name: str, records: Sequence[ProjectionStatus]) -> int:
            return sum(r.lag_events for r in records if r.name == name)

        whole, split = course_claims("c1", 1), course_claims("c1-split", 2)
        first = await write(range(6))
        assert (await run_projection(store, whole)).events_applied == len(first)
        assert (await run_projection(store, split)).events_applied == len(first)
        assert per_run[0] == first
        assert sorted(per_run[1]) == sorted(first)
        for i in range(6):
            mine = [n for stream, n in per_run[1] if stream == f"student-{i}"]
            assert mine == [1, 5]

        more = await write(range(6, 9))
        records = await store.projection_status()
        assert (lag("c1", records), lag("c1-split", records)) == (len(more), len(more))
        await run_projection(store, whole)
        await run_projection(store, split)
        assert per_run[0] == first + more
        assert sorted(per_run[1]) == sorted(first + more)
        records = await store.projection_status()
        assert (lag("c1", records), lag("c1-split", records)) == (0, 0)

    async def test_event_appended_while_waiting_arrives(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A consumer waiting for the next event gets one appended meanwhile."""
        await store.append("s", events("Before"))
        spy = _Spy(store, monkeypatch)
        seen: list[RecordedEvent] = []
        with trio.fail_after(_PATIENCE):
            async with store.subscribe(poll_interval=5.0) as subscription, trio.open_nursery() as n:

                async def consume() -> None:
                    async for event in subscription:
                        seen.append(event)
                        if event.type == "Live":
                            return

                n.start_soon(consume)
                await spy.until(lambda: spy.waits >= 1)
                assert [e.type for e in seen] == ["Before"]
                await store.append("s", events("Live"))
        assert [e.type for e in seen] == ["Before", "Live"]

    async def test_subscription_polls_without_wake_ups(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """When no wake-up comes, the subscription reads again every poll interval."""
        spy = _Spy(store, monkeypatch, wake_ups=False)

        async def append_once_waiting() -> None:
            # After the subscription found nothing and began to wait: only a poll finds it.
            await spy.until(lambda: spy.waits >= 1)
            await store.append("s", events("Polled"))

        with trio.fail_after(_PATIENCE):
            async with (
                store.subscribe(poll_interval=0.01) as subscription,
                trio.open_nursery() as n,
            ):
                n.start_soon(append_once_waiting)
                event = await subscription.__anext__()
        assert event.type == "Polled"
        assert spy.waits >= 1

    async def test_subscription_reads_only_when_its_consumer_asks(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Back-pressure: one page at most is buffered, and a consumer that stops pulling
        causes no further reads, however many events are written meanwhile."""
        await store.append("s", events("A", "B", "C"))
        spy = _Spy(store, monkeypatch)
        with trio.fail_after(_PATIENCE):
            async with store.subscribe(page_size=2) as subscription:
                assert spy.reads == 0  # entering reads nothing
                assert (await subscription.__anext__()).type == "A"
                assert spy.reads == 1
                for _ in range(3):
                    await store.append("s", events("More", "More"))
                    await trio.lowlevel.checkpoint()
                assert spy.reads == 1  # the consumer stopped pulling: nothing read ahead
                assert (await subscription.__anext__()).type == "B"  # from the page held
                assert spy.reads == 1
                assert (await subscription.__anext__()).type == "C"
                assert spy.reads == 2
        assert set(spy.limits) == {2}

    async def test_cancelled_consumer_ends_cleanly(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Cancelling a consumer that waits ends it with nothing left running, and loses
        nothing: the block exits, `position` holds, a new subscription goes on from it."""
        await store.append("s", events("A"))
        spy = _Spy(store, monkeypatch)
        seen: list[RecordedEvent] = []
        with trio.fail_after(_PATIENCE):
            async with trio.open_nursery() as n:

                async def consume() -> None:
                    async with store.subscribe() as subscription:
                        async for event in subscription:
                            seen.append(event)
                    raise AssertionError("a subscription ends only when left or cancelled")

                n.start_soon(consume)
                await spy.until(lambda: spy.waits >= 1)
                n.cancel_scope.cancel()
            await store.append("s", events("B"))
            async with store.subscribe(seen[-1].position) as again:
                assert (await again.__anext__()).type == "B"
        assert [e.type for e in seen] == ["A"]

    async def test_subscription_is_used_inside_its_block(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A subscription is iterated inside its `async with` block only, by one task."""
        await store.append("s", events("A"))
        spy = _Spy(store, monkeypatch)
        subscription = store.subscribe()
        with pytest.raises(RuntimeError, match="inside its `async with` block"):
            await subscription.__anext__()
        with trio.fail_after(_PATIENCE):
            async with subscription, trio.open_nursery() as n:
                assert (await subscription.__anext__()).type == "A"
                n.start_soon(subscription.__anext__)  # waits for a second event
                await spy.until(lambda: spy.waits >= 1)
                with pytest.raises(RuntimeError, match="another task"):
                    await subscription.__anext__()
                n.cancel_scope.cancel()
        with pytest.raises(RuntimeError, match="has ended"):
            await subscription.__anext__()
        with pytest.raises(RuntimeError, match="entered once"):
            async with subscription:
                pass

    async def test_subscription_yields_a_late_commit_in_order(
        self, store: Store, harness: BackendHarness, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An event whose transaction commits after a later one is yielded, in its place in
        the global order, never skipped: the subscription reads while it is held back."""
        await store.append("early", events("Early"))
        spy = _Spy(store, monkeypatch)
        seen: list[RecordedEvent] = []
        with trio.fail_after(_PATIENCE):
            async with (
                store.subscribe(poll_interval=0.05) as subscription,
                trio.open_nursery() as n,
            ):

                async def consume() -> None:
                    async for event in subscription:
                        seen.append(event)
                        if len(seen) == 3:
                            return

                n.start_soon(consume)
                async with harness.hold_commit(store, "late", events("Late")):
                    await store.append("after", events("After"))
                    started = spy.reads
                    # A read that began once "After" had committed, while "Late" is held.
                    await spy.until(lambda: spy.reads_done > started)
        assert seen == await read_all(store)
        assert sorted(e.type for e in seen) == ["After", "Early", "Late"]
        positions = [e.position for e in seen]
        assert positions == sorted(set(positions))

    async def test_undecodable_event_raises_or_is_included(
        self, store: Store, harness: BackendHarness
    ) -> None:
        """As `read_events`: ``"raise"`` stops at an undecodable event, after yielding those
        before it, without consuming it; ``"include"`` yields it as an `UndecodableEvent`."""
        await store.append("s", events("A"))
        await harness.store_undecodable(store, "bad")
        await store.append("s", events("B"))
        with trio.fail_after(_PATIENCE):
            async with store.subscribe(page_size=10) as subscription:
                assert (await subscription.__anext__()).type == "A"
                stopped = subscription.position
                for _ in range(2):  # not consumed: the next step raises again
                    with pytest.raises(EventDecodeError):
                        await subscription.__anext__()
                    assert subscription.position == stopped
            mixed: list[RecordedEvent | UndecodableEvent] = []
            async with store.subscribe(stopped, undecodable="include") as including:
                async for event in including:
                    mixed.append(event)
                    if len(mixed) == 2:
                        break
        assert isinstance(mixed[0], UndecodableEvent)
        assert mixed[0].stream_id == "bad"
        assert isinstance(mixed[1], RecordedEvent)
        assert mixed[1].type == "B"

    @pytest.mark.parametrize(
        "arguments",
        [
            {"after": "1:1"},
            {"filter": "Wanted"},
            {"page_size": 0},
            {"page_size": True},
            {"page_size": 2**63},
            {"poll_interval": 0},
            {"poll_interval": -1.0},
            {"poll_interval": math.nan},
            {"poll_interval": math.inf},
            {"poll_interval": True},
            {"poll_interval": "1"},
            {"undecodable": "skip"},
        ],
        ids=repr,
    )
    async def test_subscribe_checks_its_arguments_before_any_io(
        self, store: Store, monkeypatch: pytest.MonkeyPatch, arguments: dict[str, Any]
    ) -> None:
        """A bad argument raises `InvalidArgument` from the call itself; nothing is read."""
        spy = _Spy(store, monkeypatch)
        options = dict(arguments)  # the parameter's dict is shared by every backend's run
        after: Position | None = options.pop("after", None)
        with pytest.raises(InvalidArgument):
            store.subscribe(after, **options)
        assert (spy.reads, spy.waits) == (0, 0)
