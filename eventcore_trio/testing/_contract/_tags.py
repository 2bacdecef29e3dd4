"""The contract of tags, queries and conditional appends (dynamic consistency boundaries):
which events a query matches, the position a read is complete to, and the condition that
two overlapping decisions never both meet.

`TaggedContract` is part of `StoreContract`: both stores implement `TaggedEventStore`.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from ..._errors import AppendConditionFailed, InvalidArgument, VersionConflict
from ..._events import NewEvent
from ..._positions import Position
from ..._protocols import TaggedEventStore
from ..._queries import AppendCondition, EventQuery, QueryItem


def _claim(username: str, **data: Any) -> NewEvent:
    return NewEvent(
        "UsernameClaimed", {"username": username, **data}, tags=[f"username:{username}"]
    )


def _username(name: str) -> EventQuery:
    return EventQuery.of(types=["UsernameClaimed"], tags=[f"username:{name}"])


@pytest.mark.trio
class TaggedContract:
    """Tags, queries and conditional appends."""

    @pytest.fixture
    def store(self) -> TaggedEventStore:
        """Override in the subclass: a fresh store with `TaggedEventStore`."""
        raise NotImplementedError("provide a `store` fixture")

    async def test_tags_are_stored_sorted_and_read_back(self, store: TaggedEventStore) -> None:
        """An event's tags come back with it, distinct and sorted."""
        await store.append_tagged([NewEvent("A", {}, tags=["z", "a", "z"])], stream_id="s")
        result = await store.read_query(EventQuery.of(tags=["a"]))
        [event] = result.events
        assert event.tags == ("a", "z")
        assert event.stream_id == "s"

    async def test_an_item_matches_a_type_and_every_tag(self, store: TaggedEventStore) -> None:
        """An item matches one of its types (any when none) carrying all its tags; a query
        matches any of its items, in the global order."""
        await store.append_tagged(
            [
                NewEvent("A", {"n": 1}, tags=["x", "y"]),
                NewEvent("A", {"n": 2}, tags=["x"]),
                NewEvent("B", {"n": 3}, tags=["x", "y"]),
                NewEvent("C", {"n": 4}),
            ]
        )
        both = await store.read_query(EventQuery.of(tags=["x", "y"]))
        assert [e.data["n"] for e in both.events] == [1, 3]
        typed = await store.read_query(EventQuery.of(types=["A"], tags=["x"]))
        assert [e.data["n"] for e in typed.events] == [1, 2]
        either = await store.read_query(
            EventQuery([QueryItem(types=["C"]), QueryItem(types=["B"], tags=["y"])])
        )
        assert [e.data["n"] for e in either.events] == [3, 4]
        everything = await store.read_query(EventQuery([QueryItem()]))
        assert [e.data["n"] for e in everything.events] == [1, 2, 3, 4]

    async def test_the_position_is_where_the_read_is_complete(
        self, store: TaggedEventStore
    ) -> None:
        """The position is at or after every event returned, and every matching event
        appended after the read lies after it; a limit that cuts the read short makes it the
        last event returned; reading on from a position returns the rest."""
        empty = await store.read_query(_username("ada"))
        assert empty.events == ()
        await store.append_tagged([_claim("ada", n=1)])
        await store.append_tagged([NewEvent("Other", {})])
        result = await store.read_query(_username("ada"))
        assert len(result.events) == 1
        assert result.position is not None
        assert result.position >= result.events[-1].position
        later = await store.append_tagged([_claim("ada", n=2), _claim("ada", n=3)])
        assert later.position is not None
        assert later.position > result.position
        first = await store.read_query(_username("ada"), limit=2)
        assert [e.data["n"] for e in first.events] == [1, 2]
        assert first.position == first.events[-1].position
        rest = await store.read_query(_username("ada"), after=first.position)
        assert [e.data["n"] for e in rest.events] == [3]
        since_empty = await store.read_query(_username("ada"), after=empty.position)
        assert [e.data["n"] for e in since_empty.events] == [1, 2, 3]

    async def test_a_condition_fails_on_a_matching_event_after_the_read(
        self, store: TaggedEventStore
    ) -> None:
        """The condition holds while no matching event lies after the read's position; a
        matching event written since fails it, naming where, and nothing is written."""
        read = await store.read_query(_username("ada"))
        condition = AppendCondition(fail_if_events_match=_username("ada"), after=read.position)
        await store.append_tagged([_claim("ada")], condition=condition)
        with pytest.raises(AppendConditionFailed) as failed:
            await store.append_tagged([_claim("ada", again=True)], condition=condition)
        [position] = failed.value.positions
        assert len((await store.read_query(_username("ada"))).events) == 1
        assert position == str((await store.read_query(_username("ada"))).events[0].position)

    async def test_events_that_do_not_match_do_not_fail_it(self, store: TaggedEventStore) -> None:
        """Other usernames, other types with the same tag: the condition still holds."""
        read = await store.read_query(_username("ada"))
        await store.append_tagged([_claim("bob")])
        await store.append_tagged([NewEvent("Renamed", {}, tags=["username:ada"])])
        condition = AppendCondition(fail_if_events_match=_username("ada"), after=read.position)
        result = await store.append_tagged([_claim("ada")], condition=condition)
        assert result.position is not None

    async def test_a_position_ahead_of_the_store_is_refused(self, store: TaggedEventStore) -> None:
        """A position this store never gave (far ahead of its last write: from another
        store, or made up) is refused by the read and by the condition, and nothing is
        written: a condition after it would pass over every claim written before it."""
        await store.append_tagged([_claim("ada")])
        ahead = Position.parse("9000000000000000000:0")
        with pytest.raises(InvalidArgument, match="ahead"):
            await store.read_query(_username("ada"), after=ahead)
        condition = AppendCondition(fail_if_events_match=_username("ada"), after=ahead)
        with pytest.raises(InvalidArgument, match="ahead"):
            await store.append_tagged([_claim("ada", again=True)], condition=condition)
        assert len((await store.read_query(_username("ada"))).events) == 1

    async def test_a_stream_and_its_expected_version_are_checked_too(
        self, store: TaggedEventStore
    ) -> None:
        """Tagged events may name a stream; its expected version is checked as usual."""
        await store.append_tagged([_claim("ada")], stream_id="user-1", expected_version=0)
        with pytest.raises(VersionConflict):
            await store.append_tagged([_claim("ada")], stream_id="user-1", expected_version=0)

    async def test_only_one_of_sixteen_concurrent_claims_succeeds(
        self, store: TaggedEventStore
    ) -> None:
        """Sixteen tasks read, then claim the same username at once (each only if its read
        found no claim): exactly one claim."""
        won: list[int] = []
        failed: list[int] = []

        async def claim(n: int) -> None:
            read = await store.read_query(_username("ada"))
            await trio.lowlevel.checkpoint()
            if read.events:
                # Taken already, as read: the decision refuses (a task that reads after
                # another's claim committed must not append on top of it).
                failed.append(n)
                return
            condition = AppendCondition(fail_if_events_match=_username("ada"), after=read.position)
            try:
                await store.append_tagged([_claim("ada", n=n)], condition=condition)
            except AppendConditionFailed:
                failed.append(n)
            else:
                won.append(n)

        async with trio.open_nursery() as nursery:
            for n in range(16):
                nursery.start_soon(claim, n)
        assert len(won) == 1
        assert len(failed) == 15
        assert len((await store.read_query(_username("ada"))).events) == 1

    @pytest.mark.parametrize(
        "bad",
        [
            lambda: NewEvent("A", {}, tags=[""]),
            lambda: NewEvent("A", {}, tags=["x" * 256]),
            lambda: NewEvent("A", {}, tags=["a\x00b"]),
            lambda: NewEvent("A", {}, tags=[f"t{n}" for n in range(65)]),
            lambda: NewEvent("A", {}, tags="lone-string"),
            lambda: NewEvent("A", {}, tags=[1]),
            lambda: EventQuery([]),
            lambda: EventQuery([QueryItem(tags=[""])]),
            lambda: EventQuery.of(types=[""]),
            lambda: AppendCondition(fail_if_events_match="x"),
            lambda: EventQuery.of(tags="username:ada"),
            lambda: EventQuery.of(types="UsernameClaimed"),
        ],
        ids=[
            "empty-tag",
            "long-tag",
            "nul-tag",
            "too-many-tags",
            "string-as-tags",
            "int-tag",
            "no-items",
            "empty-item-tag",
            "empty-type",
            "query-not-a-query",
            "lone-string-tags-of",
            "lone-string-types-of",
        ],
    )
    async def test_bad_tags_and_queries_are_refused(
        self, store: TaggedEventStore, bad: Any
    ) -> None:
        """Tags, queries and conditions are checked where they are made, before a store
        sees them."""
        with pytest.raises(InvalidArgument):
            bad()
        assert (await store.read_query(EventQuery([QueryItem()]))).events == ()

    async def test_bad_query_arguments_are_refused(self, store: TaggedEventStore) -> None:
        """Wrong types and an expected version without a stream: refused, nothing written."""
        with pytest.raises(InvalidArgument):
            await store.read_query("username:ada")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            await store.read_query(_username("ada"), limit=0)
        with pytest.raises(InvalidArgument):
            await store.append_tagged([_claim("ada")], condition=_username("ada"))  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            await store.append_tagged([_claim("ada")], expected_version=0)
        assert (await store.read_query(_username("ada"))).events == ()
