"""The backend contract suite: one test per promise of the four protocols.

Subclass `StoreContract` in a test module and provide a ``harness`` fixture returning a
`BackendHarness`; pytest collects every contract for that backend::

    class TestMyBackend(StoreContract):
        @pytest.fixture
        def harness(self) -> BackendHarness:
            return MyHarness()

The suite covers what EventCore's 27 contract tests cover, plus the hazards of DESIGN.md
section 6: late commits, concurrent writers under a polling reader, a lock session that is
killed, release on cancellation and on exceptions, bad input refused with nothing written, and
property-based checks of appends and filters.

Long on purpose: the suite reads as the specification of the protocols, one test per promise,
grouped by protocol; split across files it would be harder to see what a backend must do.
"""

from __future__ import annotations

import datetime as dt
import enum
import fnmatch
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import hypothesis
import pytest
import trio
import trio.lowlevel
from hypothesis import strategies as st

from .._errors import (
    CheckpointAhead,
    CheckpointConflict,
    DeadLetterNotFound,
    DuplicateEventId,
    EventEncodeError,
    InvalidArgument,
    LeadershipUnavailable,
    VersionConflict,
)
from .._events import NewEvent, RecordedEvent, StreamAppend
from .._filters import EventFilter
from .._positions import Position, position_parts
from .._protocols import Leadership, SnapshotStore, Store
from .._snapshots import Snapshot
from .._validation import MAX_EVENT_JSON_BYTES
from ._harness import BackendHarness


def events(*types: str, **data: Any) -> list[NewEvent]:
    """Build NewEvents of the given types, each with *data*."""
    return [NewEvent(t, dict(data)) for t in types]


async def read_all(
    store: Store,
    *,
    after: Position | None = None,
    filter: EventFilter | None = None,
    page_size: int = 100,
) -> list[RecordedEvent]:
    """Read every visible event after *after*, page by page."""
    result: list[RecordedEvent] = []
    while True:
        page = await store.read_events(after, limit=page_size, filter=filter)
        result.extend(page)
        if len(page) < page_size:
            return result
        after = page[-1].position


async def follow_until(
    store: Store, done: trio.Event, seen: list[RecordedEvent], *, limit: int = 100
) -> None:
    """Poll `read_events` from the start into *seen* until *done* is set and all is read.

    A polling reader, as a projection is: it keeps reading after *done* until a read that
    began after *done* was set finds nothing more, so nothing committed before *done* is missed.

    .. versionadded:: 0.2
    """
    cursor: Position | None = None
    while True:
        finished = done.is_set()
        page = await store.read_events(cursor, limit=limit)
        seen.extend(page)
        if page:
            cursor = page[-1].position
        elif finished:
            return
        else:
            await trio.lowlevel.checkpoint()


_hypothesis = hypothesis.settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
)


@pytest.mark.trio
class StoreContract:
    """The contract every backend satisfies; subclass it and provide a ``harness`` fixture.

    .. versionadded:: 0.1
    """

    @pytest.fixture
    def harness(self) -> BackendHarness:
        """Override in the subclass: the backend under test."""
        raise NotImplementedError("provide a `harness` fixture returning a BackendHarness")

    @pytest.fixture
    async def store(self, harness: BackendHarness) -> AsyncIterator[Store]:
        """A store opened through the harness for the whole test."""
        async with harness.open_store() as store:
            yield store

    # -- append and read_stream -----------------------------------------------------------

    async def test_append_then_read_stream_returns_events_in_order(self, store: Store) -> None:
        """Appended events come back in order with versions 1..n and every field intact."""
        event_id = uuid.uuid4()
        await store.append(
            "order-1",
            [
                NewEvent("Placed", {"total": 12.5, "items": ["a", "b"]}, metadata={"by": "u1"}),
                NewEvent("Paid", {"ok": True, "nested": {"n": None}}, event_id=event_id),
            ],
        )
        stream = await store.read_stream("order-1")
        assert [(e.stream_version, e.type) for e in stream] == [(1, "Placed"), (2, "Paid")]
        assert stream[0].data == {"total": 12.5, "items": ["a", "b"]}
        assert stream[0].metadata == {"by": "u1"}
        assert stream[1].data == {"ok": True, "nested": {"n": None}}
        assert stream[1].event_id == event_id
        assert all(e.stream_id == "order-1" for e in stream)
        assert all(e.recorded_at.utcoffset() is not None for e in stream)
        assert stream[0].position < stream[1].position

    async def test_append_returns_last_position_and_version(self, store: Store) -> None:
        """AppendResult carries the last event's position and the stream's new version."""
        result = await store.append("s", events("A", "B", "C"))
        stream = await store.read_stream("s")
        assert result.position == stream[-1].position
        assert result.stream_versions == {"s": 3}

    async def test_missing_stream_reads_empty(self, store: Store) -> None:
        """A stream that was never written reads as an empty list."""
        assert await store.read_stream("never-written") == []

    async def test_read_stream_after_version(self, store: Store) -> None:
        """read_stream(after_version=n) returns only versions above n."""
        await store.append("s", events("A", "B", "C"))
        assert [e.stream_version for e in await store.read_stream("s", after_version=1)] == [2, 3]
        assert await store.read_stream("s", after_version=3) == []

    async def test_streams_are_isolated(self, store: Store) -> None:
        """Events appended to one stream never appear in another."""
        await store.append("a", events("A1", "A2"))
        await store.append("b", events("B1"))
        assert [e.type for e in await store.read_stream("a")] == ["A1", "A2"]
        assert [e.type for e in await store.read_stream("b")] == ["B1"]
        assert [e.stream_version for e in await store.read_stream("b")] == [1]

    async def test_expected_version_zero_requires_new_stream(self, store: Store) -> None:
        """expected_version=0 succeeds on a new stream and conflicts on an existing one."""
        await store.append("s", events("A"), expected_version=0)
        with pytest.raises(VersionConflict) as info:
            await store.append("s", events("B"), expected_version=0)
        assert (info.value.stream_id, info.value.expected, info.value.actual) == ("s", 0, 1)
        assert len(await store.read_stream("s")) == 1

    async def test_expected_version_exact_match(self, store: Store) -> None:
        """expected_version=n succeeds only when the stream has exactly n events."""
        await store.append("s", events("A", "B"))
        await store.append("s", events("C"), expected_version=2)
        with pytest.raises(VersionConflict) as info:
            await store.append("s", events("D"), expected_version=2)
        assert info.value.actual == 3
        with pytest.raises(VersionConflict) as info:
            await store.append("new", events("X"), expected_version=1)
        assert info.value.actual == 0
        assert [e.type for e in await store.read_stream("s")] == ["A", "B", "C"]
        assert await store.read_stream("new") == []

    async def test_expected_version_none_appends_anyway(self, store: Store) -> None:
        """expected_version=None appends whatever the stream's version."""
        await store.append("s", events("A"))
        await store.append("s", events("B"), expected_version=None)
        assert len(await store.read_stream("s")) == 2

    async def test_append_atomic_writes_all_streams(self, store: Store) -> None:
        """append_atomic writes to every listed stream and reports every version."""
        result = await store.append_atomic(
            [
                StreamAppend("from", events("Debited"), expected_version=0),
                StreamAppend("to", events("Credited", "Noted"), expected_version=0),
            ]
        )
        assert result.stream_versions == {"from": 1, "to": 2}
        assert len(await store.read_stream("from")) == 1
        assert len(await store.read_stream("to")) == 2

    async def test_append_atomic_conflict_writes_nothing(self, store: Store) -> None:
        """A conflict on one stream of an atomic append writes nothing on any stream."""
        await store.append("b", events("B1"))
        with pytest.raises(VersionConflict) as info:
            await store.append_atomic(
                [
                    StreamAppend("a", events("A1"), expected_version=0),
                    StreamAppend("b", events("B2"), expected_version=0),
                ]
            )
        assert info.value.stream_id == "b"
        assert await store.read_stream("a") == []
        assert len(await store.read_stream("b")) == 1
        assert [e.type for e in await read_all(store)] == ["B1"]

    async def test_stale_read_only_participant_fails_the_append(self, store: Store) -> None:
        """A stream listed without events is still checked: if it changed, nothing is written."""
        await store.append("limits", events("LimitSet"))
        await store.append("limits", events("LimitChanged"))
        with pytest.raises(VersionConflict) as info:
            await store.append_atomic(
                [
                    StreamAppend("limits", [], expected_version=1),
                    StreamAppend("payments", events("Paid")),
                ]
            )
        assert (info.value.stream_id, info.value.expected, info.value.actual) == ("limits", 1, 2)
        assert await store.read_stream("payments") == []

    async def test_fresh_read_only_participant_allows_the_append(self, store: Store) -> None:
        """A read-only participant at the expected version lets the append through unchanged."""
        await store.append("limits", events("LimitSet"))
        result = await store.append_atomic(
            [
                StreamAppend("limits", [], expected_version=1),
                StreamAppend("payments", events("Paid")),
            ]
        )
        assert result.stream_versions == {"limits": 1, "payments": 1}
        assert len(await store.read_stream("limits")) == 1

    async def test_append_of_no_events_is_a_version_check(self, store: Store) -> None:
        """An append without events checks the version, writes nothing and has no position."""
        result = await store.append("s", [], expected_version=0)
        assert result.position is None
        assert result.stream_versions == {"s": 0}
        assert await read_all(store) == []
        with pytest.raises(VersionConflict):
            await store.append("s", [], expected_version=3)

    async def test_duplicate_event_id_writes_nothing(self, store: Store) -> None:
        """Reusing a stored event id is refused and nothing of that append is written."""
        event_id = uuid.uuid4()
        await store.append("s", [NewEvent("A", {}, event_id=event_id)])
        with pytest.raises(DuplicateEventId):
            await store.append("t", [NewEvent("B", {}), NewEvent("C", {}, event_id=event_id)])
        assert await store.read_stream("t") == []
        assert len(await read_all(store)) == 1

    async def test_concurrent_appends_to_one_stream_one_winner_per_version(
        self, store: Store
    ) -> None:
        """Of several writers expecting the same version, exactly one wins."""
        winners: list[int] = []
        conflicts: list[VersionConflict] = []

        async def writer(n: int) -> None:
            try:
                await store.append("contested", events(f"W{n}"), expected_version=0)
                winners.append(n)
            except VersionConflict as exc:
                conflicts.append(exc)

        async with trio.open_nursery() as nursery:
            for n in range(8):
                nursery.start_soon(writer, n)
        assert len(winners) == 1
        assert len(conflicts) == 7
        assert all(c.actual == 1 for c in conflicts)
        assert [e.type for e in await store.read_stream("contested")] == [f"W{winners[0]}"]

    # -- read_events -------------------------------------------------------------------

    async def test_read_events_orders_across_streams(self, store: Store) -> None:
        """The global order follows commit order across streams; positions strictly increase."""
        await store.append("a", events("1"))
        await store.append("b", events("2", "3"))
        await store.append("a", events("4"))
        everything = await read_all(store)
        assert [e.type for e in everything] == ["1", "2", "3", "4"]
        positions = [e.position for e in everything]
        assert positions == sorted(positions)
        assert len(set(positions)) == len(positions)

    async def test_read_events_cursor_is_exclusive(self, store: Store) -> None:
        """Reading after a position starts with the next event, never the same one."""
        await store.append("s", events("A", "B", "C"))
        first = await store.read_events(None, limit=1)
        rest = await store.read_events(first[0].position, limit=10)
        assert [e.type for e in first + rest] == ["A", "B", "C"]
        assert await store.read_events(rest[-1].position, limit=10) == []

    async def test_read_events_limit_pages_through_everything(self, store: Store) -> None:
        """A limit caps each page, and paging with the cursor covers every event once."""
        for n in range(7):
            await store.append(f"s{n % 3}", events(f"E{n}"))
        page = await store.read_events(None, limit=3)
        assert len(page) == 3
        assert [e.type for e in await read_all(store, page_size=2)] == [f"E{n}" for n in range(7)]

    async def test_event_type_filter_applies_before_limit(self, store: Store) -> None:
        """Non-matching events beyond the limit do not starve a type-filtered page."""
        await store.append("s", events(*["Noise"] * 12))
        await store.append("s", events("Wanted", "Noise", "Wanted"))
        page = await store.read_events(
            None, limit=5, filter=EventFilter(event_types=["Wanted", "Absent"])
        )
        assert [e.type for e in page] == ["Wanted", "Wanted"]

    async def test_prefix_filter_applies_before_limit_and_is_literal(self, store: Store) -> None:
        """A prefix matches literally (``_`` and ``%`` are not wildcards), before the limit."""
        for n in range(10):
            await store.append(f"other-{n}", events("X"))
        await store.append("acc_1", events("Match"))
        await store.append("accX1", events("NoMatch"))
        await store.append("acc%2", events("NoMatch"))
        await store.append("acc_2/sub", events("Match"))
        page = await store.read_events(None, limit=3, filter=EventFilter(stream_prefix="acc_"))
        assert [(e.stream_id, e.type) for e in page] == [("acc_1", "Match"), ("acc_2/sub", "Match")]

    async def test_pattern_filter_applies_before_limit(self, store: Store) -> None:
        """A glob pattern (``*`` crosses ``/``) filters in the store, before the limit."""
        for n in range(10):
            await store.append(f"noise-{n}", events("X"))
        for stream in ["tenant/1/order-1", "tenant/2/x/order-9", "tenant/1/invoice-1", "order-1"]:
            await store.append(stream, events("E"))
        page = await store.read_events(
            None, limit=4, filter=EventFilter(stream_pattern="tenant/*order-?")
        )
        assert [e.stream_id for e in page] == ["tenant/1/order-1", "tenant/2/x/order-9"]

    async def test_pattern_sets_and_negated_sets(self, store: Store) -> None:
        """``[...]`` and ``[!...]`` match one character in or outside a set."""
        for stream in ["acc-1", "acc-2", "acc-3", "acc-x", "acc-10"]:
            await store.append(stream, events("E"))
        page = await read_all(store, filter=EventFilter(stream_pattern="acc-[1-2x]"))
        assert [e.stream_id for e in page] == ["acc-1", "acc-2", "acc-x"]
        page = await read_all(store, filter=EventFilter(stream_pattern="acc-[!1-2]"))
        assert [e.stream_id for e in page] == ["acc-3", "acc-x"]

    async def test_prefix_and_pattern_differ(self, store: Store) -> None:
        """A prefix is literal while a pattern is a glob over the whole id."""
        for stream in ["a*b", "axb", "a*b/c"]:
            await store.append(stream, events("E"))
        by_prefix = await read_all(store, filter=EventFilter(stream_prefix="a*b"))
        assert [e.stream_id for e in by_prefix] == ["a*b", "a*b/c"]
        by_pattern = await read_all(store, filter=EventFilter(stream_pattern="a*b"))
        assert [e.stream_id for e in by_pattern] == ["a*b", "axb"]

    async def test_combined_filters_all_apply(self, store: Store) -> None:
        """Type, prefix and pattern criteria combine with AND."""
        await store.append("shop/order-1", events("Placed", "Paid"))
        await store.append("shop/cart-1", events("Placed"))
        await store.append("other/order-2", events("Placed"))
        page = await read_all(
            store,
            filter=EventFilter(
                event_types=["Placed"], stream_prefix="shop/", stream_pattern="*order-*"
            ),
        )
        assert [(e.stream_id, e.type) for e in page] == [("shop/order-1", "Placed")]

    async def test_late_commit_is_never_skipped(
        self, store: Store, harness: BackendHarness
    ) -> None:
        """An event whose transaction commits after later events were read is still read."""
        await store.append("early", events("Early"))
        seen: list[RecordedEvent] = []
        cursor: Position | None = None

        async def poll() -> None:
            nonlocal cursor
            page = await store.read_events(cursor, limit=100)
            if page:
                seen.extend(page)
                cursor = page[-1].position

        async with harness.hold_commit(store, "late", events("Late")):
            await store.append("after", events("After"))
            await poll()
            await poll()
        await poll()
        assert sorted(e.type for e in seen) == ["After", "Early", "Late"]
        assert len({e.event_id for e in seen}) == 3

    async def test_concurrent_writers_with_polling_reader(self, store: Store) -> None:
        """While many writers append, a polling reader sees every event exactly once, in order."""
        writers, per_writer = 6, 15
        done = trio.Event()
        seen: list[RecordedEvent] = []

        async def writer(w: int) -> None:
            for n in range(per_writer):
                await store.append(f"w{w}", events(f"E{w}.{n}"), expected_version=n)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(follow_until, store, done, seen, limit=7))
            async with trio.open_nursery() as writing:
                for w in range(writers):
                    writing.start_soon(writer, w)
            done.set()
        assert len(seen) == writers * per_writer
        assert len({e.event_id for e in seen}) == len(seen)
        assert [e.position for e in seen] == sorted(e.position for e in seen)
        for w in range(writers):
            mine = [e.stream_version for e in seen if e.stream_id == f"w{w}"]
            assert mine == list(range(1, per_writer + 1))

    # -- checkpoints -------------------------------------------------------------------

    async def test_missing_checkpoint_loads_none(self, store: Store) -> None:
        """A name that never saved a checkpoint loads None."""
        assert await store.load_checkpoint("nobody") is None

    async def test_checkpoint_save_and_load(self, store: Store) -> None:
        """A saved checkpoint loads back equal."""
        result = await store.append("s", events("A"))
        assert result.position is not None
        await store.save_checkpoint("p", result.position)
        assert await store.load_checkpoint("p") == result.position

    async def test_checkpoint_moves_forward(self, store: Store) -> None:
        """Saving a later position overwrites the checkpoint; saving the same one is accepted."""
        first = (await store.append("s", events("A"))).position
        second = (await store.append("s", events("B"))).position
        assert first is not None
        assert second is not None
        await store.save_checkpoint("p", first)
        await store.save_checkpoint("p", second)
        await store.save_checkpoint("p", second)
        assert await store.load_checkpoint("p") == second

    async def test_checkpoint_never_moves_backwards(self, store: Store) -> None:
        """Saving an earlier position raises CheckpointConflict and changes nothing."""
        first = (await store.append("s", events("A"))).position
        second = (await store.append("s", events("B"))).position
        assert first is not None
        assert second is not None
        await store.save_checkpoint("p", second)
        with pytest.raises(CheckpointConflict) as info:
            await store.save_checkpoint("p", first)
        assert (info.value.attempted, info.value.current) == (first, second)
        assert await store.load_checkpoint("p") == second

    async def test_checkpoints_are_independent(self, store: Store) -> None:
        """Each name has its own checkpoint."""
        first = (await store.append("s", events("A"))).position
        second = (await store.append("s", events("B"))).position
        assert first is not None
        assert second is not None
        await store.save_checkpoint("p", second)
        await store.save_checkpoint("q", first)
        assert await store.load_checkpoint("p") == second
        assert await store.load_checkpoint("q") == first

    async def test_batch_checkpoint_is_compare_and_set(self, store: Store) -> None:
        """A batch moves the checkpoint only from the position it expects; a stale writer fails."""
        first = (await store.append("s", events("A"))).position
        second = (await store.append("s", events("B"))).position
        assert first is not None
        assert second is not None
        async with store.try_acquire("p") as leadership:
            async with leadership.open_batch() as batch:
                await batch.save_checkpoint(None, first)
            with pytest.raises(CheckpointConflict) as info:
                async with leadership.open_batch() as batch:
                    await batch.save_checkpoint(None, second)  # stale: expects no checkpoint
            assert info.value.current == first
            assert await store.load_checkpoint("p") == first
            async with leadership.open_batch() as batch:
                await batch.save_checkpoint(first, second)
        assert await store.load_checkpoint("p") == second

    async def test_a_checkpoint_ahead_of_the_store_is_refused(self, store: Store) -> None:
        """A position beyond every position the store can have produced (a projection
        reading after it would skip every event) raises CheckpointAhead and saves nothing,
        from save_checkpoint and from a batch (with or without a transaction under way);
        positions the store produced are saved as before."""
        await store.append("s", events("A", "B"))
        recorded = await read_all(store)
        first, last = (e.position for e in recorded)
        tx, seq = position_parts(last)
        beyond = [Position(2**62, 5), Position(tx, seq + 10**9), Position(2**63 - 1, 2**63 - 1)]
        for position in beyond:
            with pytest.raises(CheckpointAhead) as info:
                await store.save_checkpoint("cpx", position)
            assert (info.value.name, info.value.position, info.value.stored) == (
                "cpx",
                position,
                False,
            )
            assert "not saved" in str(info.value)
            async with store.try_acquire("cpx") as leadership:
                with pytest.raises(CheckpointAhead):
                    async with leadership.open_batch() as batch:
                        await batch.save_checkpoint(None, position)
                # A write first: on PostgreSQL, the batch's transaction is then under way.
                with pytest.raises(CheckpointAhead):
                    await self._dead_letter_then_checkpoint(leadership, recorded[0], position)
            assert await store.load_checkpoint("cpx") is None
            assert await store.dead_letters("cpx") == []
        await store.save_checkpoint("cpx", first)
        async with store.try_acquire("cpx") as leadership, leadership.open_batch() as batch:
            await batch.save_checkpoint(first, last)
        assert await store.load_checkpoint("cpx") == last
        with pytest.raises(CheckpointAhead):
            await store.save_checkpoint("cpx", Position(2**62, 5))
        assert await store.load_checkpoint("cpx") == last

    @staticmethod
    async def _dead_letter_then_checkpoint(
        leadership: Leadership, event: RecordedEvent, position: Position
    ) -> None:
        async with leadership.open_batch() as batch:
            await batch.record_dead_letter(event, ValueError("x"), retries=0)
            await batch.save_checkpoint(None, position)

    # -- dead letters and partition counts ----------------------------------------------

    async def test_resolving_a_dead_letter_deletes_it_or_fails_the_batch(
        self, store: Store
    ) -> None:
        """A batch deletes its unit's own dead letter; resolving one that is not there fails
        the whole batch, so nothing of it commits."""
        await store.append("s", events("A", "B", "C"))
        first, second, third = await store.read_stream("s")

        async def skip(name: str, event: RecordedEvent) -> None:
            async with store.try_acquire(name) as leadership, leadership.open_batch() as batch:
                await batch.record_dead_letter(event, ValueError("bad"), retries=0)
                await batch.save_checkpoint(None, event.position)

        async def resolve(leadership: Leadership, *dead_letter_ids: uuid.UUID) -> None:
            # Resolves, then moves the checkpoint: both commit, or neither.
            async with leadership.open_batch() as batch:
                for dead_letter_id in dead_letter_ids:
                    await batch.resolve_dead_letter(dead_letter_id)
                await batch.save_checkpoint(first.position, third.position)

        await skip("p", first)
        await skip("q", second)
        (letter,) = await store.dead_letters("p")
        (others,) = await store.dead_letters("q")
        async with store.try_acquire("p") as leadership:
            # Another unit's letter, an id nobody has, and the same letter twice (the second
            # delete finds nothing, so the first is rolled back with it).
            for missing in ([others.id], [uuid.uuid4()], [letter.id, letter.id]):
                with pytest.raises(DeadLetterNotFound) as info:
                    await resolve(leadership, *missing)
                assert (info.value.dead_letter_id, info.value.unit) == (missing[-1], "p")
                assert await store.load_checkpoint("p") == first.position
                assert [d.id for d in await store.dead_letters("p")] == [letter.id]
            await resolve(leadership, letter.id)
            assert await store.dead_letters("p") == []
            assert await store.load_checkpoint("p") == third.position
            with pytest.raises(DeadLetterNotFound):
                await resolve(leadership, letter.id)
        assert [d.id for d in await store.dead_letters("q")] == [others.id]

    async def test_recorded_partitions_are_the_stores_not_the_callers(self, store: Store) -> None:
        """recorded_partitions is None until a projection runs, then the count it runs as."""
        assert await store.recorded_partitions("p") is None
        await store.set_partitions("p", 2)
        assert await store.recorded_partitions("p") == 2
        await store.set_partitions("p", 4)  # a split
        assert await store.recorded_partitions("p") == 4
        # A projection that checkpointed before counts were recorded has one unit.
        position = (await store.append("s", events("A"))).position
        assert position is not None
        await store.save_checkpoint("old", position)
        assert await store.recorded_partitions("old") == 1
        with pytest.raises(InvalidArgument):
            await store.recorded_partitions("p[1/4]")

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

    # -- positions ---------------------------------------------------------------------

    async def test_positions_round_trip_through_strings(self, store: Store) -> None:
        """str(position) parses back to an equal, equally hashed, equally ordered position."""
        await store.append("s", events("A", "B"))
        recorded = await read_all(store)
        for event in recorded:
            parsed = Position.parse(str(event.position))
            assert parsed == event.position
            assert hash(parsed) == hash(event.position)
        assert Position.parse(str(recorded[0].position)) < recorded[1].position

    # -- bad input ---------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("stream_id", "payload", "expected_version", "error"),
        [
            ("", {"ok": 1}, None, InvalidArgument),
            ("x" * 256, {"ok": 1}, None, InvalidArgument),
            ("bad\x00id", {"ok": 1}, None, InvalidArgument),
            ("bad\nid", {"ok": 1}, None, InvalidArgument),
            (" padded", {"ok": 1}, None, InvalidArgument),
            ("s", {"ok": 1}, -1, InvalidArgument),
            ("s", {"ok": 1}, 1.0, InvalidArgument),
            ("s", {"ok": 1}, True, InvalidArgument),
            ("s", {"bad": object()}, None, EventEncodeError),
            ("s", {"bad": math.nan}, None, EventEncodeError),
            ("s", {"bad": "nul\x00char"}, None, EventEncodeError),
            ("s", {"bad": "lone \ud800 surrogate"}, None, EventEncodeError),
            ("s", {"bad": {1, 2}}, None, EventEncodeError),
        ],
    )
    async def test_bad_append_writes_nothing(
        self,
        store: Store,
        stream_id: Any,
        payload: Any,
        expected_version: Any,
        error: type[Exception],
    ) -> None:
        """A bad stream id, version or payload raises a typed error; nothing is written."""
        await store.append("s", events("Existing"))
        batch = [NewEvent("Good", {"n": 1}), NewEvent("Maybe", payload)]
        with pytest.raises(error):
            await store.append(stream_id, batch, expected_version=expected_version)
        assert [e.type for e in await read_all(store)] == ["Existing"]

    async def test_oversized_payloads_are_refused_and_large_ones_round_trip(
        self, store: Store
    ) -> None:
        """Data or metadata over MAX_EVENT_JSON_BYTES is refused; just under it is stored."""
        await store.append("s", events("Existing"))
        # Two bytes of JSON quoting around the string, plus the key.
        wrapper = len('{"blob":""}')
        oversized = {"blob": "x" * (MAX_EVENT_JSON_BYTES - wrapper + 1)}
        for bad in (NewEvent("Big", oversized), NewEvent("Big", {}, metadata=oversized)):
            with pytest.raises(EventEncodeError, match="MAX_EVENT_JSON_BYTES"):
                await store.append("s", [NewEvent("Good", {}), bad])
        assert [e.type for e in await read_all(store)] == ["Existing"]
        largest = {"blob": "é" * ((MAX_EVENT_JSON_BYTES - wrapper) // 2)}
        await store.append("big", [NewEvent("Big", largest)])
        (stored,) = await store.read_stream("big")
        assert stored.data == largest

    async def test_deeply_nested_payload_is_an_encode_error(self, store: Store) -> None:
        """Data nested past the encoder's reach is an EventEncodeError, and nothing is written."""
        nested: dict[str, object] = {}
        for _ in range(5000):
            nested = {"n": nested}
        for payload in ({"data": nested}, {"data": {}, "metadata": nested}):
            with pytest.raises(EventEncodeError, match="nested too deeply"):
                await store.append("deep", [NewEvent("A", **payload)])  # type: ignore[arg-type]
        assert await read_all(store) == []

    async def test_bad_arguments_are_refused(self, store: Store) -> None:
        """Wrong types and malformed requests raise InvalidArgument before any I/O."""
        bad_calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.append("s", NewEvent("A", {})),  # type: ignore[arg-type]
            lambda: store.append("s", ["not an event"]),  # type: ignore[list-item]
            lambda: store.append(42, events("A")),  # type: ignore[arg-type]
            lambda: store.append_atomic([]),
            lambda: store.append_atomic(
                [StreamAppend("s", events("A")), StreamAppend("s", events("B"))]
            ),
            lambda: store.read_stream("s", after_version=-1),
            lambda: store.read_events(None, limit=0),
            lambda: store.read_events("1:2", limit=1),  # type: ignore[call-overload]
            lambda: store.save_checkpoint("p", "1:2"),  # type: ignore[arg-type]
            lambda: store.load_checkpoint(""),
            # Past PostgreSQL's bigint: refused here, not by the server.
            lambda: store.append("s", events("A"), expected_version=2**63),
            lambda: store.read_stream("s", after_version=2**63),
            lambda: store.read_events(None, limit=2**63),
        ]
        for call in bad_calls:
            with pytest.raises(InvalidArgument):
                await call()
        with pytest.raises(InvalidArgument):
            async with store.try_acquire("bad\x00name"):
                pytest.fail("acquired an invalid name")
        assert await read_all(store) == []

    @_hypothesis
    @hypothesis.given(
        stream_id=st.text(min_size=0, max_size=300),
        name=st.text(min_size=0, max_size=130),
    )
    async def test_property_any_text_is_refused_or_round_trips(
        self, harness: BackendHarness, stream_id: str, name: str
    ) -> None:
        """Any string as a stream id or a name (quotes, SQL, NUL included) is refused with
        InvalidArgument before any I/O, or stored and read back exactly."""
        async with harness.open_store() as store:
            await self._check_text(store, stream_id, name)

    @staticmethod
    async def _check_text(store: Store, stream_id: str, name: str) -> None:
        before = len(await read_all(store))
        try:
            result = await store.append(stream_id, events("E"))
        except InvalidArgument:
            assert len(await read_all(store)) == before
        else:
            # Examples share the harness's database, so the stream may hold earlier events.
            stored = (await store.read_stream(stream_id))[-1]
            assert (stored.stream_id, stored.position) == (stream_id, result.position)
        try:
            position = (await store.append("named", events("N"))).position
            assert position is not None
            await store.save_checkpoint(name, position)
        except InvalidArgument:
            return
        assert await store.load_checkpoint(name) == position

    async def test_sql_metacharacters_are_data(self, store: Store) -> None:
        """Quotes, semicolons and SQL in ids, names, types and data are stored as plain data."""
        hostile = "x'); DROP TABLE events; --\"%_*"
        await store.append(hostile, [NewEvent(hostile, {hostile: hostile})], expected_version=0)
        (event,) = await store.read_stream(hostile)
        assert (event.stream_id, event.type, event.data) == (hostile, hostile, {hostile: hostile})
        assert [e.stream_id for e in await read_all(store)] == [hostile]
        await store.save_checkpoint(hostile, event.position)
        assert await store.load_checkpoint(hostile) == event.position
        async with store.try_acquire(hostile) as leadership:
            assert leadership.is_held
        page = await store.read_events(
            None, limit=10, filter=EventFilter(stream_prefix=hostile[:5], event_types=[hostile])
        )
        assert len(page) == 1

    async def test_escaped_looking_text_is_data(self, store: Store) -> None:
        """Text that looks like a JSON escape (a backslash, then u0000) is stored as written;
        only a real NUL character is refused."""
        looks_escaped = {"s": "\\u0000", "t": "\\\\u0000x"}
        await store.append("escapes", [NewEvent("E", looks_escaped)])
        (event,) = await store.read_stream("escapes")
        assert event.data == looks_escaped
        with pytest.raises(EventEncodeError):
            await store.append("escapes", [NewEvent("E", {"s": "\\\x00"})])
        assert len(await store.read_stream("escapes")) == 1

    async def test_json_edge_values_round_trip_exactly(self, store: Store) -> None:
        """Values at the edges of JSON codecs come back exactly as appended: integers beyond
        64 bits, extreme floats, deep nesting, subclasses of the JSON types, and text that
        contains ``null``."""

        class Text(str):
            pass

        class Number(enum.IntEnum):
            ONE = 1

        deep: Any = "bottom"
        for _ in range(400):
            deep = [deep]
        data = {
            "big": 2**70,
            "small": -(2**70),
            "u64": 2**64 - 1,
            "digits": "123456789012345678901234567890",
            "float": 1e16,
            "tiny": 1.5e-320,
            "deep": deep,
            "text": Text("a str subclass"),
            "enum": Number.ONE,
            "none": None,
            "says_null": "null and void",
            "unicode": "Grüße, 世界 \U0001f600",
            "keys": {"1": "one"},
        }
        await store.append("edges", [NewEvent("E", data)])
        (event,) = await store.read_stream("edges")
        assert event.data == data
        assert type(event.data["big"]) is int
        with pytest.raises(EventEncodeError):
            await store.append("edges", [NewEvent("E", {"inf": math.inf})])
        with pytest.raises(EventEncodeError):
            await store.append("edges", [NewEvent("E", {"when": dt.datetime.now(dt.UTC)})])
        assert len(await store.read_stream("edges")) == 1

    async def test_keys_that_are_not_str_are_refused_on_every_write_path(
        self, store: Store
    ) -> None:
        """A key that is not a str, anywhere in data or metadata (JSON would turn 1 and
        "1" into one key and keep one value), raises EventEncodeError naming its path before
        anything is written: appends, atomic appends, a batch's appends (a reactor's
        ``ctx.append``) and snapshots."""
        # The issue's example, as written: True replaces 1's value in the dict itself.
        colliding = {1: "a", "1": "b", True: "c", "true": "d"}  # noqa: F601
        with pytest.raises(EventEncodeError, match=r"not a str: 1 \(int\) in data\. "):
            await store.append("dk-1", [NewEvent("E", colliding)])  # type: ignore[arg-type]

        class TaggedKey(str):
            # Two keys with the same text that the dict keeps apart.
            def __eq__(self, other: object) -> bool:
                return self is other

            __hash__ = object.__hash__

        bad: list[tuple[NewEvent, str]] = [
            (
                NewEvent("E", {"order": {"lines": [{"sku": "x", "qty": {2: 1}}]}}),
                "not a str: 2 (int) in data['order']['lines'][0]['qty']",
            ),
            (NewEvent("E", {}, metadata={"trace": {None: "x"}}), "None (NoneType) in metadata"),
            (NewEvent("E", {"rates": ({1.5: "x"},)}), "1.5 (float) in data['rates'][0]"),
            (NewEvent("E", {"pairs": {(1, 2): "x"}}), "(1, 2) (tuple) in data['pairs']"),
            (
                NewEvent("E", {"k": {TaggedKey("k"): 1, TaggedKey("k"): 2}}),
                "two keys that are both 'k' as JSON at data['k']",
            ),
        ]
        good = NewEvent("Good", {"n": 1})
        async with store.try_acquire("dk") as leadership:
            for event, message in bad:
                calls: list[Callable[[], Awaitable[object]]] = [
                    partial(store.append, "dk-2", [good, event]),
                    partial(
                        store.append_atomic,
                        [StreamAppend("dk-3", [good]), StreamAppend("dk-4", [event])],
                    ),
                    partial(self._append_in_batch, leadership, [good, event]),
                ]
                for call in calls:
                    with pytest.raises(EventEncodeError) as info:
                        await call()
                    assert message in str(info.value)
                    assert "before appending" in str(info.value)  # what to do
        if isinstance(store, SnapshotStore):
            snapshot = Snapshot("dk-5", "State", 1, 1, {"by_id": {7: "x"}})
            with pytest.raises(EventEncodeError, match=r"7 \(int\) in snapshot\['by_id'\]"):
                await store.write_snapshot(snapshot)
            assert await store.read_snapshot("dk-5", "State") is None
        assert await read_all(store) == []
        assert await store.load_checkpoint("dk") is None

    @staticmethod
    async def _append_in_batch(leadership: Leadership, events: list[NewEvent]) -> None:
        async with leadership.open_batch() as batch:
            await batch.append_atomic([StreamAppend("dk-6", events)])

    async def test_tuples_are_stored_as_lists(self, store: Store) -> None:
        """A tuple in data or metadata is a JSON array: stored whole, read back as a list
        (the decision on docs/bad-input.md); a tuple as a key is refused."""
        data = {"point": (1, 2), "nested": [("a", {"b": (True, None)})]}
        await store.append("tuples", [NewEvent("E", data, metadata={"path": ("x", "y")})])
        (event,) = await store.read_stream("tuples")
        assert event.data == {"point": [1, 2], "nested": [["a", {"b": [True, None]}]]}
        assert event.metadata["path"] == ["x", "y"]

    # -- cancellation ------------------------------------------------------------------

    async def test_cancelled_append_is_all_or_nothing(self, store: Store) -> None:
        """Cancelling appends at arbitrary moments leaves each stream whole or absent."""
        for attempt in range(20):
            with trio.move_on_after(0.0002 * attempt):
                await store.append(f"c{attempt}", events("A", "B", "C"))
        for attempt in range(20):
            assert len(await store.read_stream(f"c{attempt}")) in (0, 3)
        await store.append("after", events("Z"))
        assert [e.type for e in await store.read_stream("after")] == ["Z"]

    # -- properties --------------------------------------------------------------------

    @_hypothesis
    @hypothesis.given(
        batches=st.lists(
            st.tuples(
                st.integers(0, 3),
                st.lists(
                    st.fixed_dictionaries(
                        {
                            "n": st.integers(-(2**53), 2**53),
                            "s": st.text(
                                st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
                                max_size=8,
                            ),
                        }
                    ),
                    min_size=1,
                    max_size=4,
                ),
            ),
            min_size=1,
            max_size=6,
        )
    )
    async def test_property_appends_read_back_exactly(
        self, harness: BackendHarness, batches: list[tuple[int, list[dict[str, Any]]]]
    ) -> None:
        """Any sequence of appends reads back exactly, per stream and in the global order."""
        # Each example runs in its own Trio run, so it opens its own store.
        async with harness.open_store() as store:
            await self._check_appends_read_back(store, batches)

    @staticmethod
    async def _check_appends_read_back(
        store: Store, batches: list[tuple[int, list[dict[str, Any]]]]
    ) -> None:
        run = uuid.uuid4().hex[:8]
        expected: list[tuple[str, int, dict[str, Any]]] = []
        versions: dict[str, int] = {}
        for stream_number, payloads in batches:
            stream_id = f"{run}/s{stream_number}"
            version = versions.get(stream_id, 0)
            await store.append(
                stream_id, [NewEvent("P", p) for p in payloads], expected_version=version
            )
            for p in payloads:
                version += 1
                expected.append((stream_id, version, p))
            versions[stream_id] = version
        got = await read_all(store, filter=EventFilter(stream_prefix=f"{run}/"), page_size=3)
        assert [(e.stream_id, e.stream_version, e.data) for e in got] == expected
        for stream_id, version in versions.items():
            assert len(await store.read_stream(stream_id)) == version

    @_hypothesis
    @hypothesis.given(
        pattern=st.text(alphabet="ab/*?[]!-", min_size=1, max_size=6).filter(
            lambda p: p.strip() == p
        ),
        streams=st.lists(st.text(alphabet="ab/-", min_size=1, max_size=5), max_size=8),
    )
    async def test_property_pattern_filter_matches_fnmatch(
        self, harness: BackendHarness, pattern: str, streams: Sequence[str]
    ) -> None:
        """The store's glob filter agrees with fnmatch.fnmatchcase on every stream id."""
        async with harness.open_store() as store:
            await self._check_pattern(store, pattern, streams)

    @staticmethod
    async def _check_pattern(store: Store, pattern: str, streams: Sequence[str]) -> None:
        run = uuid.uuid4().hex[:8]
        try:
            # The run's hex prefix holds no glob syntax, so it only anchors the pattern.
            event_filter = EventFilter(stream_pattern=f"{run}{pattern}")
        except InvalidArgument:
            return
        for stream in dict.fromkeys(streams):
            await store.append(f"{run}{stream}", events("E"))
        got = {e.stream_id for e in await read_all(store, filter=event_filter)}
        assert got == {f"{run}{s}" for s in streams if fnmatch.fnmatchcase(s, pattern)}
