"""Type tests: checked by mypy --strict in CI, never run.

They pin down what the public API promises to type checkers: both stores satisfy every
protocol, @projector keeps the handler's signature, and read_events' return type follows
its `undecodable` argument.
"""

from __future__ import annotations

from typing import assert_type

from eventcore_trio import (
    PersonalDataStore,
    RecordedEvent,
    Store,
    UndecodableEvent,
    open_memory_store,
    open_postgres_store,
)
from eventcore_trio.memory import MemoryStore
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.projection import FunctionProjector, ProjectionContext, Projector, projector


def stores_are_stores(memory: MemoryStore, postgres: PostgresStore) -> None:
    store: Store = memory
    store = postgres
    del store


def the_memory_store_keeps_personal_data(memory: MemoryStore) -> None:
    personal: PersonalDataStore = memory
    del personal


async def opened_stores_are_stores() -> None:
    async with open_memory_store() as memory, open_postgres_store("postgresql://") as postgres:
        assert_type(memory, MemoryStore)
        assert_type(postgres, PostgresStore)


@projector("typed", event_types=["E"])
async def typed(event: RecordedEvent, ctx: ProjectionContext) -> None:
    pass


async def decorated_projector_keeps_its_signature(
    event: RecordedEvent, ctx: ProjectionContext
) -> None:
    assert_type(typed, FunctionProjector)
    await typed(event, ctx)
    as_protocol: Projector = typed
    del as_protocol


async def subscribe_types(store: Store) -> None:
    async with store.subscribe() as plain:
        async for event in plain:
            assert_type(event, RecordedEvent)
    async with store.subscribe(undecodable="include") as mixed:
        async for item in mixed:
            assert_type(item, RecordedEvent | UndecodableEvent)


async def read_events_types(store: Store) -> None:
    plain = await store.read_events(None, limit=1)
    assert_type(plain, list[RecordedEvent])
    mixed = await store.read_events(None, limit=1, undecodable="include")
    assert_type(mixed, list[RecordedEvent | UndecodableEvent])


# The package root imports the PostgreSQL backend lazily, through a module `__getattr__` that
# type checkers do not see: a misspelt name stays an error (this ignore would be unused, an
# error under --strict, if the checker accepted it).
from eventcore_trio import open_memroy_store  # type: ignore[attr-defined]  # noqa: E402, F401
