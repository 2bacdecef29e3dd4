"""Backend harnesses: how the contract suite opens a store and injects faults into it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol, final

from .._events import NewEvent, StreamAppend
from .._protocols import Leadership, Store
from ..memory import MemoryStore, open_memory_store
from ..memory._store import MemoryLeadership
from ..postgres import PostgresLeadership, PostgresStore, open_postgres_store
from ..postgres._keys import writer_lock_key


class BackendHarness(Protocol):
    """What a backend supplies to run the contract suite against it.

    Every store that one harness opens shares the same underlying database, so two stores
    from one harness behave like two processes using one store.

    .. versionadded:: 0.1
    """

    def open_store(self) -> AbstractAsyncContextManager[Store]:
        """Open a store on the harness's (fresh, test-private) database."""
        ...

    async def end_leadership_session(self, store: Store, leadership: Leadership) -> None:
        """End the session behind *leadership* from outside, as a crash or an operator would.

        On PostgreSQL this is ``pg_terminate_backend`` on the lock-holding session.
        """
        ...

    def hold_commit(
        self, store: Store, stream_id: str, events: Sequence[NewEvent]
    ) -> AbstractAsyncContextManager[None]:
        """Append *events* in a transaction that commits only when the block exits.

        Positions are drawn on entry, so events appended inside the block by others get later
        positions but commit earlier: the late-commit hazard of DESIGN.md section 4.1.
        """
        ...

    async def store_undecodable(self, store: Store, stream_id: str) -> None:
        """Store an event whose data is not a JSON object, as a foreign writer could."""
        ...


@final
class MemoryHarness:
    """The harness of the in-memory backend (one `MemoryStore` shared by every open).

    .. versionadded:: 0.1
    """

    def __init__(self) -> None:
        self._store: MemoryStore | None = None

    @asynccontextmanager
    async def open_store(self) -> AsyncIterator[Store]:
        """Open (the first time) or share the harness's memory store."""
        if self._store is not None:
            yield self._store
            return
        async with open_memory_store() as store:
            self._store = store
            try:
                yield store
            finally:
                self._store = None

    async def end_leadership_session(self, store: Store, leadership: Leadership) -> None:
        """Revoke *leadership* as if its session had died."""
        assert isinstance(store, MemoryStore)
        assert isinstance(leadership, MemoryLeadership)
        store._revoke_leadership(leadership.name)

    @asynccontextmanager
    async def hold_commit(
        self, store: Store, stream_id: str, events: Sequence[NewEvent]
    ) -> AsyncIterator[None]:
        """Memory appends are atomic and visible at once: append when the block exits."""
        yield
        await store.append(stream_id, events)

    async def store_undecodable(self, store: Store, stream_id: str) -> None:
        """Store an event whose data is a JSON array."""
        assert isinstance(store, MemoryStore)
        store._store_undecodable(stream_id)


@final
class PostgresHarness:
    """The harness of the PostgreSQL backend: a fresh schema on a given server.

    Args:
        dsn: a server on which the harness may create schemas (a superuser is simplest).
        schema: the schema to use; by default a new, unique one.
        store_options: more keyword arguments for `open_postgres_store` (for example
            ``session_dsn`` and ``statement_cache_size`` behind a connection pooler).

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       *store_options*.
    """

    def __init__(self, dsn: str, schema: str | None = None, **store_options: Any) -> None:
        self.dsn = dsn
        self.schema = schema or f"t_{uuid.uuid4().hex[:16]}"
        self.store_options: dict[str, Any] = {"max_pool_size": 4, **store_options}

    def open_store(self) -> AbstractAsyncContextManager[PostgresStore]:
        """Open a store on the harness's schema (migrating it on first use)."""
        return open_postgres_store(self.dsn, schema=self.schema, **self.store_options)

    async def end_leadership_session(self, store: Store, leadership: Leadership) -> None:
        """``pg_terminate_backend`` the lock-holding session, from a pooled connection."""
        assert isinstance(store, PostgresStore)
        assert isinstance(leadership, PostgresLeadership)
        terminated = await store.admin.fetchval(
            "SELECT pg_terminate_backend($1)", leadership.backend_pid
        )
        assert terminated, "the lock-holding session was already gone"

    async def store_undecodable(self, store: Store, stream_id: str) -> None:
        """Insert an event whose data is a JSON array, bypassing the append function.

        It announces itself as an event writer first (the writer lock, taken before the
        insert gives the statement a transaction id), as anything that inserts events must.
        """
        assert isinstance(store, PostgresStore)
        await store.admin.execute(
            f'INSERT INTO "{store.schema}".events '
            "(stream_id, stream_version, event_id, type, data, metadata, stream_hash) "
            "SELECT $1, 1, gen_random_uuid(), 'Undecodable', '[1, 2, 3]', '{}', "
            f'"{store.schema}".stream_hash($1) '
            "FROM (SELECT pg_advisory_xact_lock_shared($2)) AS announced",
            stream_id,
            writer_lock_key(store.schema),
        )

    @asynccontextmanager
    async def hold_commit(
        self, store: Store, stream_id: str, events: Sequence[NewEvent]
    ) -> AsyncIterator[None]:
        """Run the append function in an open transaction on a dedicated connection."""
        assert isinstance(store, PostgresStore)
        async with (
            store.admin.connection("eventcore-trio test late commit") as connection,
            connection.transaction(),
        ):
            sql, args = store.admin.append_statement([StreamAppend(stream_id, events)])
            await connection.fetchrow(sql, *args)
            yield
        store.admin.notify_appended()
