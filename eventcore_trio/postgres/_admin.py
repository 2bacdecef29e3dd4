"""`PostgresAdmin`: the one door for tooling that needs raw SQL next to a store.

Operators' tools, the torture run, the benchmarks and the tests sometimes need what the
public API deliberately does not offer: a query against ``pg_locks``, a row planted behind the
store's back, an append held open in a transaction. They get it here, through
``store.admin``, instead of reaching into the store's private attributes, so the store's
internals can change without breaking them. Nothing here keeps the store's guarantees: raw SQL
can do anything the connection's role may do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, Final, final

import attrs

from .._errors import ConfigurationError
from .._events import StreamAppend
from .._partitions import MAX_PARTITIONS
from .._status import ForeignLock
from ._bridge import Connection, Record
from ._fence import LOCK_KEY
from ._grants import grant_runtime_role
from ._keys import index_lock_key, migration_lock_key, projector_lock_key, writer_lock_key
from ._pool import Pool, SessionOptions
from ._reads import ensure_partition_index

if TYPE_CHECKING:
    from ._appends import AppendStatement
    from ._group_commit import GroupCommit
    from ._notifier import Notifier


#: SQL: the sessions of this database holding or awaiting one of the advisory locks $2 (keys)
#: that either take lock $1 (the writer lock) other than shared, or whose role may not use
#: schema $3. Every function is qualified (a look-alike in another schema never runs).
#: waitstart (PostgreSQL 14 and later) is read through to_jsonb, which has it only there.
_FOREIGN_LOCKS: Final = f"""
SELECT l.pid, l.granted, l.mode = 'ExclusiveLock' AS exclusive, {LOCK_KEY} AS key,
       a.usename AS user_name, a.application_name,
       pg_catalog.host(a.client_addr) AS client_addr, a.backend_start,
       pg_catalog.jsonb_extract_path_text(pg_catalog.to_jsonb(l), 'waitstart')::timestamptz
           AS waiting_since
FROM pg_catalog.pg_locks l
JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_catalog.pg_database
                    WHERE datname = pg_catalog.current_database())
  AND {LOCK_KEY} = ANY($2::bigint[])
  AND (({LOCK_KEY} = $1 AND l.mode <> 'ShareLock')
       OR NOT pg_catalog.has_schema_privilege(a.usesysid, $3, 'USAGE'))
ORDER BY l.pid, key
"""


async def foreign_locks(pool: Pool, schema: str, units: Iterable[str]) -> tuple[ForeignLock, ...]:
    """The sessions from outside the store that hold or await its writer, migration or index
    lock, or the lock of one of *units* (see `ForeignLock`): one query on ``pg_locks``."""
    kinds: dict[int, tuple[str, str | None]] = {
        writer_lock_key(schema): ("writer", None),
        migration_lock_key(schema): ("migration", None),
        index_lock_key(schema): ("index", None),
    }
    kinds.update({projector_lock_key(schema, unit): ("projection", unit) for unit in units})
    rows = await pool.fetch(_FOREIGN_LOCKS, writer_lock_key(schema), list(kinds), schema)
    return tuple(
        ForeignLock(
            kind=kinds[row["key"]][0],
            unit=kinds[row["key"]][1],
            exclusive=row["exclusive"],
            granted=row["granted"],
            pid=row["pid"],
            user=row["user_name"] or "",
            application_name=row["application_name"] or "",
            client_addr=row["client_addr"],
            connected_at=row["backend_start"],
            waiting_since=row["waiting_since"],
        )
        for row in rows
    )


@final
@attrs.define(eq=False, slots=False, repr=False, kw_only=True)
class PostgresAdmin:
    """Raw SQL on a store's database, for tooling and tests; obtained from ``store.admin``.

    Each query method is one statement on a pooled connection (one crossing into asyncio).

    .. versionadded:: 0.2
    """

    _pool: Pool
    _schema: str
    _options: SessionOptions
    _append_statement: AppendStatement
    _notifier: Notifier
    _group_commit: GroupCommit

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
        connection = await self._options.connect(application_name)
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

    async def foreign_locks(self, units: Sequence[str] = ()) -> tuple[ForeignLock, ...]:
        """Sessions from outside the store holding or awaiting its writer, migration or index
        lock, or the lock of one of *units* (`ProjectionStatus.foreign_locks` has them for
        the units status lists). One query on ``pg_locks``.

        .. versionadded:: 0.3
        """
        return await foreign_locks(self._pool, self._schema, units)

    async def grant_runtime_role(self, role: str) -> list[str]:
        """Grant *role* what a least-privilege runtime role needs on this store's schema
        (`runtime_grants`), in one transaction; return the statements run.

        Run it as the schema's owner, which the store's role must be (``eventcore-trio
        migrate --grant ROLE`` does this). Applying it again changes nothing.

        Raises:
            ConfigurationError: an invalid role name, no such role, the schema's owner
                itself, or a store whose role may not grant (not the schema's owner).

        .. versionadded:: 0.3
        """
        return await grant_runtime_role(self._pool, self._schema, role)

    async def build_partition_index(self, partitions: int) -> bool:
        """Build the index that serves the reads of one of *partitions* partitions, unless it
        is there (CONCURRENTLY: appends go on meanwhile). True once it is; False, having
        done nothing, when the store's role may not (only the owner of the events table
        may: ``eventcore-trio migrate --partition-index N`` runs this as the owner).

        A projection's change of partition count builds it too, when its role may.

        Raises:
            ConfigurationError: *partitions* is not an int from 2 to 1024.

        .. versionadded:: 0.3
        """
        if type(partitions) is not int or not 2 <= partitions <= MAX_PARTITIONS:
            raise ConfigurationError(
                f"partitions must be an int from 2 to {MAX_PARTITIONS} (one partition reads "
                f"the whole log and needs no index of its own), got {partitions!r}"
            )
        return await ensure_partition_index(
            self._pool,
            self._schema,
            partitions,
            options=self._options,
        )
