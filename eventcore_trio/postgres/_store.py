"""`PostgresStore`: the facade that puts the backend's parts together.

It validates arguments at the boundary and hands each call to the module that owns it:
`_appends` (the append statement), `_reads` (the gap-free read path), `_subscriptions`
(checkpoints, status, reset, dead letters), `_leadership` (locks on dedicated sessions),
`_listener` (LISTEN) and `_admin` (raw SQL for tooling). `open_postgres_store` opens it.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Final, Literal, final, overload

import trio

from .._concurrency import service_nursery
from .._decoding import check_read_arguments
from .._errors import (
    ConfigurationError,
    DatabaseError,
    InvalidArgument,
    LeadershipUnavailable,
    ProjectionNotFound,
    ProjectionRunning,
    StoreClosed,
    UnsupportedServer,
)
from .._events import AppendResult, NewEvent, RecordedEvent, StreamAppend, UndecodableEvent
from .._filters import EventFilter
from .._positions import Position
from .._status import DeadLetter, ProjectionStatus
from .._validation import check_expected_version, check_name, check_stream_id, check_version_cursor
from . import _bridge
from ._admin import PostgresAdmin
from ._appends import AppendStatement, append_result
from ._dsn import normalize_dsn
from ._keys import projector_lock_key
from ._leadership import LeadershipContext, PostgresLeadership, acquire_leadership
from ._listener import Listener
from ._reads import ReadQueries, decode_row, recorded_row
from ._schema import (
    MINIMUM_SERVER_VERSION_NUM,
    check_schema,
    check_schema_name,
    notify_channel,
)
from ._schema import (
    migrate as migrate_schema,
)
from ._subscriptions import Subscriptions

DSN_ENVIRONMENT_VARIABLE: Final = "EVENTCORE_DSN"


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
        statement_cache_size: int,
    ) -> None:
        self._pool = pool
        # Where sessions that must own a server session connect: leadership and LISTEN.
        self._session_dsn = session_dsn
        self._schema = schema
        self._server_version = server_version
        self._application_name = application_name
        self._connect_timeout = connect_timeout
        self._closed = False
        self._append_statement = AppendStatement(schema)
        self._reads = ReadQueries(schema)
        self._subscriptions = Subscriptions(pool, schema, system_identifier)
        self._leadership_context = LeadershipContext(self._subscriptions, server_version)
        self._listener = Listener(
            nursery=nursery,
            dsn=session_dsn,
            channel=notify_channel(schema),
            application_name=f"{application_name} listener",
            connect_timeout=connect_timeout,
        )
        self._admin = PostgresAdmin(
            pool=pool,
            dsn=dsn,
            connect_timeout=connect_timeout,
            statement_cache_size=statement_cache_size,
            append_statement=self._append_statement,
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
    def admin(self) -> PostgresAdmin:
        """Raw SQL on this store's database, for tooling and tests (see `PostgresAdmin`).

        .. versionadded:: 0.2
        """
        return self._admin

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
        return append_result(await self._pool.fetchrow(sql, *args), args)

    async def read_stream(self, stream_id: str, *, after_version: int = 0) -> list[RecordedEvent]:
        """Return a stream's events after *after_version* (see `EventStore.read_stream`)."""
        check_stream_id(stream_id)
        check_version_cursor(after_version)
        self._check_open()
        rows = await self._pool.fetch(self._reads.read_stream, stream_id, after_version)
        return [recorded_row(row) for row in rows]

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
        check_read_arguments(after, limit, filter, undecodable)
        self._check_open()
        sql, args = self._reads.read_events(after, limit, filter)
        rows = await self._pool.fetch(sql, *args)
        if undecodable == "raise":
            return [recorded_row(row) for row in rows]
        return [decode_row(row) for row in rows]

    async def last_position(self, filter: EventFilter | None = None) -> Position | None:
        """The position of the last visible event matching *filter*, or None."""
        self._check_open()
        sql, args = self._reads.last_position(filter)
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
        """
        check_name(name)
        self._check_open()
        return await self._subscriptions.load_checkpoint(name)

    async def save_checkpoint(self, name: str, position: Position) -> None:
        """Save a checkpoint with compare-and-set; it never moves backwards.

        Raises:
            CheckpointConflict: *position* is behind the saved checkpoint; nothing changed.
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

        The standby blocks in ``pg_advisory_lock`` on its dedicated connection, so the server
        hands it the lock the moment the leader's session ends. Cancel to stop waiting.

        Raises:
            UnsupportedPooling: the connection goes through a transaction-pooling proxy.
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
        return await self._subscriptions.status()

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
        if not await self._subscriptions.exists(name):
            raise ProjectionNotFound(f"no projection named {name!r} has run against this store")
        try:
            async with (
                self._acquire(name, wait=wait, role="reset") as leadership,
                leadership._use() as connection,
                connection.transaction(),
            ):
                await self._subscriptions.reset(connection, name)
        except LeadershipUnavailable as exc:
            raise ProjectionRunning(name) from exc

    async def dead_letters(self, name: str) -> list[DeadLetter]:
        """The events *name* skipped and that were not replayed, in position order."""
        check_name(name)
        self._check_open()
        return await self._subscriptions.dead_letters(name)


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
            statement_cache_size=statement_cache_size,
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
