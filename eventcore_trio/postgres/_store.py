"""`PostgresStore`: the event store, reader, checkpoint store and coordinator on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, Literal, final, overload

import attrs
import trio

from .._concurrency import service_nursery
from .._errors import (
    CheckpointConflict,
    ClusterMismatch,
    ConfigurationError,
    DatabaseError,
    EventDecodeError,
    InvalidArgument,
    LeadershipUnavailable,
    ProjectionNotFound,
    ProjectionRunning,
    StoreClosed,
    StoreConnectionError,
    UnsupportedServer,
)
from .._events import (
    AppendResult,
    NewEvent,
    RecordedEvent,
    StreamAppend,
    UndecodableEvent,
    prepare_appends,
)
from .._filters import EventFilter
from .._positions import Position, position_parts, trusted_position
from .._status import (
    DeadLetter,
    LeaderInfo,
    OpenTransaction,
    ProjectionState,
    ProjectionStatus,
    unit_state,
)
from .._validation import (
    check_expected_version,
    check_limit,
    check_name,
    check_stream_id,
    check_version_cursor,
    encode_json_object,
)
from . import _bridge
from ._dsn import normalize_dsn
from ._keys import projector_lock_key
from ._leadership import LeadershipContext, PostgresLeadership, acquire_leadership
from ._schema import (
    MINIMUM_SERVER_VERSION_NUM,
    check_schema,
    check_schema_name,
    notify_channel,
)
from ._schema import (
    migrate as migrate_schema,
)

DSN_ENVIRONMENT_VARIABLE: Final = "EVENTCORE_DSN"

_EVENT_COLUMNS: Final = (
    "tx, position, stream_id, stream_version, event_id, type, data, metadata, recorded_at"
)


def _next_prefix(prefix: str) -> str | None:
    # The smallest string greater than every string that starts with prefix, in code-point
    # order (the "C" collation of stream_id): lets a prefix filter be an index range scan.
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            return "".join(chars) + chr(last + 1)
    return None


def _filter_clauses(event_filter: EventFilter | None, args: list[object]) -> list[str]:
    # Filters become WHERE clauses, so they apply before the LIMIT; parameters are appended
    # to *args* and numbered after what is already there.
    clauses: list[str] = []
    if event_filter is None:
        return clauses
    if event_filter.event_types is not None:
        args.append(sorted(event_filter.event_types))
        clauses.append(f"type = ANY(${len(args)}::text[])")
    if event_filter.stream_prefix is not None:
        args.append(event_filter.stream_prefix)
        clauses.append(f"stream_id >= ${len(args)}")
        upper = _next_prefix(event_filter.stream_prefix)
        if upper is not None:
            args.append(upper)
            clauses.append(f"stream_id < ${len(args)}")
    if event_filter.stream_regex is not None:
        args.append(event_filter.stream_regex)
        clauses.append(f"stream_id ~ ${len(args)}")
    return clauses


# Gap-free visibility: only rows of transactions below the snapshot's xmin, all of which have
# ended. A transaction that drew its position early but commits late has a tx at or above
# today's xmin, so it is read later, never skipped. See docs/postgres.md ("Gap-free reads").
_VISIBLE: Final = "tx < pg_snapshot_xmin(pg_current_snapshot())::text::bigint"


@final
class PostgresStore:
    """An event store on PostgreSQL; obtain one with `open_postgres_store`.

    Appends, reads and checkpoints use a connection pool, one statement per call; each
    leadership uses a dedicated connection of its own, and `wait_for_events` one shared
    LISTEN connection, opened on first use.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        *,
        pool: _bridge.Pool,
        nursery: trio.Nursery,
        dsn: str,
        session_dsn: str,
        schema: str,
        system_identifier: str | None,
        server_version: int,
        application_name: str,
        connect_timeout: float,
    ) -> None:
        self._pool = pool
        # Runs the LISTEN service; cancelled when the store closes.
        self._nursery = nursery
        self._dsn = dsn
        # Where sessions that must own a server session connect: leadership and LISTEN.
        self._session_dsn = session_dsn
        self._schema = schema
        self._system_identifier = system_identifier
        self._server_version = server_version
        self._application_name = application_name
        self._connect_timeout = connect_timeout
        self._closed = False
        # Set and replaced whenever a notification (or a listener reconnect) says that new
        # events may be visible. The listener starts with the first wait_for_events().
        self._appended = trio.Event()
        self._listening = False
        self._leadership_context = LeadershipContext(schema, system_identifier, server_version)
        s = f'"{schema}"'
        self._events_table = f"{s}.events"
        self._sql_append = f"SELECT * FROM {s}.append_events($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        self._sql_read_stream = (
            f"SELECT {_EVENT_COLUMNS} FROM {s}.events "
            "WHERE stream_id = $1 AND stream_version > $2 ORDER BY stream_version"
        )
        self._sql_load_checkpoint = (
            f"SELECT tx, position, system_identifier FROM {s}.subscriptions "
            "WHERE subscription_name = $1"
        )
        # Compare-and-set: the row changes only if the new position is not behind the stored
        # one; otherwise no row comes back and the caller raises CheckpointConflict.
        self._sql_save_checkpoint = (
            f"INSERT INTO {s}.subscriptions AS c "
            "(subscription_name, tx, position, system_identifier, updated_at) "
            "VALUES ($1, $2, $3, $4, now()) "
            "ON CONFLICT (subscription_name) DO UPDATE "
            "SET tx = excluded.tx, position = excluded.position, "
            "system_identifier = excluded.system_identifier, updated_at = now() "
            "WHERE c.tx IS NULL OR (c.tx, c.position) <= (excluded.tx, excluded.position) "
            "RETURNING 1"
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

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(
                "this PostgresStore was closed; open a new one with open_postgres_store()"
            )

    # -- EventStore ---------------------------------------------------------------------

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None = None,
    ) -> AppendResult:
        """Append *events* to one stream, all or none (see `EventStore.append`).

        One statement, one round trip, one crossing into asyncio, whatever the event count.
        """
        request = StreamAppend(
            check_stream_id(stream_id),
            events,  # the converter validates and freezes it
            expected_version=check_expected_version(expected_version),
        )
        return await self.append_atomic([request])

    async def append_atomic(self, appends: Sequence[StreamAppend]) -> AppendResult:
        """Append to several streams in one transaction (see `EventStore.append_atomic`)."""
        sql, args = self._append_statement(appends)
        self._check_open()
        row = await self._pool.fetchrow(sql, *args)
        assert row is not None
        position = (
            None if row["last_tx"] is None else Position(row["last_tx"], row["last_position"])
        )
        streams, counts = args[0], args[2]
        versions = {
            stream: base + count
            for stream, base, count in zip(streams, row["versions"], counts, strict=True)
        }
        return AppendResult(position, versions)

    def _append_statement(self, appends: Sequence[StreamAppend]) -> tuple[str, list[Any]]:
        # Validate and encode everything before any I/O; returns the one statement's SQL and
        # arguments (also used by the test harness to hold an append's commit back).
        requests = sorted(prepare_appends(appends), key=lambda a: a.stream_id)
        streams: list[str] = []
        expected: list[int | None] = []
        counts: list[int] = []
        event_stream: list[int] = []
        offsets: list[int] = []
        event_ids: list[object] = []
        types: list[str] = []
        data: list[str] = []
        metadata: list[str] = []
        for index, request in enumerate(requests, start=1):
            streams.append(request.stream_id)
            expected.append(request.expected_version)
            counts.append(len(request.events))
            for offset, event in enumerate(request.events, start=1):
                event_stream.append(index)
                offsets.append(offset)
                event_ids.append(event.event_id)
                types.append(event.type)
                data.append(encode_json_object("data", event.data))
                metadata.append(encode_json_object("metadata", event.metadata))
        # NULL instead of arrays that say nothing (see the append function): fewer bytes to
        # encode, send and unnest for the common single-stream, id-less, metadata-less append.
        single = len(streams) == 1
        args = [
            streams,
            expected,
            counts,
            None if single else event_stream,
            None if single else offsets,
            event_ids if any(i is not None for i in event_ids) else None,
            types,
            data,
            None if all(m == "{}" for m in metadata) else metadata,
        ]
        return self._sql_append, args

    async def read_stream(self, stream_id: str, *, after_version: int = 0) -> list[RecordedEvent]:
        """Return a stream's events after *after_version* (see `EventStore.read_stream`)."""
        check_stream_id(stream_id)
        check_version_cursor(after_version)
        self._check_open()
        rows = await self._pool.fetch(self._sql_read_stream, stream_id, after_version)
        return [_to_recorded(row) for row in rows]

    # -- EventReader --------------------------------------------------------------------

    @overload
    async def read_events(
        self,
        after: Position | None,
        *,
        limit: int,
        filter: EventFilter | None = None,
        undecodable: Literal["raise"] = "raise",
    ) -> list[RecordedEvent]: ...

    @overload
    async def read_events(
        self,
        after: Position | None,
        *,
        limit: int,
        filter: EventFilter | None = None,
        undecodable: Literal["include"],
    ) -> list[RecordedEvent | UndecodableEvent]: ...

    async def read_events(
        self,
        after: Position | None,
        *,
        limit: int,
        filter: EventFilter | None = None,
        undecodable: Literal["raise", "include"] = "raise",
    ) -> list[RecordedEvent] | list[RecordedEvent | UndecodableEvent]:
        """Return up to *limit* events after *after* (see `EventReader.read_events`).

        One statement: the filter and the gap-free visibility rule are WHERE clauses, walked
        along the ``(tx, position)`` primary key.
        """
        if after is not None and not isinstance(after, Position):
            raise InvalidArgument(f"after must be a Position or None, got {type(after).__name__}")
        check_limit(limit)
        if filter is not None and not isinstance(filter, EventFilter):
            raise InvalidArgument(f"filter must be an EventFilter, got {type(filter).__name__}")
        if undecodable not in ("raise", "include"):
            raise InvalidArgument(f"undecodable must be 'raise' or 'include', got {undecodable!r}")
        self._check_open()
        tx, seq = (0, 0) if after is None else position_parts(after)
        args: list[object] = [tx, seq, limit]
        clauses = ["(tx, position) > ($1, $2)", _VISIBLE, *_filter_clauses(filter, args)]
        sql = (
            f"SELECT {_EVENT_COLUMNS} FROM {self._events_table} "
            f"WHERE {' AND '.join(clauses)} ORDER BY tx, position LIMIT $3"
        )
        rows = await self._pool.fetch(sql, *args)
        if undecodable == "raise":
            return [_to_recorded(row) for row in rows]
        return [_decode_row(row) for row in rows]

    async def last_position(self, filter: EventFilter | None = None) -> Position | None:
        """The position of the last visible event matching *filter*, or None."""
        self._check_open()
        args: list[object] = []
        clauses = [_VISIBLE, *_filter_clauses(filter, args)]
        row = await self._pool.fetchrow(
            f"SELECT tx, position FROM {self._events_table} WHERE {' AND '.join(clauses)} "
            "ORDER BY tx DESC, position DESC LIMIT 1",
            *args,
        )
        return None if row is None else Position(row["tx"], row["position"])

    async def wait_for_events(self) -> None:
        """Return when a NOTIFY says an append committed (see `EventReader.wait_for_events`).

        The first call starts one LISTEN connection for the store, which reconnects with
        backoff if it is lost; a (re)connect also wakes waiters, since notifications may have
        been missed meanwhile. Bound each wait with a cancel scope and poll as well.
        """
        self._check_open()
        if not self._listening:
            self._listening = True
            self._nursery.start_soon(self._listen)
        await self._appended.wait()

    def _wake(self) -> None:
        self._appended.set()
        self._appended = trio.Event()

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            try:
                connection = await _bridge.connect(
                    self._session_dsn,
                    application_name=f"{self._application_name} listener",
                    connect_timeout=self._connect_timeout,
                )
                try:
                    lost = trio.Event()
                    connection.add_termination_listener(lost.set)
                    async with connection.listen(self.notify_channel) as notifications:
                        self._wake()
                        backoff = 0.1
                        async with trio.open_nursery() as nursery:

                            async def relay() -> None:
                                async for _ in notifications:
                                    self._wake()

                            nursery.start_soon(relay)
                            await lost.wait()
                            nursery.cancel_scope.cancel()
                finally:
                    await connection.close()
            except StoreConnectionError:
                pass
            # Lost or never made: wake pollers (they re-read anyway) and try again later.
            self._wake()
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    # -- CheckpointStore ----------------------------------------------------------------

    async def load_checkpoint(self, name: str) -> Position | None:
        """Return the saved position for *name* (see `CheckpointStore.load_checkpoint`).

        Raises:
            ClusterMismatch: the checkpoint was saved on another PostgreSQL cluster (for
                example before a dump and restore), where its position means something else.
        """
        check_name(name)
        self._check_open()
        row = await self._pool.fetchrow(self._sql_load_checkpoint, name)
        if row is None or row["tx"] is None:
            return None
        saved_on = row["system_identifier"]
        if saved_on is not None and self._system_identifier not in (None, saved_on):
            raise ClusterMismatch(
                f"checkpoint {name!r} was saved on PostgreSQL cluster {saved_on}, but this is "
                f"cluster {self._system_identifier}; its position would skip or repeat events "
                f"here. Reset the projection to rebuild it on this cluster."
            )
        return Position(row["tx"], row["position"])

    async def save_checkpoint(self, name: str, position: Position) -> None:
        """Save a checkpoint with compare-and-set; it never moves backwards.

        Raises:
            CheckpointConflict: *position* is behind the saved checkpoint; nothing changed.
        """
        check_name(name)
        if not isinstance(position, Position):
            raise InvalidArgument(f"position must be a Position, got {type(position).__name__}")
        self._check_open()
        tx, seq = position_parts(position)
        saved = await self._pool.fetchval(
            self._sql_save_checkpoint, name, tx, seq, self._system_identifier
        )
        if saved is None:
            raise CheckpointConflict(name, position, await self.load_checkpoint(name))

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
            StoreConnectionError: the server cannot be reached.
        """
        async with self._acquire(name, wait=False) as leadership:
            yield leadership

    @asynccontextmanager
    async def wait_acquire(
        self, name: str, *, on_standby: Callable[[], None] | None = None
    ) -> AsyncIterator[PostgresLeadership]:
        """Lead *name* for the block, first standing by while another session leads.

        The standby blocks in ``pg_advisory_lock`` on its dedicated connection, so the server
        hands it the lock the moment the leader's session ends. Cancel to stop waiting.

        Raises:
            StoreConnectionError: the server cannot be reached, or the session was lost while
                standing by.
        """
        async with self._acquire(name, wait=True, on_standby=on_standby) as leadership:
            yield leadership

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
            self._session_dsn,
            name=name,
            key=projector_lock_key(self._schema, name),
            context=self._leadership_context,
            application_name=f"{self._application_name} {role} {name}",
            connect_timeout=self._connect_timeout,
            wait=wait,
            on_standby=on_standby,
        ) as leadership:
            yield leadership

    # -- ProjectionAdmin ----------------------------------------------------------------

    async def projection_status(self) -> list[ProjectionStatus]:
        """One record per projection that has run or checkpointed here (see `ProjectionAdmin`).

        Lag counts visible events after the checkpoint that match the projector's filter, so
        it costs a range scan per projection: an operator's call, not a hot path.
        """
        self._check_open()
        s = f'"{self._schema}"'
        rows = await self._pool.fetch(
            "SELECT c.subscription_name, c.tx, c.position, c.filter::text AS filter, c.state, "
            "c.leader_pid, c.leader_host, c.leader_application, c.leader_backend_pid, "
            "c.last_error, c.updated_at, "
            f"(SELECT count(*) FROM {s}.dead_letters d "
            " WHERE d.subscription_name = c.subscription_name) AS dead_letters "
            f"FROM {s}.subscriptions c ORDER BY c.subscription_name"
        )
        # Every advisory lock (held or awaited) with its session's application_name, which
        # says whether a session leads or stands by, or is an operator's reset.
        locks = await self._pool.fetch(
            "SELECT ((l.classid::bigint << 32) | l.objid::bigint) AS key, l.granted, l.pid, "
            "a.application_name FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.objsubid = 1 "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        sessions: dict[int, list[_bridge.Record]] = {}
        for lock in locks:
            sessions.setdefault(lock["key"], []).append(lock)
        held_back_by = await self._oldest_open_transaction()
        now = dt.datetime.now(dt.UTC)
        result = []
        for row in rows:
            name = row["subscription_name"]
            key = projector_lock_key(self._schema, name)
            checkpoint = None if row["tx"] is None else Position(row["tx"], row["position"])
            event_filter = _filter_from_json(row["filter"])
            lag_events, oldest = await self._lag(checkpoint, event_filter)
            unit = _lock_sessions(sessions.get(key, []), name)
            holder: ProjectionState | None = None
            leader = None
            if unit.holder_resetting:
                holder = ProjectionState.RESETTING
            elif unit.holder_pid is not None:
                # The leader recorded in the row is named only while its own session holds
                # the lock: a new leader that has not reported yet is shown without one.
                own = unit.holder_pid == row["leader_backend_pid"]
                replaying = own and row["state"] == ProjectionState.REPLAYING.value
                holder = ProjectionState.REPLAYING if replaying else ProjectionState.RUNNING
                if own and not replaying and row["leader_pid"] is not None:
                    leader = LeaderInfo(
                        pid=row["leader_pid"],
                        host=row["leader_host"],
                        application_name=row["leader_application"],
                    )
            state = unit_state(
                holder=holder,
                standbys=unit.standbys,
                last=ProjectionState(row["state"]),
            )
            result.append(
                ProjectionStatus(
                    name=name,
                    checkpoint=checkpoint,
                    lag_events=lag_events,
                    lag_seconds=0.0 if oldest is None else max(0.0, (now - oldest).total_seconds()),
                    leader=leader,
                    standbys=unit.standbys,
                    state=state,
                    last_error=row["last_error"],
                    updated_at=row["updated_at"],
                    dead_letters=int(row["dead_letters"]),
                    held_back_by=held_back_by,
                )
            )
        return result

    async def _lag(
        self, checkpoint: Position | None, event_filter: EventFilter | None
    ) -> tuple[int, dt.datetime | None]:
        tx, seq = (0, 0) if checkpoint is None else position_parts(checkpoint)
        args: list[object] = [tx, seq]
        clauses = ["(tx, position) > ($1, $2)", _VISIBLE, *_filter_clauses(event_filter, args)]
        row = await self._pool.fetchrow(
            f"SELECT count(*) AS n, min(recorded_at) AS oldest FROM {self._events_table} "
            f"WHERE {' AND '.join(clauses)}",
            *args,
        )
        assert row is not None
        return int(row["n"]), row["oldest"]

    async def _oldest_open_transaction(self) -> OpenTransaction | None:
        # The transaction whose id is the cluster's snapshot xmin holds every reader back.
        row = await self._pool.fetchrow(
            "SELECT pid, application_name, state, xact_start, left(query, 200) AS query "
            "FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() "
            "ORDER BY age(backend_xid) DESC LIMIT 1"
        )
        if row is None:
            return None
        return OpenTransaction(
            pid=row["pid"],
            application_name=row["application_name"] or "",
            state=row["state"] or "",
            started_at=row["xact_start"],
            query=row["query"] or "",
        )

    async def reset_projection(self, name: str, *, wait: bool = False) -> None:
        """Forget *name*'s checkpoint and dead letters, so its next run rebuilds from scratch.

        Takes the projection's leadership for the reset, so it never races a running
        instance.

        Raises:
            ProjectionRunning: another session leads it and *wait* is False.
            ProjectionNotFound: no projection of that name has run against this store.
        """
        check_name(name)
        self._check_open()
        s = f'"{self._schema}"'
        exists = await self._pool.fetchval(
            f"SELECT 1 FROM {s}.subscriptions WHERE subscription_name = $1", name
        )
        if exists is None:
            raise ProjectionNotFound(f"no projection named {name!r} has run against this store")
        try:
            async with (
                self._acquire(name, wait=wait, role="reset") as leadership,
                leadership._use() as conn,
                conn.transaction(),
            ):
                await conn.execute(
                    f"UPDATE {s}.subscriptions SET tx = NULL, position = NULL, "
                    "state = 'stopped', last_error = NULL, updated_at = now() "
                    "WHERE subscription_name = $1",
                    name,
                )
                await conn.execute(
                    f"DELETE FROM {s}.dead_letters WHERE subscription_name = $1", name
                )
        except LeadershipUnavailable as exc:
            raise ProjectionRunning(name) from exc

    async def dead_letters(self, name: str) -> list[DeadLetter]:
        """The events *name* skipped and that were not replayed, in position order."""
        check_name(name)
        self._check_open()
        rows = await self._pool.fetch(
            f'SELECT * FROM "{self._schema}".dead_letters WHERE subscription_name = $1 '
            "ORDER BY tx, position",
            name,
        )
        return [_to_dead_letter(row) for row in rows]


@attrs.frozen
class _UnitLocks:
    holder_pid: int | None
    holder_resetting: bool
    standbys: int


def _lock_sessions(locks: Sequence[_bridge.Record], name: str) -> _UnitLocks:
    # Reset sessions are named "<application> reset <name>" (see PostgresStore._acquire).
    def resetting(lock: _bridge.Record) -> bool:
        return (lock["application_name"] or "").endswith(f" reset {name}")

    holders = [lock for lock in locks if lock["granted"]]
    holder = holders[0] if holders else None
    return _UnitLocks(
        holder_pid=None if holder is None else holder["pid"],
        holder_resetting=holder is not None and resetting(holder),
        standbys=sum(1 for lock in locks if not lock["granted"] and not resetting(lock)),
    )


def _filter_from_json(text: str | None) -> EventFilter | None:
    if text is None:
        return None
    fields: dict[str, Any] = json.loads(text)
    return EventFilter(**fields)


def _to_dead_letter(row: _bridge.Record) -> DeadLetter:
    position = Position(row["tx"], row["position"])
    event: RecordedEvent | UndecodableEvent
    if row["decode_error"] is None:
        event = RecordedEvent(
            event_id=row["event_id"],
            stream_id=row["stream_id"],
            stream_version=row["stream_version"],
            position=position,
            type=row["type"],
            data=json.loads(row["data"]),
            metadata=json.loads(row["metadata"]),
            recorded_at=row["event_recorded_at"],
        )
    else:
        event = UndecodableEvent(
            event_id=row["event_id"],
            stream_id=row["stream_id"],
            stream_version=row["stream_version"],
            position=position,
            type=row["type"],
            raw_data=row["data"],
            raw_metadata=row["metadata"],
            recorded_at=row["event_recorded_at"],
            error=row["decode_error"],
        )
    return DeadLetter(
        id=row["id"],
        projection=row["subscription_name"],
        event=event,
        error_type=row["error_type"],
        error_message=row["error_message"],
        retries=row["retries"],
        recorded_at=row["recorded_at"],
    )


def _decode_object(text: str) -> Any:
    # Most metadata (and much data) is the empty object: skip the JSON parser for it.
    return {} if text == "{}" else _json_loads(text)


_json_loads = json.loads


def _decode_row(row: Any) -> RecordedEvent | UndecodableEvent:
    # Columns by index, in _EVENT_COLUMNS order (an asyncpg Record is also a sequence):
    # this runs once per event read.
    tx, seq, stream_id, stream_version, event_id, event_type, raw_data, raw_metadata, at = row
    position = trusted_position(tx, seq)
    try:
        data = _decode_object(raw_data)
        metadata = _decode_object(raw_metadata)
        if type(data) is not dict or type(metadata) is not dict:
            raise ValueError("data and metadata must be JSON objects")
    except ValueError as exc:
        return UndecodableEvent(
            event_id=event_id,
            stream_id=stream_id,
            stream_version=stream_version,
            position=position,
            type=event_type,
            raw_data=raw_data,
            raw_metadata=raw_metadata,
            recorded_at=at,
            error=str(exc),
        )
    return RecordedEvent(
        event_id=event_id,
        stream_id=stream_id,
        stream_version=stream_version,
        position=position,
        type=event_type,
        data=data,
        metadata=metadata,
        recorded_at=at,
    )


def _to_recorded(row: _bridge.Record) -> RecordedEvent:
    decoded = _decode_row(row)
    if isinstance(decoded, UndecodableEvent):
        raise EventDecodeError(
            f"event at {decoded.position} cannot be decoded: {decoded.error}; read it with "
            "undecodable='include' to handle it",
            position=decoded.position,
        )
    return decoded


def _check_positive(option: str, value: object) -> None:
    if type(value) is not int or value < 1:
        raise ConfigurationError(f"{option} must be an int >= 1, got {value!r}")


@asynccontextmanager
async def open_postgres_store(
    dsn: str | None = None,
    *,
    migrate: bool = True,
    schema: str = "eventcore",
    min_pool_size: int = 1,
    max_pool_size: int = 10,
    connect_timeout: float = 10.0,
    application_name: str = "eventcore-trio",
    session_dsn: str | None = None,
    statement_cache_size: int = 100,
) -> AsyncIterator[PostgresStore]:
    """Open a PostgreSQL event store for the duration of an ``async with`` block.

    Works inside a plain ``trio.run(...)`` (a trio-asyncio loop is opened for the block) and
    inside an application that already runs ``trio_asyncio.open_loop()``.

    Args:
        dsn: a libpq connection URI or keyword string; defaults to the ``EVENTCORE_DSN``
            environment variable.
        migrate: create or upgrade the schema (serialised across processes). With False, a
            schema that is missing or outdated raises `SchemaVersionError`.
        schema: the PostgreSQL schema for the store's tables (a lower-case identifier).
        min_pool_size: connections the pool keeps open.
        max_pool_size: the most connections the pool opens for appends and reads. Each
            leadership opens one more, of its own.
        connect_timeout: seconds to wait for a connection.
        application_name: shown in ``pg_stat_activity``; leadership connections add
            ``leader <name>``.
        session_dsn: where the connections that need a server session of their own connect
            (each leadership's lock session and the LISTEN session); defaults to *dsn*. Point
            it past a transaction-pooling proxy (directly at PostgreSQL, or at a
            session-pooling one) when *dsn* goes through one.
        statement_cache_size: prepared statements asyncpg caches per pooled connection
            (default 100); 0 when *dsn* goes through a transaction-pooling proxy such as
            PgBouncer in ``pool_mode = transaction``, which cannot keep them.

    Raises:
        ConfigurationError: no DSN, a malformed DSN, or an invalid option.
        StoreConnectionError: the server cannot be reached (`AuthenticationFailed` and
            `DatabaseNotFound` are more specific).
        UnsupportedServer: the server is older than PostgreSQL 13.
        SchemaVersionError: the schema is newer than this library, or outdated with
            ``migrate=False``.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       *session_dsn* and *statement_cache_size*; libpq keyword DSNs.
    """
    if dsn is None:
        dsn = os.environ.get(DSN_ENVIRONMENT_VARIABLE)
        if not dsn:
            raise ConfigurationError(
                f"no database given: pass dsn='postgresql://user@host/db' or set "
                f"{DSN_ENVIRONMENT_VARIABLE}"
            )
    dsn = normalize_dsn(dsn)
    session_dsn = dsn if session_dsn is None else normalize_dsn(session_dsn, option="session_dsn")
    check_schema_name(schema)
    _check_positive("min_pool_size", min_pool_size)
    _check_positive("max_pool_size", max_pool_size)
    if min_pool_size > max_pool_size:
        raise ConfigurationError(
            f"min_pool_size ({min_pool_size}) must not exceed max_pool_size ({max_pool_size})"
        )
    if (
        type(connect_timeout) not in (int, float)
        or not math.isfinite(connect_timeout)
        or connect_timeout <= 0
    ):
        raise ConfigurationError(
            f"connect_timeout must be a finite number of seconds > 0, got {connect_timeout!r}"
        )
    if type(statement_cache_size) is not int or statement_cache_size < 0:
        raise ConfigurationError(
            f"statement_cache_size must be an int >= 0, got {statement_cache_size!r}"
        )
    _check_application_name(application_name)
    async with (
        _bridge.asyncio_loop(),
        _bridge.open_pool(
            dsn,
            min_size=min_pool_size,
            max_size=max_pool_size,
            application_name=application_name,
            connect_timeout=connect_timeout,
            statement_cache_size=statement_cache_size,
        ) as pool,
        service_nursery() as nursery,
    ):
        version = int(await pool.fetchval("SELECT current_setting('server_version_num')"))
        if version < MINIMUM_SERVER_VERSION_NUM:
            raise UnsupportedServer(
                f"PostgreSQL {version // 10000} is not supported; eventcore-trio needs "
                f"PostgreSQL {MINIMUM_SERVER_VERSION_NUM // 10000} or newer (for xid8 snapshots)"
            )
        system_identifier = await _system_identifier(pool)
        if migrate:
            await migrate_schema(pool, schema)
        else:
            await check_schema(pool, schema)
        store = PostgresStore(
            pool=pool,
            nursery=nursery,
            dsn=dsn,
            session_dsn=session_dsn,
            schema=schema,
            system_identifier=system_identifier,
            server_version=version,
            application_name=application_name,
            connect_timeout=float(connect_timeout),
        )
        try:
            yield store
        finally:
            store._closed = True


def _check_application_name(value: object) -> None:
    if not isinstance(value, str):
        raise ConfigurationError(f"application_name must be a str, got {type(value).__name__}")
    if any(not ch.isprintable() for ch in value):
        raise ConfigurationError(
            f"application_name must be printable text (no NUL or control characters), got {value!r}"
        )


async def _system_identifier(pool: _bridge.Pool) -> str | None:
    # pg_control_system() may be restricted to superusers and pg_monitor members; without it
    # the cluster check is skipped rather than failing the store.
    try:
        value = await pool.fetchval("SELECT system_identifier::text FROM pg_control_system()")
    except DatabaseError:
        return None
    return None if value is None else str(value)
