"""`PostgresStore`: the facade that puts the backend's parts together.

It validates arguments at the boundary and hands each call to the module that owns it:
`_appends` (the append statement), `_reads` (the gap-free read path), `_subscriptions`
(checkpoints, reset, dead letters), `_status_report` (projection status), `_leadership`
(locks on dedicated sessions), `_listener` (LISTEN) and `_admin` (raw SQL for tooling).
`open_postgres_store` opens it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Final, final

import trio

from .._backend._reader import Page, ReadEventsBase, Undecodable
from .._errors import (
    InvalidArgument,
    LeadershipLost,
    LeadershipUnavailable,
    ProjectionNotFound,
    ProjectionRunning,
    StoreClosed,
)
from .._events import AppendResult, NewEvent, RecordedEvent, StreamAppend
from .._filters import EventFilter
from .._partitions import Unit, check_partitions, units_of
from .._personal._fields import check_subject
from .._personal._forget import ForgetRecord, notify_forgotten
from .._personal._keys import Keyring, KeyWrapper
from .._positions import Position
from .._protocols import OneStreamAppend
from .._queries import (
    AppendCondition,
    EventQuery,
    QueryResult,
    check_append_tagged,
    check_read_query,
    tagged_stream_id,
)
from .._snapshots import Snapshot, check_snapshot
from .._status import DeadLetter, LiveHost, ProjectionStatus
from .._validation import (
    check_name,
    check_projection_name,
    check_projector_name,
    check_state_name,
    check_stream_id,
    check_version_cursor,
)
from .._versions import (
    VersionRole,
    VersionSwitch,
    check_version,
    split_versioned,
    versioned_name,
)
from . import _pool
from ._admin import PostgresAdmin
from ._appends import DEFAULT_MAX_APPEND_BYTES, AppendStatement
from ._bridge import Connection
from ._fence import LOCKS_IN_USE
from ._group_commit import GroupCommit
from ._keys import projector_lock_key
from ._leadership import (
    LeadershipContext,
    PostgresLeadership,
    acquire_leadership,
    fenced_transaction,
    try_acquire_all,
)
from ._listener import Listener
from ._membership import PostgresMembership, hosts_channel, live_hosts, register_host
from ._notifier import Notifier
from ._personal import PersonalData
from ._queries import QueryStatements, conditional_result, query_result, retry_deadlock
from ._reads import (
    ReadQueries,
    decode_row,
    ensure_partition_index,
    horizon,
    partition_index_advice,
    read_page,
    recorded_row,
)
from ._schema import (
    notify_channel,
)
from ._snapshots import SnapshotTable
from ._status_report import StatusReport
from ._subscriptions import Subscriptions
from ._transaction import Isolation, PostgresTransaction, open_transaction
from ._versions import Versions, drop_schema_statement, refuse_serving

DSN_ENVIRONMENT_VARIABLE: Final = "EVENTCORE_DSN"

logger = logging.getLogger("eventcore_trio.postgres")

# Seconds between a waiting change of partition count's attempts, at most (it also tries
# again whenever a host joins, leaves or publishes): how long after the last unit of the old
# count stops the change may take, when no notification comes.
REPARTITION_RETRY: Final = 1.0


@final
class PostgresStore(ReadEventsBase, OneStreamAppend):
    """An event store on PostgreSQL; obtain one with `open_postgres_store`.

    Appends, reads and checkpoints use a connection pool, one statement per call; each
    leadership uses a dedicated connection of its own, and `wait_for_events` one shared
    LISTEN connection, opened on first use.

    It keeps personal data (`PersonalDataStore`): values sealed in this process, data keys
    wrapped by the key-encryption key in the ``subject_keys`` table, a forget that deletes
    the key (docs/personal-data.md).

    .. versionadded:: 0.1
    .. versionchanged:: 0.4
       Personal data (`forget`, `forget_records`, `rewrap`).
    """

    def __init__(
        self,
        *,
        pool: _pool.Pool,
        nursery: trio.Nursery,
        options: _pool.SessionOptions,
        schema: str,
        system_identifier: str | None,
        server_version: int,
        max_append_bytes: int = DEFAULT_MAX_APPEND_BYTES,
        keyring: Keyring | None = None,
    ) -> None:
        self._pool = pool
        # How leaderships, LISTEN sessions and index builds connect.
        self._options = options
        self._schema = schema
        self._server_version = server_version
        self._closed = False
        # Partition counts whose index this role may not build (logged once each).
        self._unindexed: set[int] = set()
        self._append_statement = AppendStatement(schema, max_append_bytes)
        self._personal = PersonalData(pool, schema, keyring or Keyring(None))
        # Every write path seals through the append statement (AppendStatement.seal).
        self._append_statement.sealer = self._personal.seal_appends
        self._reads = ReadQueries(schema)
        self._queries = QueryStatements(schema)
        self._snapshots = SnapshotTable(pool, schema, self._reads.read_stream, self._personal)
        self._subscriptions = Subscriptions(pool, schema, system_identifier)
        self._versions = Versions(pool, self._subscriptions)
        # Read-model schemas known to exist (see `read_model_schema`).
        self._read_model_schemas: set[str] = set()
        self._status_report = StatusReport(pool, self._reads, self._subscriptions)
        # Readers' wake-ups, and balancing hosts'; each connects on its first wait.
        listener = functools.partial(Listener, nursery=nursery, options=options)
        self._listener = listener(channel=notify_channel(schema), role="listener")
        self._hosts_listener = listener(channel=hosts_channel(schema), role="hosts listener")
        self._notifier = Notifier(nursery=nursery, pool=pool, channel=notify_channel(schema))
        # Concurrent appends share statements (see _group_commit).
        self._group_commit = GroupCommit(
            pool,
            self._append_statement,
            notify_channel(schema),
            on_unnotified=self._notifier.poke,
        )
        self._leadership_context = LeadershipContext(
            self._subscriptions,
            server_version,
            append_statement=self._append_statement,
            on_appended=self._notifier.poke,
        )
        self._admin = PostgresAdmin(
            pool=pool,
            schema=schema,
            options=options,
            append_statement=self._append_statement,
            notifier=self._notifier,
            group_commit=self._group_commit,
        )

    @property
    def schema(self) -> str:
        """The PostgreSQL schema holding this store's tables."""
        return self._schema

    @property
    def notify_channel(self) -> str:
        """The LISTEN channel notified after every committed append."""
        return notify_channel(self._schema)

    @property
    def server_version(self) -> int:
        """The server's ``server_version_num``, e.g. 160002."""
        return self._server_version

    @property
    def max_append_bytes(self) -> int:
        """The largest append this store sends, in bytes of encoded events (see
        `open_postgres_store`); a larger one raises `AppendTooLarge` before any I/O.

        .. versionadded:: 0.3
        """
        return self._append_statement.max_bytes

    @property
    def admin(self) -> PostgresAdmin:
        """Raw SQL on this store's database, for tooling and tests (see `PostgresAdmin`).

        .. versionadded:: 0.2
        """
        return self._admin

    async def aclose(self) -> None:
        """Mark the store closed and send the wake-up its last appends still owe.

        `open_postgres_store` calls it when its block ends, before it stops the store's
        services and closes its pool; calling it again does nothing more.
        """
        if self._closed:
            return
        self._closed = True
        # Before the services stop: the last appends' wake-up is not left behind.
        await self._notifier.flush()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(
                "this PostgresStore was closed; open a new one with open_postgres_store()"
            )

    # -- EventStore ---------------------------------------------------------------------

    async def append_atomic(self, appends: Sequence[StreamAppend]) -> AppendResult:
        """Append to several streams in one transaction (see `EventStore.append_atomic`);
        `append` for one stream.

        One statement, one round trip, one crossing into asyncio, whatever the event count.
        Events larger in all than `max_append_bytes` (all the streams' events together) raise
        `AppendTooLarge`, before any I/O.

        Personal fields are sealed first (their subjects' keys made as needed).

        Raises:
            ConfigurationError: an event has personal fields and the store has no
                key-encryption key.
            SubjectForgottenError: an event has personal fields of a forgotten subject.

        .. versionchanged:: 0.4
           Personal fields.
        """
        request = self._append_statement.encode(await self._append_statement.seal(appends))
        self._check_open()
        return await self._group_commit.append(request)

    async def read_query(
        self, query: EventQuery, *, after: Position | None = None, limit: int | None = None
    ) -> QueryResult:
        """The events matching *query* after *after* (at most *limit*), in the global order,
        and the position up to which the read is complete (see
        `TaggedEventStore.read_query`).

        One statement: it takes the query's guard locks for an instant (waiting for
        transactions that may be writing a matching event to end), then reads in a snapshot
        taken after them (docs/postgres.md, "Decisions over a query").

        .. versionadded:: 0.4
        """
        check_read_query(query, after, limit)
        self._check_open()
        sql, args = self._queries.read(query, after, limit)
        rows = await retry_deadlock(lambda: self._pool.fetch(sql, *args))
        return query_result(rows, after, limit, await self._personal.keys_for(rows))

    async def append_tagged(
        self,
        events: Sequence[NewEvent],
        *,
        condition: AppendCondition | None = None,
        stream_id: str | None = None,
        expected_version: int | None = None,
    ) -> AppendResult:
        """Append *events* as one commit if *condition* holds (see
        `TaggedEventStore.append_tagged`): no event matching its query lies after its
        position. Without a condition, the same as `append`.

        The conditional append is one statement in a transaction of its own: it holds the
        query's guard locks from its check to its commit, so two decisions whose queries
        overlap never both succeed, and decisions whose queries do not overlap never wait
        for each other.

        .. versionadded:: 0.4
        """
        check_append_tagged(condition, stream_id, expected_version)
        appends = [
            StreamAppend(tagged_stream_id(stream_id), events, expected_version=expected_version)
        ]
        if condition is None:
            return await self.append_atomic(appends)
        encoded = self._append_statement.encode(await self._append_statement.seal(appends))
        self._check_open()
        sql, args = self._queries.append(encoded, condition.fail_if_events_match, condition.after)
        row = await retry_deadlock(lambda: self._pool.fetchrow(sql, *args))
        # Its own statement, not a group commit's: wake the readers.
        self._notifier.poke()
        return conditional_result(row, encoded)

    async def read_stream(self, stream_id: str, *, after_version: int = 0) -> list[RecordedEvent]:
        """Return a stream's events after *after_version* (see `EventStore.read_stream`)."""
        check_stream_id(stream_id)
        check_version_cursor(after_version)
        self._check_open()
        rows = await self._pool.fetch(self._reads.read_stream, stream_id, after_version)
        keys = await self._personal.keys_for(rows)
        return [recorded_row(row, keys) for row in rows]

    def transaction(
        self, *, isolation: Isolation = "read committed"
    ) -> AbstractAsyncContextManager[PostgresTransaction]:
        """One transaction of your own, with appends: the outbox pattern.

        Write your application's rows and append events atomically, in one transaction on a
        pooled connection; it commits when the block ends, or rolls back if the block
        raises. Readers never skip its events, however long it ran before appending, and
        are woken once it commits.

        Example::

            async with store.transaction() as tx:
                await tx.execute("INSERT INTO orders (id, total) VALUES ($1, $2)", order, 30)
                await tx.append(f"order-{order}", [NewEvent("OrderPlaced", {"total": 30})],
                                expected_version=0)

        Args:
            isolation: ``"read committed"`` (the default), ``"repeatable read"`` or
                ``"serializable"``. At a stricter level the transaction announces itself as
                an event writer when it begins, so it holds readers back (events committed
                after it started wait) until it ends; at READ COMMITTED only from its first
                append on.

        Raises:
            InvalidArgument: an unknown isolation level.
            DatabaseError: a statement in the block failed, even if the block caught its
                error: nothing was committed.

        If the COMMIT itself is interrupted (the block is cancelled while it runs, or the
        connection is lost), the outcome is in doubt: the server may have committed. Find
        out from what you wrote: read back a row of your own, or `read_stream` the stream
        you appended to and look for your events' ids (give them event ids, so that a
        retry is refused as a `DuplicateEventId` if the first attempt did commit). Readers
        are woken either way.

        .. versionadded:: 0.3
        """
        self._check_open()
        return open_transaction(
            self._pool, self._schema, self._append_statement, self._notifier.poke, isolation
        )

    # -- SnapshotStore -------------------------------------------------------------------

    async def read_snapshot(self, stream_id: str, state: str) -> Snapshot | None:
        """The snapshot of *stream_id* under *state* (see `SnapshotStore.read_snapshot`)."""
        check_stream_id(stream_id)
        check_state_name(state)
        self._check_open()
        return await self._snapshots.read(stream_id, state)

    async def read_stream_from_snapshot(
        self, stream_id: str, state: str
    ) -> tuple[Snapshot | None, list[RecordedEvent]]:
        """A snapshot and the events from it on, in one round trip (see
        `SnapshotStore.read_stream_from_snapshot`)."""
        check_stream_id(stream_id)
        check_state_name(state)
        self._check_open()
        return await self._snapshots.read_with_events(stream_id, state)

    async def write_snapshot(self, snapshot: Snapshot) -> None:
        """Keep *snapshot* (see `SnapshotStore.write_snapshot`); one statement."""
        check_snapshot(snapshot)
        self._check_open()
        await self._snapshots.write(snapshot)

    async def delete_snapshots(self, stream_id: str | None = None) -> int:
        """Delete snapshots (see `SnapshotStore.delete_snapshots`)."""
        if stream_id is not None:
            check_stream_id(stream_id)
        self._check_open()
        return await self._snapshots.delete(stream_id)

    # -- EventReader --------------------------------------------------------------------

    async def _read_page(
        self, after: Position | None, limit: int, filter: EventFilter | None, mode: Undecodable
    ) -> Page:
        # One statement, unless an open transaction holds events back: the filter and the
        # gap-free visibility rule are WHERE clauses, walked along the ``(tx, position)``
        # primary key (see `read_page`).
        self._check_open()
        rows = await read_page(self._pool, self._reads, after, limit, filter)
        # The page's subjects' keys, as they are now (a forget elsewhere is seen at once).
        keys = await self._personal.keys_for(rows)
        if mode == "raise":
            return [recorded_row(row, keys) for row in rows]
        return [decode_row(row, keys) for row in rows]

    async def last_position(self, filter: EventFilter | None = None) -> Position | None:
        """The position of the last visible event matching *filter*, or None."""
        self._check_open()
        sql, args = self._reads.last_position(filter, await horizon(self._pool, self._reads))
        row = await self._pool.fetchrow(sql, *args)
        return None if row is None else Position(row["tx"], row["position"])

    async def wait_for_events(self) -> None:
        """Return when a NOTIFY says an append committed (see `EventReader.wait_for_events`).

        The first call starts one LISTEN connection for the store, which reconnects with
        backoff if it is lost; a (re)connect also wakes waiters, since notifications may have
        been missed meanwhile. Bound each wait with a cancel scope and poll as well.
        """
        self._check_open()
        await self._listener.wait()

    # -- CheckpointStore ----------------------------------------------------------------

    async def load_checkpoint(self, name: str) -> Position | None:
        """Return the saved position for *name* (see `CheckpointStore.load_checkpoint`).

        Raises:
            ClusterMismatch: the checkpoint was saved on another PostgreSQL cluster (for
                example before a dump and restore), where its position means something else.
            CheckpointAhead: the checkpoint is beyond every position this store can have
                produced (a transaction id at or above the snapshot's xmax, or a position
                above the last one the sequence drew): reset the projection.
        """
        check_name(name)
        self._check_open()
        return await self._subscriptions.load_checkpoint(name)

    async def save_checkpoint(self, name: str, position: Position) -> None:
        """Save a checkpoint with compare-and-set; it never moves backwards.

        Raises:
            CheckpointConflict: *position* is behind the saved checkpoint; nothing changed.
            CheckpointAhead: *position* is beyond every position this store can have
                produced (a transaction id above every one assigned so far, or a position
                above the last one the sequence drew); nothing changed.
        """
        check_name(name)
        if not isinstance(position, Position):
            raise InvalidArgument(f"position must be a Position, got {type(position).__name__}")
        self._check_open()
        await self._subscriptions.save_checkpoint(name, position)

    # -- ProjectorCoordinator -----------------------------------------------------------

    @asynccontextmanager
    async def try_acquire(self, name: str) -> AsyncIterator[PostgresLeadership]:
        """Lead *name* for the duration of an ``async with``, without waiting.

        Opens a dedicated connection (not from the pool), takes a session advisory lock with
        ``pg_try_advisory_lock`` and holds it for the block. On exit, exception or
        cancellation the connection is closed, shielded and within a timeout, which releases
        the lock.

        Raises:
            LeadershipUnavailable: another session holds the lock.
            UnsupportedPooling: the connection goes through a transaction-pooling proxy.
            StoreConnectionError: the server cannot be reached.
        """
        async with self._acquire(name, wait=False) as leadership:
            yield leadership

    @asynccontextmanager
    async def wait_acquire(
        self, name: str, *, on_standby: Callable[[], None] | None = None
    ) -> AsyncIterator[PostgresLeadership]:
        """Lead *name* for the block, first standing by while another session leads.

        The standby blocks in ``pg_advisory_lock`` on its dedicated connection (in slices of
        a few seconds, so that it holds no snapshot for long), so the server hands it the
        lock the moment the leader's session ends. Cancel to stop waiting.

        Raises:
            UnsupportedPooling: the connection goes through a transaction-pooling proxy.
            StoreConnectionError: the server cannot be reached, or the session was lost while
                standing by.
        """
        async with self._acquire(name, wait=True, on_standby=on_standby) as leadership:
            yield leadership

    @asynccontextmanager
    async def register_host(
        self, *, runs: Collection[str] | None = None
    ) -> AsyncIterator[PostgresMembership]:
        """Join the host registry for the block (see `ProjectorCoordinator.register_host`).

        Holds a membership lock on a dedicated connection for the block: the host counts as
        alive exactly while that session lives. The host's row records the units it *runs*.

        .. versionchanged:: 0.3
           *runs*.
        """
        self._check_open()
        async with register_host(
            pool=self._pool,
            schema=self._schema,
            options=self._options,
            context=self._leadership_context,
            listener=self._hosts_listener,
            runs=runs,
        ) as membership:
            yield membership

    async def set_partitions(
        self, name: str, partitions: int, *, on_waiting: Callable[[], None] | None = None
    ) -> None:
        """Record that projection *name* runs as *partitions* units (see `ProjectorCoordinator`).

        A change holds the lock of every unit of the current count while it commits. It
        takes them all at once or none, on one session and without waiting for any (see
        `_try_repartition`): while some unit of the current count is led or awaited, it
        calls *on_waiting* (once) and tries again when a host joins, leaves or publishes,
        and at least every `REPARTITION_RETRY` seconds. It never holds some of those locks
        while it waits for others, and never queues for one ahead of a standby, so the
        hosts running the current count keep leading every unit of it until they stop.

        Raises:
            PartitionsChanged: *partitions* is neither the current count nor a multiple of it,
                and events were applied; raised before any wait.

        .. versionchanged:: 0.3
           *on_waiting*; a change no longer queues for the old count's locks one by one.
        """
        check_name(name)
        check_partitions(partitions)
        self._check_open()
        if partitions > 1:
            await self._ensure_partition_index(partitions)
        waiting = False
        while (current := await self._subscriptions.partitions(name)) != partitions:
            if current is None:
                # Nothing recorded yet, so no unit to lock: the row decides between rivals.
                async with self._pool.acquire() as connection, connection.transaction():
                    if await self._subscriptions.repartition(
                        connection, name, partitions, locked=None
                    ):
                        return
                continue
            await self._subscriptions.check_change(name, current, partitions)
            outcome = await self._try_repartition(name, current, partitions)
            if outcome:
                return
            if outcome is None:
                if not waiting:
                    waiting = True
                    if on_waiting is not None:
                        on_waiting()
                with trio.move_on_after(REPARTITION_RETRY):
                    await self._hosts_listener.wait()

    async def _try_repartition(self, name: str, current: int, requested: int) -> bool | None:
        # One attempt to change *name*'s count from *current* to *requested*: True when done,
        # False when the recorded count is no longer *current*, None while a unit of it is
        # led or awaited.
        #
        # Why all at once, never waiting: taking the locks one by one, waiting for each while
        # holding the others (hold-and-wait), queued this session behind the leaders of the
        # old count, ahead of their standbys; a lock released (a lost session, a hand-off)
        # went to it instead of to a standby, and it then held that unit, led by nobody,
        # while it waited for the next one for as long as any host of the old count lived.
        # Now a lock is only ever tried: PostgreSQL refuses a try while another session holds
        # the lock or waits for it, so a standby is never overtaken, and a unit is held here
        # only for the moments of an attempt. An attempt that takes all of them commits the
        # change on the session holding them, fenced, so no unit of the old count runs then.
        units = [unit.name for unit in units_of(name, current)]
        keys = [projector_lock_key(self._schema, unit) for unit in units]
        if await self._pool.fetchval(f"SELECT {LOCKS_IN_USE.format(keys='$1::bigint[]')}", keys):
            return None  # cheap: no connection opened while a host of the old count lives
        try:
            async with (
                try_acquire_all(
                    self._options.session_dsn,
                    names=units,
                    keys=keys,
                    context=self._leadership_context,
                    application_name=f"{self._options.application_name} repartition {name}",
                    connect_timeout=self._options.connect_timeout,
                ) as leadership,
                fenced_transaction(leadership, keys) as connection,
            ):
                done = await self._subscriptions.repartition(
                    connection, name, requested, locked=current
                )
                if done:
                    # Waiters of other units and hosts try again at once (at the commit).
                    await connection.execute(
                        "SELECT pg_notify($1, $2)", hosts_channel(self._schema), name
                    )
                return done
        except (LeadershipUnavailable, LeadershipLost):
            return None  # a session took or awaits one of them meanwhile; nothing changed

    async def recorded_partitions(self, name: str) -> int | None:
        """How many units projection *name* runs as (see `ProjectorCoordinator`): the count
        in the ``projections`` table; 1 for a projection that checkpointed before counts were
        recorded; None for one that never ran here."""
        check_projection_name(name)
        self._check_open()
        return await self._subscriptions.partitions(name)

    async def version_role(self, name: str, version: int) -> VersionRole:
        """What *version* of *name* does now (see `ProjectorCoordinator.version_role`).

        One statement while a version of *name* serves (a read of its ``serving_versions``
        row); the first version asked about inserts that row, and when two hosts ask at
        once, one insert wins and the other reads it.

        .. versionadded:: 0.4
        """
        check_projector_name(name)
        check_version(version)
        self._check_open()
        return await self._versions.role(name, version)

    async def switch_if_caught_up(
        self, name: str, version: int, units: Sequence[tuple[str, EventFilter]]
    ) -> VersionRole:
        """Make *version* of *name* serve if it builds and has caught up (see
        `ProjectorCoordinator.switch_if_caught_up`).

        One transaction: it locks *name*'s serving row, reads the units' checkpoints (one
        beyond the store is not caught up), asks for each unit whether a committed matching
        event follows it (an ``EXISTS``, one index step each), and records the switch.

        Raises:
            InvalidArgument: a unit of *units* is not a unit of that version.

        .. versionadded:: 0.4
        """
        check_projector_name(name)
        check_version(version)
        self._check_open()
        return await self._versions.switch_if_caught_up(name, version, units)

    async def _ensure_partition_index(self, partitions: int) -> None:
        # The index that serves each partition's reads (see _reads.ensure_partition_index).
        # A role that does not own the events table (a least-privilege runtime role) may not
        # build it: the change goes on without it, and the owner is told once what to run.
        built = await ensure_partition_index(
            self._pool,
            self._schema,
            partitions,
            options=self._options,
        )
        if not built and partitions not in self._unindexed:
            self._unindexed.add(partitions)
            logger.warning(
                "no index serves the reads of %d partitions in schema %r, and this role may "
                "not build it (it does not own %s.events): each partition's read scans the "
                "whole log until the schema's owner runs `%s`",
                partitions,
                self._schema,
                self._schema,
                partition_index_advice(self._schema, partitions),
            )

    @asynccontextmanager
    async def _acquire(
        self,
        name: str,
        *,
        wait: bool,
        on_standby: Callable[[], None] | None = None,
        role: str = "leader",
    ) -> AsyncIterator[PostgresLeadership]:
        # *role* goes into the session's application_name, which status reads to tell an
        # operator's reset from a leader or a standby.
        check_name(name)
        self._check_open()
        async with acquire_leadership(
            self._options.session_dsn,
            name=name,
            key=projector_lock_key(self._schema, name),
            context=self._leadership_context,
            application_name=f"{self._options.application_name} {role} {name}",
            connect_timeout=self._options.connect_timeout,
            wait=wait,
            on_standby=on_standby,
        ) as leadership:
            yield leadership

    # -- ProjectionAdmin ----------------------------------------------------------------

    async def projection_status(self) -> list[ProjectionStatus]:
        """One record per unit that has run or checkpointed here, or that a live host runs
        (see `ProjectionAdmin`).

        Lag counts visible events after the checkpoint that match the projector's filter, so
        it costs a range scan per projection: an operator's call, not a hot path. A unit that
        has not run yet counts every event (of its partition): its filter is recorded when it
        first runs. ``runnable_by`` and ``lacking_hosts`` come from the live balancing hosts'
        rows.

        A unit of a partition count other than the recorded one is listed while a live host
        runs it or a session leads or awaits its lock: ``awaiting-split`` (its lag counted
        from the checkpoint it will continue from), or ``failed`` when the change is refused.
        A unit whose lock a change of count holds is ``repartitioning``, not ``resetting``.

        .. versionchanged:: 0.3
           Units a live host runs are listed; ``runnable_by`` and ``lacking_hosts``; units of
           another partition count, ``awaiting-split`` and ``repartitioning``.
        """
        self._check_open()
        hosts = await live_hosts(self._pool, self._schema)
        return await self._status_report.read([(host.state, host.process) for host in hosts])

    async def live_hosts(self) -> list[LiveHost]:
        """Every live balancing host, idle ones too, oldest first (see `ProjectionAdmin`).

        A host counts while the server holds its membership lock's session: one statement
        over the ``hosts`` table and ``pg_locks``, no heartbeat to wait for.

        .. versionadded:: 0.4
        """
        self._check_open()
        return await live_hosts(self._pool, self._schema)

    async def reset_projection(self, name: str, *, wait: bool = False) -> None:
        """Forget *name*'s checkpoint and dead letters, so its next run rebuilds from scratch.

        Takes the projection's leadership for the reset (every partition's), so it never
        races a running instance; a partitioned projection is reset whole or not at all.
        Reset whole, a projection version's read-model schema is dropped too (its
        projector's ``setup`` creates its tables again before the first batch); a single
        partition's reset (``"name[2/4]"``) leaves the schema the others share alone.

        Raises:
            ProjectionRunning: another session leads it and *wait* is False.
            ProjectionNotFound: no projection of that name has run against this store.

        .. versionchanged:: 0.4
           Drops the read-model schema.
        """
        check_name(name)
        self._check_open()
        if not await self._subscriptions.exists(name):
            raise ProjectionNotFound(f"no projection named {name!r} has run against this store")
        schema = None
        if Unit.parse(name).partition is None:
            schema = self._versions.read_model_schema(*split_versioned(name))
        await self._under_every_lock(
            name,
            lambda: self._subscriptions.unit_names(name),
            wait=wait,
            work=lambda connection, units: self._reset(connection, units, schema),
        )

    async def _reset(self, connection: Connection, units: list[str], schema: str | None) -> None:
        await self._subscriptions.reset(connection, units)
        if schema is not None:
            await connection.execute(drop_schema_statement(schema))

    async def _under_every_lock(
        self,
        name: str,
        units_now: Callable[[], Awaitable[list[str]]],
        *,
        wait: bool,
        work: Callable[[Connection, list[str]], Awaitable[None]],
    ) -> None:
        # *work* on the first unit's session, in a transaction committed only while it holds
        # that lock, with every unit's lock held (in one order, so two operators cannot
        # deadlock): all of them together, or none. Units change when the partition count
        # does meanwhile: then again with the new ones.
        units = await units_now()
        while True:
            try:
                async with contextlib.AsyncExitStack() as stack:
                    held = [
                        await stack.enter_async_context(
                            self._acquire(unit, wait=wait, role="reset")
                        )
                        for unit in sorted(units)
                    ]
                    now = await units_now()
                    if now == units:
                        async with fenced_transaction(held[0], [held[0].lock_key]) as connection:
                            await work(connection, units)
                        return
            except LeadershipUnavailable as exc:
                raise ProjectionRunning(name) from exc
            units = now

    async def serving_version(self, name: str) -> int | None:
        """The version of *name* whose read model serves reads, None while none has run (see
        `ProjectionAdmin.serving_version`).

        .. versionadded:: 0.4
        """
        check_projector_name(name)
        self._check_open()
        return await self._versions.serving(name)

    async def version_switches(self, name: str) -> list[VersionSwitch]:
        """Every change of *name*'s serving version, oldest first (see
        `ProjectionAdmin.version_switches`): the ``version_switches`` table.

        .. versionadded:: 0.4
        """
        check_projector_name(name)
        self._check_open()
        return await self._versions.switches(name)

    async def serve_version(self, name: str, version: int) -> None:
        """Make *version* of *name* serve now (see `ProjectionAdmin.serve_version`); the
        versions above it that have not been retired are withdrawn.

        Raises:
            ProjectionNotFound: that version never ran here (no checkpoint row and no
                recorded partition count), or was retired.

        .. versionadded:: 0.4
        """
        check_projector_name(name)
        check_version(version)
        self._check_open()
        await self._versions.serve(name, version)

    async def retire_version(self, name: str, version: int, *, wait: bool = False) -> None:
        """Drop a version that does not serve: its checkpoints, dead letters, recorded
        partition count and read-model schema (``DROP SCHEMA ... CASCADE``), see
        `ProjectionAdmin.retire_version`.

        Takes every unit's lock first, as `reset_projection` does (*wait* as there), so no
        unit of it runs while it goes.

        Raises:
            InvalidArgument: *version* serves (switch to another first).
            ProjectionRunning: a unit of it runs and *wait* is False.
            ProjectionNotFound: that version of *name* never ran here.

        .. versionadded:: 0.4
        """
        check_projector_name(name)
        check_version(version)
        self._check_open()
        if await self._versions.serving(name) == version:
            raise refuse_serving(name, version)

        async def units_now() -> list[str]:
            units = await self._versions.retire_units(name, version)
            if units is None:
                raise ProjectionNotFound(
                    f"version {version} of projection {name!r} has not run against this store, "
                    "or was retired"
                )
            return units

        await self._under_every_lock(
            versioned_name(name, version),
            units_now,
            wait=wait,
            work=lambda connection, units: self._versions.retire(connection, name, version, units),
        )

    async def read_model_schema(self, name: str) -> str:
        """The PostgreSQL schema of the read model that serves reads of projection *name*:
        that of its serving version (`serving_version`). Read through it, and a new version
        that rebuilds is never seen half built: the name changes, in one step, once it has
        caught up.

        Example::

            schema = await store.read_model_schema("balances")
            row = await store.admin.fetchrow(
                f'SELECT balance FROM "{schema}".balances WHERE account = $1', "acc-1"
            )

        Ask for it per query, or cache it for a short while: at a switch the old version
        stops being updated (its schema is dropped when it is retired), so a cached name
        goes stale at once.

        Raises:
            ProjectionNotFound: no version of *name* has run against this store, or the
                serving version has no read-model schema (its projector has no ``setup``
                hook, so its tables are wherever the connection's ``search_path`` put them).

        .. versionadded:: 0.4
        """
        check_projector_name(name)
        self._check_open()
        version = await self._versions.serving(name)
        if version is None:
            raise ProjectionNotFound(
                f"no version of projection {name!r} has run against this store"
            )
        schema = self._versions.read_model_schema(name, version)
        if schema not in self._read_model_schemas:
            if not await self._pool.fetchval(
                "SELECT EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = $1)", schema
            ):
                raise ProjectionNotFound(
                    f"version {version} of projection {name!r} serves, but has no read-model "
                    "schema: its projector has no setup hook, so its tables are where the "
                    "connection's search_path put them (give it setup=... in a new version "
                    "to get a schema of its own)"
                )
            # A schema, once there, stays while its version serves (retire refuses the
            # serving version), so this is asked once per version.
            self._read_model_schemas.add(schema)
        return schema

    async def dead_letters(self, name: str) -> list[DeadLetter]:
        """The events *name* skipped and that were not replayed, in position order."""
        check_name(name)
        self._check_open()
        return await self._personal.open_letters(await self._subscriptions.dead_letters(name))

    # -- PersonalDataStore ----------------------------------------------------------------

    async def forget(self, subject: str) -> ForgetRecord:
        """Forget *subject*'s personal data (see `PersonalDataStore.forget`).

        One transaction: the ``SubjectForgotten`` event on ``$forgotten-<subject>``, the
        subject's key deleted (its row kept, as the audit record and the refusal of its
        personal data from then on), the snapshots of the streams holding its personal
        events deleted. Then this process's state caches drop those streams. A concurrent
        append of the subject's personal data either commits first (and is forgotten with
        the rest) or is refused (`SubjectForgottenError`).

        .. versionadded:: 0.4
        """
        check_subject(subject)
        self._check_open()
        record, streams = await self._personal.forget(subject, self.transaction)
        if streams:
            notify_forgotten(self, streams)
        return record

    async def forget_records(self, subject: str | None = None) -> list[ForgetRecord]:
        """The audit of forgets (see `PersonalDataStore.forget_records`).

        .. versionadded:: 0.4
        """
        if subject is not None:
            check_subject(subject)
        self._check_open()
        return await self._personal.forget_records(subject)

    async def rewrap(self, key_encryption_key: bytes | KeyWrapper) -> int:
        """Wrap every data key under a new key-encryption key (see
        `PersonalDataStore.rewrap`).

        It goes round until no key is left to rewrap (keys made meanwhile included), then
        makes new keys under the new KEK. Each round is one statement that replaces a key
        only if it is still the one rewrapped. Other processes must then be opened with the
        new KEK: keys they made under the old one after the last round stay under it (run
        rewrap again from a process that has both, see docs/personal-data.md).

        .. versionadded:: 0.4
        """
        self._check_open()
        return await self._personal.rewrap(key_encryption_key)
