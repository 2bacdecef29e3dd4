"""`open_postgres_store`: options checked before any I/O, then the pool, schema and store."""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

from .._errors import ConfigurationError, DatabaseError, UnsupportedServer
from .._personal._keys import KeyWrapper
from .._util import service_nursery
from . import _bridge, _pool
from ._appends import DEFAULT_MAX_APPEND_BYTES, MAX_APPEND_BYTES_LIMIT
from ._bridge import Connection
from ._dsn import normalize_dsn
from ._personal import make_keyring
from ._schema import MINIMUM_SERVER_VERSION_NUM, check_schema, check_schema_name
from ._schema import migrate as migrate_schema
from ._store import DSN_ENVIRONMENT_VARIABLE, PostgresStore


def _resolve_dsn(dsn: str | None) -> str:
    if dsn is None:
        dsn = os.environ.get(DSN_ENVIRONMENT_VARIABLE)
        if not dsn:
            raise ConfigurationError(
                f"no database given: pass dsn='postgresql://user@host/db' or set "
                f"{DSN_ENVIRONMENT_VARIABLE}"
            )
    return normalize_dsn(dsn)


def _check_pool_sizes(min_pool_size: int, max_pool_size: int) -> None:
    _check_positive("min_pool_size", min_pool_size)
    _check_positive("max_pool_size", max_pool_size)
    if min_pool_size > max_pool_size:
        raise ConfigurationError(
            f"min_pool_size ({min_pool_size}) must not exceed max_pool_size ({max_pool_size})"
        )


def _check_connection_options(
    connect_timeout: float, statement_cache_size: int, application_name: str
) -> None:
    # Typed for callers; checked for the values that type checkers never see.
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


def _check_max_append_bytes(value: object) -> None:
    _check_positive("max_append_bytes", value)
    assert isinstance(value, int)
    if value > MAX_APPEND_BYTES_LIMIT:
        raise ConfigurationError(
            f"max_append_bytes must be at most {MAX_APPEND_BYTES_LIMIT:,} (512 MiB), got "
            f"{value:,}: PostgreSQL drops a session sent a statement over 1 GB. Split larger "
            "appends, or keep large content outside the events"
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
    session_dsn: str | None = None,
    statement_cache_size: int = 100,
    max_append_bytes: int = DEFAULT_MAX_APPEND_BYTES,
    key_encryption_key: bytes | KeyWrapper | None = None,
) -> AsyncIterator[PostgresStore]:
    """Open a PostgreSQL event store for the duration of an ``async with`` block.

    Works inside a plain ``trio.run(...)`` (a trio-asyncio loop is opened for the block) and
    inside an application that already runs ``trio_asyncio.open_loop()``.

    Args:
        dsn: a libpq connection URI or keyword string; defaults to the ``EVENTCORE_DSN``
            environment variable.
        migrate: create or upgrade the schema (serialised across processes); a schema
            already at the latest version is only read, so a least-privilege runtime role
            may keep the default (docs/operations.md, "Roles and grants"). With False, a
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
        max_append_bytes: the largest append, in bytes of its encoded events (their data
            and metadata as JSON, their type names, its stream ids; default 64 MiB, at most
            512 MiB): a larger one raises `AppendTooLarge` before any I/O, and concurrent
            appends share a statement only within it. It keeps every statement far below
            PostgreSQL's 1 GB message limit, past which the server drops the session.
        key_encryption_key: the key that wraps subjects' data keys, for events with
            personal fields: 32 random bytes, or a `KeyWrapper` (a KMS). None reads
            ``EVENTCORE_KEY_ENCRYPTION_KEY`` (32 bytes in base64); without either, an
            append with personal fields raises `ConfigurationError`. One stored key is
            unwrapped at open, so the wrong one is refused there (see
            docs/personal-data.md).

    Raises:
        ConfigurationError: no DSN, a malformed DSN (a libpq option that asyncpg does not
            read, a setting the server refuses), an invalid option (a schema name with
            PostgreSQL's reserved prefix ``pg_``), a schema that needs migrating by a role
            that may not (run ``eventcore-trio migrate`` as the schema's owner), or one the
            role may not use (``eventcore-trio migrate --grant ROLE``), or a
            key-encryption key that is malformed or cannot unwrap the stored keys.
        StoreConnectionError: the server cannot be reached (`AuthenticationFailed` and
            `DatabaseNotFound` are more specific).
        UnsupportedServer: the server is older than PostgreSQL 13.
        SchemaVersionError: the schema is newer than this library, or outdated with
            ``migrate=False``.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       *session_dsn* and *statement_cache_size*; libpq keyword DSNs.
    .. versionchanged:: 0.3
       *max_append_bytes*.
    .. versionchanged:: 0.4
       *key_encryption_key*.
    """
    dsn = _resolve_dsn(dsn)
    session_dsn = dsn if session_dsn is None else normalize_dsn(session_dsn, option="session_dsn")
    check_schema_name(schema)
    _check_pool_sizes(min_pool_size, max_pool_size)
    _check_connection_options(connect_timeout, statement_cache_size, application_name)
    _check_max_append_bytes(max_append_bytes)
    keyring = make_keyring(key_encryption_key)
    options = _pool.SessionOptions(
        dsn,
        application_name,
        float(connect_timeout),
        statement_cache_size,
        session_dsn,
    )
    async with (
        _bridge.asyncio_loop(),
        _open_pool(options, min_size=min_pool_size, max_size=max_pool_size) as pool,
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
            options=options,
            schema=schema,
            system_identifier=system_identifier,
            server_version=version,
            max_append_bytes=max_append_bytes,
            keyring=keyring,
        )
        await store._personal.check_key_encryption_key()
        try:
            yield store
        finally:
            await store.aclose()


# What PostgreSQL answers at connect to a setting it refuses: an unknown name (42704), a bad
# value (22023), one the role may not set (42501), one that only a restart sets (55P02).
_REFUSED_SETTING_SQLSTATES: Final = frozenset({"42704", "22023", "42501", "55P02"})


@asynccontextmanager
async def _open_pool(
    options: _pool.SessionOptions, *, min_size: int, max_size: int
) -> AsyncIterator[_pool.Pool]:
    # The pool's first connections are the first to meet the DSN's query parameters, which
    # asyncpg sends as server settings: a refused one is the DSN's mistake (configuration),
    # not a database failure. Errors of the caller's block pass through unchanged.
    opened = False
    try:
        async with _pool.open_pool_for(options, min_size=min_size, max_size=max_size) as pool:
            opened = True
            yield pool
    except DatabaseError as exc:
        if opened or not _is_refused_setting(exc):
            raise
        raise _refused_setting(exc) from exc


def _is_refused_setting(exc: DatabaseError) -> bool:
    return exc.sqlstate in _REFUSED_SETTING_SQLSTATES and "parameter" in str(exc)


def _refused_setting(exc: DatabaseError, option: str = "dsn") -> ConfigurationError:
    return ConfigurationError(
        f"the server refused a setting of the {option} ({exc}): query parameters that are not "
        "connection options reach PostgreSQL as settings at connect; fix or remove it"
    )


async def behind_proxy(dsn: str, *, connect_timeout: float = 10.0) -> bool:
    """Whether *dsn* reaches PostgreSQL through a proxy (a pooler such as PgBouncer).

    One short connection: behind a proxy, the process id the server announced at startup
    is the proxy's invention, not the session's ``pg_backend_pid()``. For tools that choose
    options for the user (``eventcore-trio`` turns asyncpg's statement cache off behind a
    proxy, which a transaction-pooling one cannot keep).

    Raises:
        ConfigurationError: a malformed DSN, or a setting in it that the server refuses.
        StoreConnectionError: the server (or the proxy) cannot be reached.
    """
    async with tool_connection(
        dsn, application_name="eventcore-trio probe", connect_timeout=connect_timeout
    ) as connection:
        return int(await connection.fetchval("SELECT pg_backend_pid()")) != (connection.backend_pid)


@asynccontextmanager
async def tool_connection(
    dsn: str, *, application_name: str = "eventcore-trio tool", connect_timeout: float = 10.0
) -> AsyncIterator[Connection]:
    """One plain connection for the block, for tools that need a session before (or beside)
    any store: creating roles, probing the server. Closed on exit.

    It has no statement cache (a pooling proxy may sit in front), runs on the application's
    trio-asyncio loop or one of its own, and answers ``fetch``, ``fetchrow``, ``fetchval``
    and ``execute`` like ``store.admin.connection()``.

    Raises:
        ConfigurationError: a malformed DSN, or a setting in it that the server refuses.
        StoreConnectionError: the server (or a proxy) cannot be reached.

    .. versionadded:: 0.4
    """
    dsn = normalize_dsn(dsn)
    async with _bridge.asyncio_loop():
        try:
            connection = await _bridge.connect(
                dsn,
                application_name=application_name,
                connect_timeout=connect_timeout,
                statement_cache_size=0,
            )
        except DatabaseError as exc:
            if not _is_refused_setting(exc):
                raise
            raise _refused_setting(exc) from exc
        try:
            yield connection
        finally:
            await connection.close()


def _check_application_name(value: object) -> None:
    if not isinstance(value, str):
        raise ConfigurationError(f"application_name must be a str, got {type(value).__name__}")
    if any(not ch.isprintable() for ch in value):
        raise ConfigurationError(
            f"application_name must be printable text (no NUL or control characters), got {value!r}"
        )


async def _system_identifier(pool: _pool.Pool) -> str | None:
    # pg_control_system() may be restricted to superusers and pg_monitor members; without it
    # the cluster check is skipped rather than failing the store.
    try:
        value = await pool.fetchval("SELECT system_identifier::text FROM pg_control_system()")
    except DatabaseError:
        return None
    return None if value is None else str(value)
