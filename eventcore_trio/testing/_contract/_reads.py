"""The contract of `Store.read_events`: the global order, the exclusive cursor, filters
applied before the limit, late commits never skipped, and positions that round-trip."""

from __future__ import annotations

import fnmatch
import uuid
from collections.abc import Sequence
from functools import partial

import hypothesis
import trio
from hypothesis import strategies as st

from ..._errors import (
    InvalidArgument,
)
from ..._events import NewEvent, RecordedEvent
from ..._filters import EventFilter
from ..._positions import Position
from ..._protocols import Store
from .._harness import BackendHarness
from ._support import PROPERTY_SETTINGS, events, follow_until, read_all


class ReadContract:
    """Global reads: gap-free commit order, paging and filters, and positions."""

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

    async def test_tag_filter_needs_every_tag_and_applies_before_limit(self, store: Store) -> None:
        """An event passes a tag filter when it carries every one of its tags (and maybe
        more), however many events without them come first; tags combine with types, prefix
        and pattern by AND, and `last_position` honours them."""
        await store.append("noise", [NewEvent("A", {}, tags=["x"]) for _ in range(12)])
        await store.append(
            "shop/order-1",
            [
                NewEvent("A", {"n": 1}, tags=["x", "y"]),
                NewEvent("B", {"n": 2}, tags=["z", "y", "x"]),
                NewEvent("A", {"n": 3}, tags=["y"]),
                NewEvent("A", {"n": 4}),
            ],
        )
        await store.append("other/order-2", [NewEvent("A", {"n": 5}, tags=["x", "y"])])
        await store.append("noise", events("A"))
        both = EventFilter(tags=["y", "x"])
        page = await store.read_events(None, limit=3, filter=both)
        assert [e.data["n"] for e in page] == [1, 2, 5]
        assert page[1].tags == ("x", "y", "z")
        typed = await read_all(store, filter=EventFilter(tags=["x", "y"], event_types=["A"]))
        assert [e.data["n"] for e in typed] == [1, 5]
        scoped = EventFilter(tags=["y"], stream_prefix="shop/", stream_pattern="*order-?")
        assert [e.data["n"] for e in await read_all(store, filter=scoped)] == [1, 2, 3]
        assert await store.last_position(both) == page[-1].position
        assert await store.last_position(EventFilter(tags=["x", "absent"])) is None

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

    @PROPERTY_SETTINGS
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
