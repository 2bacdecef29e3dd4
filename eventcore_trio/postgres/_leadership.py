"""Leadership on PostgreSQL: a session advisory lock on a dedicated connection.

Connection lifetime = lock lifetime. The lock is a *session* lock taken on a connection opened
for it alone (never a pooled one, which could hand the session, and so the lock, to unrelated
work). The lock ends exactly when the session ends: on release, on a crash of this process
(the server notices the closed socket), on ``pg_terminate_backend``, and, when the host
vanishes from the network, once the server-side TCP keepalives below give up (about 15 s),
also in the middle of a long statement (``client_connection_check_interval``, PostgreSQL 14+).

Batches run on this same session, which is what fences a deposed leader: a session that has
lost its lock is a dead session, and a dead session cannot commit.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, final

import attrs
import trio

from .._concurrency import background
from .._errors import (
    CheckpointConflict,
    LeadershipLost,
    LeadershipUnavailable,
    StoreConnectionError,
)
from .._events import RecordedEvent, UndecodableEvent
from .._filters import EventFilter
from .._positions import Position, position_parts
from .._status import ProjectionState
from ._bridge import Connection, Record, connect

# Server-side TCP settings on the lock connection: keepalives (idle 5 s, then 3 probes 3 s
# apart) for a silent connection, and a 15 s limit for data the server sent to be
# acknowledged, since Linux sends no keepalives while sent data is unacknowledged (a reply
# the partition swallowed) and would otherwise retransmit for about 15 minutes. A leader
# whose machine drops off the network loses its lock after about 15 s either way.
KEEPALIVE_SETTINGS: Final = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "3",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "15000",
}
# PostgreSQL 14+: while a statement runs, check every 2 s that the client is still there. A
# backend busy in a long statement otherwise notices a vanished client (and frees the lock)
# only when the statement ends, keepalives or not.
CONNECTION_CHECK_SETTINGS: Final = {"client_connection_check_interval": "2s"}
CONNECTION_CHECK_MINIMUM_VERSION: Final = 140000

# The client-side check: a ping this often, each bounded by PING_TIMEOUT, so a lost lock is
# noticed within about a second even when the server never closes the socket.
PING_INTERVAL: Final = 0.5
PING_TIMEOUT: Final = 1.0


@attrs.frozen
class LeadershipContext:
    """What a leadership needs from its store: where the tables are, which cluster it is."""

    schema: str
    system_identifier: str | None
    server_version: int = 0

    @property
    def lock_session_settings(self) -> dict[str, str]:
        """Server settings for a lock session on this server."""
        if self.server_version >= CONNECTION_CHECK_MINIMUM_VERSION:
            return {**KEEPALIVE_SETTINGS, **CONNECTION_CHECK_SETTINGS}
        return dict(KEEPALIVE_SETTINGS)

    @property
    def subscriptions(self) -> str:
        return f'"{self.schema}".subscriptions'

    @property
    def dead_letters(self) -> str:
        return f'"{self.schema}".dead_letters'


def filter_to_json(event_filter: EventFilter | None) -> str | None:
    """The filter as stored in ``subscriptions.filter`` (read back by projection_status)."""
    if event_filter is None:
        return None
    return json.dumps(
        {
            "event_types": None
            if event_filter.event_types is None
            else sorted(event_filter.event_types),
            "stream_prefix": event_filter.stream_prefix,
            "stream_pattern": event_filter.stream_pattern,
        }
    )


@final
class _BatchDatabase:
    """``ctx.db``: the batch's transaction, begun lazily by the first statement."""

    def __init__(self, batch: PostgresBatch) -> None:
        self._batch = batch

    async def execute(self, sql: str, *args: object) -> str:
        """Run a statement in the batch's transaction."""
        return await (await self._batch._in_transaction()).execute(sql, *args)

    async def executemany(self, sql: str, args: Iterable[Sequence[object]]) -> None:
        """Run a statement once per argument tuple in the batch's transaction."""
        await (await self._batch._in_transaction()).executemany(sql, args)

    async def fetch(self, sql: str, *args: object) -> list[Record]:
        """Run a query in the batch's transaction and return every row."""
        return await (await self._batch._in_transaction()).fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: object) -> Record | None:
        """Run a query in the batch's transaction and return its first row."""
        return await (await self._batch._in_transaction()).fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: object) -> Any:
        """Run a query in the batch's transaction and return one value."""
        return await (await self._batch._in_transaction()).fetchval(sql, *args)


@final
class PostgresBatch:
    """A transaction on the leader's session; obtained from `PostgresLeadership.open_batch`.

    The transaction begins with the first statement that needs it: a batch whose projector
    writes nothing through ``ctx.db`` commits its checkpoint as one autocommit statement, one
    round trip, and holds no transaction id while its handlers run (so it holds no reader
    back). Everything still commits when the batch's block ends, or not at all.

    .. versionadded:: 0.1
    """

    def __init__(self, connection: Connection, name: str, context: LeadershipContext) -> None:
        self._connection = connection
        self._name = name
        self._context = context
        # True once BEGIN has run; then COMMIT or ROLLBACK ends the batch.
        self._begun = False
        # The checkpoint move requested by save_checkpoint, applied at commit when no
        # transaction was needed.
        self._pending_checkpoint: tuple[Position | None, Position] | None = None
        self._db = _BatchDatabase(self)

    @property
    def db(self) -> _BatchDatabase:
        """The transaction, for the projector's own writes (``ctx.db``)."""
        return self._db

    async def _in_transaction(self) -> Connection:
        if not self._begun:
            await self._connection.begin()
            self._begun = True
        return self._connection

    async def save_checkpoint(self, expected: Position | None, position: Position) -> None:
        """Move the checkpoint from *expected* to *position* when the batch commits (CAS).

        Raises:
            CheckpointConflict: the stored checkpoint is not *expected* (at once inside a
                transaction, else when the block ends).
        """
        if self._begun:
            await self._write_checkpoint(expected, position)
        else:
            self._pending_checkpoint = (expected, position)

    async def _write_checkpoint(self, expected: Position | None, position: Position) -> None:
        tx, seq = position_parts(position)
        expected_tx, expected_seq = (None, None) if expected is None else position_parts(expected)
        # One statement: insert the row, or move it only from exactly the expected position.
        # A second writer (a deposed leader, an operator) makes this return no row.
        saved = await self._connection.fetchval(
            f"INSERT INTO {self._context.subscriptions} AS c "
            "(subscription_name, tx, position, system_identifier, updated_at) "
            "VALUES ($1, $2, $3, $4, now()) "
            "ON CONFLICT (subscription_name) DO UPDATE "
            "SET tx = excluded.tx, position = excluded.position, "
            "system_identifier = excluded.system_identifier, updated_at = now() "
            "WHERE c.tx IS NOT DISTINCT FROM $5::bigint "
            "AND c.position IS NOT DISTINCT FROM $6::bigint "
            "RETURNING 1",
            self._name,
            tx,
            seq,
            self._context.system_identifier,
            expected_tx,
            expected_seq,
        )
        if saved is None:
            row = await self._connection.fetchrow(
                f"SELECT tx, position FROM {self._context.subscriptions} "
                "WHERE subscription_name = $1",
                self._name,
            )
            current = None
            if row is not None and row["tx"] is not None:
                current = Position(row["tx"], row["position"])
            raise CheckpointConflict(self._name, position, current)

    async def record_dead_letter(
        self, event: RecordedEvent | UndecodableEvent, error: BaseException, *, retries: int
    ) -> None:
        """Record *event* as skipped, in this transaction."""
        tx, seq = position_parts(event.position)
        if isinstance(event, RecordedEvent):
            data, metadata, decode_error = json.dumps(event.data), json.dumps(event.metadata), None
        else:
            data, metadata, decode_error = event.raw_data, event.raw_metadata, event.error
        connection = await self._in_transaction()
        await connection.execute(
            f"INSERT INTO {self._context.dead_letters} (subscription_name, tx, position, "
            "event_id, stream_id, stream_version, type, data, metadata, decode_error, "
            "event_recorded_at, error_type, error_message, retries) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            self._name,
            tx,
            seq,
            event.event_id,
            event.stream_id,
            event.stream_version,
            event.type,
            data,
            metadata,
            decode_error,
            event.recorded_at,
            f"{type(error).__module__}.{type(error).__qualname__}",
            str(error),
            retries,
        )

    async def resolve_dead_letter(self, dead_letter_id: uuid.UUID) -> None:
        """Delete a replayed dead letter, in this transaction."""
        connection = await self._in_transaction()
        await connection.execute(
            f"DELETE FROM {self._context.dead_letters} WHERE id = $1 AND subscription_name = $2",
            dead_letter_id,
            self._name,
        )

    async def _commit(self) -> None:
        if self._begun:
            await self._connection.commit()
        elif self._pending_checkpoint is not None:
            await self._write_checkpoint(*self._pending_checkpoint)

    async def _rollback(self) -> None:
        if self._begun:
            await self._connection.rollback()


@final
class PostgresLeadership:
    """Leadership of a name, held as a session advisory lock on a dedicated connection.

    Obtained only from ``PostgresStore.try_acquire`` and ``wait_acquire``. `is_held` turns
    False, and `wait_lost` returns, within about a second of the session ending.

    .. versionadded:: 0.1
    """

    def __init__(
        self, name: str, key: int, connection: Connection, context: LeadershipContext
    ) -> None:
        self._name = name
        self._key = key
        # The lock-holding session; closing it releases the lock. Owned by acquire_leadership.
        self._connection = connection
        self._context = context
        # Serialises use of the connection between the keepalive and work done under the lock.
        self._connection_lock = trio.Lock()
        # Set once, when the lock is known to be lost or has been released. Never cleared.
        self._lost = trio.Event()

    @property
    def name(self) -> str:
        """The name this leadership was acquired for."""
        return self._name

    @property
    def lock_key(self) -> int:
        """The bigint advisory-lock key held (see `projector_lock_key`)."""
        return self._key

    @property
    def backend_pid(self) -> int:
        """The server process id of the lock-holding session."""
        return self._connection.backend_pid

    @property
    def is_held(self) -> bool:
        """False once the lock is known to be lost or has been released."""
        return not self._lost.is_set()

    async def wait_lost(self) -> None:
        """Return once the lock is lost (the session ended) or released."""
        await self._lost.wait()

    @asynccontextmanager
    async def open_batch(self) -> AsyncIterator[PostgresBatch]:
        """Open a transaction on the lock-holding session; commit when the block ends.

        Raises:
            LeadershipLost: the lock was lost before the batch or while it ran (the
                transaction did not commit).
        """
        async with self._use() as connection:
            batch = PostgresBatch(connection, self._name, self._context)
            try:
                try:
                    yield batch
                except BaseException:
                    await batch._rollback()
                    raise
                await batch._commit()
            except Exception as exc:
                # Whatever failed (a statement through ctx.db, the projector, the commit):
                # if the session is gone, the lock is gone too, and that is what the caller
                # must hear. The rollback closes the connection when it cannot complete, and
                # a commit on a dead session fails, so is_closed() is reliable here.
                if connection.is_closed() or isinstance(exc, StoreConnectionError):
                    self._mark_lost()
                    raise LeadershipLost(
                        f"the lock session of {self._name!r} ended during a batch; the batch "
                        "did not commit and another instance may lead now"
                    ) from exc
                raise

    async def report(
        self,
        state: ProjectionState,
        *,
        error: str | None = None,
        filter: EventFilter | None = None,
    ) -> None:
        """Record this leader's state, identity and filter in ``subscriptions``."""
        running = state is ProjectionState.RUNNING
        async with self._use() as connection:
            await connection.execute(
                f"INSERT INTO {self._context.subscriptions} AS c (subscription_name, state, "
                "last_error, filter, leader_pid, leader_host, leader_application, updated_at) "
                "VALUES ($1, $2, $3, $4::jsonb, $5, $6, current_setting('application_name'), "
                "now()) "
                "ON CONFLICT (subscription_name) DO UPDATE SET state = excluded.state, "
                "last_error = excluded.last_error, "
                "filter = coalesce(excluded.filter, c.filter), "
                "leader_pid = excluded.leader_pid, leader_host = excluded.leader_host, "
                "leader_application = excluded.leader_application, updated_at = now()",
                self._name,
                state.value if state is not ProjectionState.STANDBY else "stopped",
                error,
                filter_to_json(filter),
                os.getpid() if running else None,
                socket.gethostname() if running else None,
            )

    @asynccontextmanager
    async def _use(self) -> AsyncIterator[Connection]:
        # For work that must run on the lock-holding session (fencing: a dead session cannot
        # commit). Raises LeadershipLost instead of running on a session that is gone.
        async with self._connection_lock:
            if not self.is_held:
                raise LeadershipLost(
                    f"leadership of {self._name!r} was lost; nothing more may be committed"
                )
            yield self._connection

    def _mark_lost(self) -> None:
        self._lost.set()

    async def _keepalive(self) -> None:
        while self.is_held:
            await trio.sleep(PING_INTERVAL)
            if self._connection_lock.locked():
                # Work is running on the session; the termination listener still fires.
                continue
            async with self._connection_lock:
                alive = False
                with trio.move_on_after(PING_TIMEOUT):
                    try:
                        alive = await self._connection.fetchval("SELECT 1") == 1
                    except StoreConnectionError:
                        alive = False
            if not alive or self._connection.is_closed():
                self._mark_lost()


@asynccontextmanager
async def acquire_leadership(
    dsn: str,
    *,
    name: str,
    key: int,
    context: LeadershipContext,
    application_name: str,
    connect_timeout: float,
    wait: bool,
    on_standby: Callable[[], None] | None = None,
) -> AsyncIterator[PostgresLeadership]:
    """Open a dedicated connection, take the lock (or wait for it), hold it for the block."""
    connection = await connect(
        dsn,
        application_name=application_name,
        connect_timeout=connect_timeout,
        server_settings=context.lock_session_settings,
    )
    leadership: PostgresLeadership | None = None
    try:
        acquired = await connection.fetchval("SELECT pg_try_advisory_lock($1)", key)
        if not acquired:
            if not wait:
                raise LeadershipUnavailable(name)
            if on_standby is not None:
                on_standby()
            # Standby: block in the server until the leader's session ends, which grants the
            # lock at once (fast failover). Cancellation cancels the query.
            await connection.execute("SELECT pg_advisory_lock($1)", key)
        leadership = PostgresLeadership(name, key, connection, context)
        connection.add_termination_listener(leadership._mark_lost)
        async with background(leadership._keepalive):
            yield leadership
    finally:
        if leadership is not None:
            leadership._mark_lost()
        # Closing ends the session, which releases the lock; shielded and bounded.
        await connection.close()
