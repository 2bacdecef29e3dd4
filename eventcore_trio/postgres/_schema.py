"""The PostgreSQL schema, its versioned migrations, and how they are applied.

Migrations run in one transaction under a transaction-level advisory lock, so several
processes may migrate at once: one applies, the others wait and then find nothing to do.
A database whose schema is newer than this library is refused, never downgraded.
"""

from __future__ import annotations

import hashlib
import re
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Final

from .. import __version__
from .._errors import ConfigurationError, DatabaseError, SchemaVersionError
from ._keys import migration_lock_key, stream_lock_space, tag_lock_space, writer_lock_key
from ._pool import Pool

MINIMUM_SERVER_VERSION_NUM: Final = 130000
"""PostgreSQL 13: the first version with ``xid8``, ``pg_current_xact_id()`` and
``pg_snapshot_xmin()``, on which the gap-free read rests, and core ``gen_random_uuid()``."""

#: How long a shared group-commit statement (``append_many``) may wait for a lock that
#: another transaction holds before it gives up, writing nothing (see `_group_commit`).
SHARED_LOCK_TIMEOUT: Final = "50ms"

_SCHEMA_NAME: Final = re.compile(r"\A[a-z_][a-z0-9_]{0,62}\Z")


def check_schema_name(schema: object) -> str:
    """Validate the schema option: a plain lower-case SQL identifier, used unquoted-safe,
    outside the ``pg_`` prefix that PostgreSQL keeps for itself."""
    if not isinstance(schema, str) or not _SCHEMA_NAME.match(schema):
        raise ConfigurationError(
            f"schema must be a lower-case SQL identifier (letters, digits, '_', at most 63 "
            f"characters, not starting with a digit), got {schema!r}"
        )
    if schema.startswith("pg_"):
        # PostgreSQL reserves the prefix for system schemas: CREATE SCHEMA refuses it
        # (42939), so the store could never be migrated there.
        raise ConfigurationError(
            f"schema {schema!r} starts with 'pg_', which PostgreSQL reserves for system "
            "schemas: choose another name"
        )
    return schema


#: PostgreSQL's longest identifier, in bytes (NAMEDATALEN - 1): channel names included.
MAX_IDENTIFIER_BYTES: Final = 63


def channel_name(schema: str, suffix: str = "") -> str:
    """A LISTEN/NOTIFY channel of *schema*: ``eventcore_<schema><suffix>``, or, when that is
    longer than PostgreSQL allows (a schema of more than 53 characters), the schema's first
    characters and a hash of the whole name, so that it always fits and stays distinct.

    A longer name would make ``pg_notify`` fail and LISTEN silently truncate it.
    """
    name = f"eventcore_{schema}{suffix}"
    if len(name.encode()) <= MAX_IDENTIFIER_BYTES:
        return name
    digest = hashlib.blake2b(schema.encode(), digest_size=6).hexdigest()
    keep = MAX_IDENTIFIER_BYTES - len("eventcore_") - len(suffix) - len(digest) - 1
    return f"eventcore_{schema[:keep]}_{digest}{suffix}"


def notify_channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel on which the store announces committed appends."""
    return channel_name(schema)


def _migration_files() -> tuple[Traversable, ...]:
    """The migrations, oldest first: ``migrations/NNNN_name.sql``, numbered from 1 without
    a gap (the number is the schema version the file brings a schema to)."""
    found = sorted(
        (
            entry
            for entry in (files("eventcore_trio.postgres") / "migrations").iterdir()
            if entry.name.endswith(".sql")
        ),
        key=lambda entry: entry.name,
    )
    for version, entry in enumerate(found, start=1):
        # A gap or a duplicate number would silently skip or reorder a released migration.
        if not entry.name.startswith(f"{version:04d}_"):
            raise RuntimeError(
                f"migration {entry.name} is out of sequence: expected {version:04d}_*"
            )
    return tuple(found)


# Each migration is a template over {s} (the quoted schema) and the other names `_render`
# fills in (each file says which it uses). Never edit a migration once released: add a new
# one. (Before the first release the history was squashed into migration 1.)
_MIGRATIONS: Final = _migration_files()

LATEST_SCHEMA_VERSION: Final = len(_MIGRATIONS)


def _render(template: str, schema: str) -> str:
    return template.format(
        s=f'"{schema}"',
        stream_locks=stream_lock_space(schema),
        tag_locks=tag_lock_space(schema),
        writer_lock=writer_lock_key(schema),
        schema_name=f"'{schema}'",
        floor_setting=f"'eventcore_trio.tx_floor_{schema}'",
        shared_lock_timeout=SHARED_LOCK_TIMEOUT,
    )


async def migrate(pool: Pool, schema: str) -> int:
    """Bring *schema* up to the latest version; return the number of migrations applied.

    A schema already at the latest version is only read: no lock, no DDL, so a runtime role
    (one with the grants of `runtime_grants`, which may not run DDL) may migrate=True too.

    Raises:
        ConfigurationError: the schema needs migrating and this role may not do it (it
            does not own the schema, or may not create it in this database).
        SchemaVersionError: the schema is newer than this library.
    """
    current = await schema_version(pool, schema)
    if current is not None and current >= LATEST_SCHEMA_VERSION:
        _check_not_newer(schema, current)
        return 0
    try:
        return await _apply_migrations(pool, schema)
    except DatabaseError as exc:
        if exc.sqlstate != INSUFFICIENT_PRIVILEGE:
            raise
        raise await _refused(
            pool,
            f"may not migrate schema {schema!r} ({exc}): run `eventcore-trio migrate --schema "
            f"{schema}` as the schema's owner, or open the store with migrate=False once the "
            'owner has migrated it (docs/operations.md, "Roles and grants")',
        ) from exc


async def _apply_migrations(pool: Pool, schema: str, target: int = LATEST_SCHEMA_VERSION) -> int:
    # *target*: the version to stop at (tests build a schema as an older library left it).
    async with pool.acquire() as conn, conn.transaction():
        # Every statement of a migration resolves names in pg_catalog alone, whatever the
        # role's search_path holds: what another role planted there never runs as the owner.
        # (Everything of the store's is schema-qualified.)
        await conn.execute("SET LOCAL search_path = pg_catalog, pg_temp")
        await conn.execute(
            "SELECT pg_catalog.pg_advisory_xact_lock($1::bigint)", migration_lock_key(schema)
        )
        # Created only when missing: CREATE SCHEMA IF NOT EXISTS needs CREATE on the
        # database even when the schema exists, which its owner may well not have.
        if not await conn.fetchval(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = $1)", schema
        ):
            await conn.execute(f'CREATE SCHEMA "{schema}"')
        if await conn.fetchval(_MIGRATIONS_TABLE, f'"{schema}".schema_migrations') is None:
            await conn.execute(
                f'CREATE TABLE "{schema}".schema_migrations ('
                "    version int PRIMARY KEY,"
                "    library_version text NOT NULL,"
                "    applied_at timestamptz NOT NULL DEFAULT now())"
            )
        current = await conn.fetchval(
            f'SELECT coalesce(max(version), 0) FROM "{schema}".schema_migrations'
        )
        _check_not_newer(schema, current)
        for version in range(current + 1, target + 1):
            await conn.execute(_render(_MIGRATIONS[version - 1].read_text("utf-8"), schema))
            await conn.execute(
                f'INSERT INTO "{schema}".schema_migrations (version, library_version) '
                "VALUES ($1, $2)",
                version,
                __version__,
            )
        return max(0, target - int(current))


#: PostgreSQL's SQLSTATE for a statement the role lacks the privileges for.
INSUFFICIENT_PRIVILEGE: Final = "42501"

# The regclass of a schema's migrations table, or NULL while there is none.
_MIGRATIONS_TABLE: Final = "SELECT pg_catalog.to_regclass($1)"


async def _refused(pool: Pool, what: str) -> ConfigurationError:
    # The error for a statement this role lacks the privileges for, naming the role: *what*
    # it may not do, in which "{role}" stands for the role.
    role = await pool.fetchval("SELECT current_user")
    return ConfigurationError(f"role {role!r} " + what.replace("{role}", str(role)))


async def schema_version(pool: Pool, schema: str) -> int | None:
    """The version *schema* is at (0 for a table of migrations with none applied), or None
    when it has no table of migrations (a missing or empty schema).

    Raises:
        ConfigurationError: this role may not use the schema (see `runtime_grants`).
    """
    try:
        if await pool.fetchval(_MIGRATIONS_TABLE, f'"{schema}".schema_migrations') is None:
            return None
        return int(
            await pool.fetchval(
                f'SELECT coalesce(max(version), 0) FROM "{schema}".schema_migrations'
            )
        )
    except DatabaseError as exc:
        if exc.sqlstate != INSUFFICIENT_PRIVILEGE:
            raise
        raise await _refused(
            pool,
            f"may not use schema {schema!r} ({exc}): its owner grants a runtime role what it "
            f"needs with `eventcore-trio migrate --schema {schema} --grant {{role}}` "
            '(docs/operations.md, "Roles and grants")',
        ) from exc


async def check_schema(pool: Pool, schema: str) -> None:
    """Refuse to run against a schema that is missing, outdated or newer than this library.

    Raises:
        SchemaVersionError: the schema is missing, outdated or newer.
        ConfigurationError: this role may not use the schema.
    """
    current = await schema_version(pool, schema)
    if current is None or current < LATEST_SCHEMA_VERSION:
        raise SchemaVersionError(
            f"schema {schema!r} is at version {current or 0}, this library needs "
            f"{LATEST_SCHEMA_VERSION}: run `eventcore-trio migrate` or open the store with "
            "migrate=True"
        )
    _check_not_newer(schema, current)


def _check_not_newer(schema: str, current: int) -> None:
    if current > LATEST_SCHEMA_VERSION:
        raise SchemaVersionError(
            f"schema {schema!r} is at version {current}, newer than this library "
            f"({__version__}) understands (up to {LATEST_SCHEMA_VERSION}); upgrade "
            "eventcore-trio in this process instead of running an old version against it"
        )
