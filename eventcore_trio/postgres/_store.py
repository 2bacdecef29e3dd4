"""`PostgresStore`: the event store, reader, checkpoint store and coordinator on PostgreSQL."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Final, final

from .._errors import (
    CheckpointConflict,
    ClusterMismatch,
    ConfigurationError,
    DatabaseError,
    EventDecodeError,
    InvalidArgument,
    StoreClosed,
    UnsupportedServer,
)
from .._events import AppendResult, NewEvent, RecordedEvent, StreamAppend, prepare_appends
from .._filters import EventFilter
from .._positions import Position, position_parts
from .._validation import (
    check_expected_version,
    check_limit,
    check_name,
    check_stream_id,
    check_version_cursor,
    encode_json_object,
)
from . import _bridge
from ._keys import projector_lock_key
from ._leadership import PostgresLeadership, acquire_leadership
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


@final
class PostgresStore:
    """An event store on PostgreSQL; obtain one with `open_postgres_store`.

    Appends, reads and checkpoints use a connection pool, one statement per call; each
    leadership uses a dedicated connection of its own.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        *,
        pool: _bridge.Pool,
        dsn: str,
        schema: str,
        system_identifier: str | None,
        server_version: int,
        application_name: str,
        connect_timeout: float,
    ) -> None:
        self._pool = pool
        self._dsn = dsn
        self._schema = schema
        self._system_identifier = system_identifier
        self._server_version = server_version
        self._application_name = application_name
        self._connect_timeout = connect_timeout
        self._closed = False
        s = f'"{schema}"'
        self._sql_append = f"SELECT * FROM {s}.append_events($1, $2, $3, $4, $5, $6, $7)"
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
            "WHERE (c.tx, c.position) <= (excluded.tx, excluded.position) "
            "RETURNING 1"
        )
        self._events_table = f"{s}.events"

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
        requests = sorted(prepare_appends(appends), key=lambda a: a.stream_id)
        streams: list[str] = []
        expected: list[int | None] = []
        event_stream: list[int] = []
        event_ids: list[object] = []
        types: list[str] = []
        data: list[str] = []
        metadata: list[str] = []
        for index, request in enumerate(requests, start=1):
            streams.append(request.stream_id)
            expected.append(request.expected_version)
            for event in request.events:
                event_stream.append(index)
                event_ids.append(event.event_id)
                types.append(event.type)
                data.append(encode_json_object("data", event.data))
                metadata.append(encode_json_object("metadata", event.metadata))
        self._check_open()
        row = await self._pool.fetchrow(
            self._sql_append, streams, expected, event_stream, event_ids, types, data, metadata
        )
        assert row is not None
        position = (
            None if row["last_tx"] is None else Position(row["last_tx"], row["last_position"])
        )
        return AppendResult(position, dict(zip(streams, row["versions"], strict=True)))

    async def read_stream(self, stream_id: str, *, after_version: int = 0) -> list[RecordedEvent]:
        """Return a stream's events after *after_version* (see `EventStore.read_stream`)."""
        check_stream_id(stream_id)
        check_version_cursor(after_version)
        self._check_open()
        rows = await self._pool.fetch(self._sql_read_stream, stream_id, after_version)
        return [_to_recorded(row) for row in rows]

    # -- EventReader --------------------------------------------------------------------

    async def read_events(
        self,
        after: Position | None,
        *,
        limit: int,
        filter: EventFilter | None = None,
    ) -> list[RecordedEvent]:
        """Return up to *limit* events after *after* (see `EventReader.read_events`)."""
        if after is not None and not isinstance(after, Position):
            raise InvalidArgument(f"after must be a Position or None, got {type(after).__name__}")
        check_limit(limit)
        if filter is not None and not isinstance(filter, EventFilter):
            raise InvalidArgument(f"filter must be an EventFilter, got {type(filter).__name__}")
        self._check_open()
        tx, seq = (0, 0) if after is None else position_parts(after)
        # Gap-free read: only rows of transactions below the snapshot's xmin, all of which
        # have ended, in (tx, position) order. A transaction that drew its position early but
        # commits late has a tx at or above today's xmin, so it is read later, never skipped.
        # See docs/postgres.md ("Gap-free reads") and DESIGN.md section 4.1.
        args: list[object] = [tx, seq, limit]
        clauses = [
            "(tx, position) > ($1, $2)",
            "tx < pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
        ]
        if filter is not None:
            if filter.event_types is not None:
                args.append(sorted(filter.event_types))
                clauses.append(f"type = ANY(${len(args)}::text[])")
            if filter.stream_prefix is not None:
                args.append(filter.stream_prefix)
                clauses.append(f"stream_id >= ${len(args)}")
                upper = _next_prefix(filter.stream_prefix)
                if upper is not None:
                    args.append(upper)
                    clauses.append(f"stream_id < ${len(args)}")
            if filter.stream_regex is not None:
                args.append(filter.stream_regex)
                clauses.append(f"stream_id ~ ${len(args)}")
        sql = (
            f"SELECT {_EVENT_COLUMNS} FROM {self._events_table} "
            f"WHERE {' AND '.join(clauses)} ORDER BY tx, position LIMIT $3"
        )
        rows = await self._pool.fetch(sql, *args)
        return [_to_recorded(row) for row in rows]

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
        if row is None:
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
        check_name(name)
        self._check_open()
        async with acquire_leadership(
            self._dsn,
            name=name,
            key=projector_lock_key(self._schema, name),
            application_name=f"{self._application_name} leader {name}",
            connect_timeout=self._connect_timeout,
        ) as leadership:
            yield leadership


def _to_recorded(row: _bridge.Record) -> RecordedEvent:
    position = Position(row["tx"], row["position"])
    try:
        data = json.loads(row["data"])
        metadata = json.loads(row["metadata"])
    except ValueError as exc:
        raise EventDecodeError(
            f"event at {position} has undecodable JSON: {exc}", position=position
        ) from exc
    if not isinstance(data, dict) or not isinstance(metadata, dict):
        raise EventDecodeError(
            f"event at {position} has data or metadata that is not a JSON object",
            position=position,
        )
    return RecordedEvent(
        event_id=row["event_id"],
        stream_id=row["stream_id"],
        stream_version=row["stream_version"],
        position=position,
        type=row["type"],
        data=data,
        metadata=metadata,
        recorded_at=row["recorded_at"],
    )


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

    Raises:
        ConfigurationError: no DSN, or an invalid option.
        StoreConnectionError: the server cannot be reached (`AuthenticationFailed` and
            `DatabaseNotFound` are more specific).
        UnsupportedServer: the server is older than PostgreSQL 13.
        SchemaVersionError: the schema is newer than this library, or outdated with
            ``migrate=False``.

    .. versionadded:: 0.1
    """
    if dsn is None:
        dsn = os.environ.get(DSN_ENVIRONMENT_VARIABLE)
        if not dsn:
            raise ConfigurationError(
                f"no database given: pass dsn='postgresql://user@host/db' or set "
                f"{DSN_ENVIRONMENT_VARIABLE}"
            )
    if not isinstance(dsn, str):
        raise ConfigurationError(f"dsn must be a str, got {type(dsn).__name__}")
    check_schema_name(schema)
    _check_positive("min_pool_size", min_pool_size)
    _check_positive("max_pool_size", max_pool_size)
    if min_pool_size > max_pool_size:
        raise ConfigurationError(
            f"min_pool_size ({min_pool_size}) must not exceed max_pool_size ({max_pool_size})"
        )
    if not isinstance(connect_timeout, int | float) or connect_timeout <= 0:
        raise ConfigurationError(f"connect_timeout must be > 0 seconds, got {connect_timeout!r}")
    async with (
        _bridge.asyncio_loop(),
        _bridge.open_pool(
            dsn,
            min_size=min_pool_size,
            max_size=max_pool_size,
            application_name=application_name,
            connect_timeout=connect_timeout,
        ) as pool,
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
            dsn=dsn,
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


async def _system_identifier(pool: _bridge.Pool) -> str | None:
    # pg_control_system() may be restricted to superusers and pg_monitor members; without it
    # the cluster check is skipped rather than failing the store.
    try:
        value = await pool.fetchval("SELECT system_identifier::text FROM pg_control_system()")
    except DatabaseError:
        return None
    return None if value is None else str(value)
