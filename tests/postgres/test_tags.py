"""Tags on PostgreSQL, before the events table keeps them (issue 28): an append of a tagged
event is refused with a typed error that says so, and nothing is written."""

from __future__ import annotations

import pytest

from eventcore_trio import (
    ConfigurationError,
    EventQuery,
    InvalidArgument,
    NewEvent,
    RecordedEvent,
    StreamAppend,
    execute,
)
from eventcore_trio.postgres import PostgresStore


async def test_tagged_events_are_refused_and_nothing_is_written(store: PostgresStore) -> None:
    tagged = NewEvent("UsernameClaimed", {}, tags=["username:ada"])
    with pytest.raises(InvalidArgument, match="does not keep tags yet"):
        await store.append("user-1", [NewEvent("A", {}), tagged])
    with pytest.raises(InvalidArgument, match="does not keep tags yet"):
        await store.append_atomic([StreamAppend("user-2", [tagged])])
    async with store.transaction() as tx:
        with pytest.raises(InvalidArgument, match="does not keep tags yet"):
            await tx.append("user-3", [tagged])
    assert await store.last_position() is None


class _Claim:
    def query(self) -> EventQuery:
        return EventQuery.of(tags=["username:ada"])

    def initial_state(self) -> bool:
        return False

    def evolve(self, taken: bool, event: RecordedEvent) -> bool:
        return True

    def decide(self, taken: bool) -> list[NewEvent]:
        return [NewEvent("UsernameClaimed", {}, tags=["username:ada"])]


async def test_a_query_command_is_a_configuration_error(store: PostgresStore) -> None:
    with pytest.raises(ConfigurationError, match="does not read queries"):
        await execute(store, _Claim())
    assert await store.last_position() is None
