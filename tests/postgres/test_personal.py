"""Personal data on PostgreSQL, before the store seals it (issue 29, part 2): an event with a
subject or personal fields is refused on every write path with a typed error that says so,
and nothing is written, so no personal value is ever stored in the clear."""

from __future__ import annotations

import pytest

from eventcore_trio import ConfigurationError, NewEvent, StreamAppend
from eventcore_trio.postgres import PostgresStore


async def test_personal_events_are_refused_on_every_write_path(store: PostgresStore) -> None:
    personal = NewEvent(
        "CustomerRegistered",
        {"email": "ada@example.com", "plan": "pro"},
        subject="customer-42",
        personal=["email"],
    )
    about = NewEvent("CustomerUpgraded", {"plan": "max"}, subject="customer-42")
    for event in (personal, about):
        with pytest.raises(ConfigurationError, match="does not keep personal data yet"):
            await store.append("customer-42", [NewEvent("A", {}), event])
        with pytest.raises(ConfigurationError, match="does not keep personal data yet"):
            await store.append_atomic(
                [StreamAppend("c-1", [NewEvent("A", {})]), StreamAppend("c-2", [event])]
            )
        with pytest.raises(ConfigurationError, match="does not keep personal data yet"):
            await store.append_tagged([event])
        async with store.transaction() as tx:
            with pytest.raises(ConfigurationError, match="does not keep personal data yet"):
                await tx.append("c-3", [event])
    assert await store.last_position() is None
    dump = await store.admin.fetchval(f'SELECT count(*) FROM "{store.schema}".events')
    assert dump == 0
