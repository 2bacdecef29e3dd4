"""`PostgresAdmin`: the one door for tooling that needs raw SQL next to a store.

Operators' tools, the torture run, the benchmarks and the tests sometimes need what the
public API deliberately does not offer: a query against ``pg_locks``, a row planted behind the
store's back, an append held open in a transaction. They get it here, through
``store.admin``, instead of reaching into the store's private attributes, so the store's
internals can change without breaking them. Nothing here keeps the store's guarantees: raw SQL
can do anything the connection's role may do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, final

from .._events import StreamAppend
from ._bridge import Connection, Record, connect
from ._fence import LOCK_KEY
from ._keys import projector_lock_key
from ._pool import Pool

if TYPE_CHECKING:
    from ._appends import AppendStatement
    from ._group_commit import GroupCommit
    from ._notifier import Notifier


@final
class PostgresAdmin:
    """Raw SQL on a store's database, for tooling and tests; obtained from ``store.admin``.

    Each query method is one statement on a pooled connection (one crossing into asyncio).

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        *,
        pool: Pool,
        schema: str,
        dsn: str,
        connect_timeout: float,
        statement_cache_size: int,
        append_statement: AppendStatement,
        notifier: Notifier,
        group_commit: GroupCommit,
    ) -> None:
        self._pool = pool
        self._schema = schema
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._statement_cache_size = statement_cache_size
        self._append_statement = append_statement
        self._notifier = notifier
        self._group_commit = group_commit

    async def fetch(self, sql: str, *args: object) -> list[Record]:
        """Run *sql* and return every row."""
        return await self._pool.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: object) -> Record | None:
        """Run *sql* and return the first row, or None."""
        return await self._pool.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: object) -> Any:
        """Run *sql* and return the first column of the first row."""
        return await self._pool.fetchval(sql, *args)

    async def execute(self, sql: str, *args: object) -> str:
        """Run *sql* (several statements when there are no arguments)."""
        return await self._pool.execute(sql, *args)

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Connection]:
        """One pooled connection for the block, for several statements in a row."""
        async with self._pool.acquire() as connection:
            yield connection

    @asynccontextmanager
    async def connection(self, application_name: str) -> AsyncIterator[Connection]:
        """A dedicated connection (never from the pool) for the block, closed on exit.

        For sessions a test controls: a transaction held open, a lock taken by hand, a
        session to terminate.
        """
        connection = await connect(
            self._dsn,
            application_name=application_name,
            connect_timeout=self._connect_timeout,
            statement_cache_size=self._statement_cache_size,
        )
        try:
            yield connection
        finally:
            await connection.close()

    def append_statement(self, appends: Sequence[StreamAppend]) -> tuple[str, list[Any]]:
        """The SQL and arguments of the one statement that makes *appends*, validated.

        Run it on a connection of your own, inside a transaction you hold open, to reproduce a
        late commit (``PostgresHarness.hold_commit``); call `notify_appended` once it has
        committed.
        """
        return self._append_statement(appends)

    def notify_appended(self) -> None:
        """Wake the store's readers soon (one ``pg_notify``, sent from a background task), as
        `PostgresStore.append` does after each append: for events committed by a statement
        from `append_statement`. Without it, readers find them at their next poll.

        .. versionadded:: 0.2
        """
        self._notifier.poke()

    @contextmanager
    def failing_notifications(self) -> Iterator[None]:
        """For the block, the NOTIFY that follows each of this store's appends fails on the
        server (it names a channel PostgreSQL refuses), as a statement timeout or a full
        notification queue would make it fail: fault injection for the torture run and
        tests. Appends still commit and say so; readers are woken by the store's notifier.

        .. versionadded:: 0.3
        """
        self._group_commit.notifications_fail = True
        try:
            yield
        finally:
            self._group_commit.notifications_fail = False

    async def lock_sessions(self, units: Sequence[str]) -> dict[str, int]:
        """Which server session (backend pid) holds the lock of each of *units* now.

        Units nobody holds are left out. One cheap query on ``pg_locks``, for measuring a
        failover: a unit is taken over once its lock is held by a session other than the
        one that held it before.

        .. versionadded:: 0.2
        """
        keys = {projector_lock_key(self._schema, unit): unit for unit in units}
        rows = await self._pool.fetch(
            f"SELECT {LOCK_KEY} AS key, pid FROM pg_locks "
            "WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            f"AND {LOCK_KEY} = ANY($1::bigint[])",
            list(keys),
        )
        return {keys[row["key"]]: int(row["pid"]) for row in rows}
