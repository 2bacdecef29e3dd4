"""The contract of `Store.append`, `append_atomic` and `read_stream`: versions, atomicity,
duplicate ids, concurrent writers, cancellation, and appends that read back exactly."""

from __future__ import annotations

import uuid
from typing import Any

import hypothesis
import pytest
import trio
from hypothesis import strategies as st

from ..._errors import (
    DuplicateEventId,
    VersionConflict,
)
from ..._events import NewEvent, StreamAppend
from ..._filters import EventFilter
from ..._protocols import Store
from .._harness import BackendHarness
from ._support import PROPERTY_SETTINGS, events, read_all


class AppendContract:
    """Appends and stream reads: what is written is all or nothing, in order, versioned."""

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

    @PROPERTY_SETTINGS
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
