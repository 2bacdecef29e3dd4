"""The grants of a least-privilege runtime role (docs/operations.md, "Roles and grants").

The schema's owner migrates; a runtime role appends, reads, checkpoints and hosts
projections, and nothing more. It appends only through the append functions, which run as
the owner (SECURITY DEFINER, migration 5) and check what they are given, so it needs no
rights on ``events`` or ``streams`` beyond reading them: it cannot update, delete or forge
events. `runtime_grants` is the one list of what it needs, printed by ``eventcore-trio
migrate --grant ROLE --print`` and applied by ``--grant ROLE`` (`grant_runtime_role`).
"""

from __future__ import annotations

from typing import Final

from .._errors import ConfigurationError, DatabaseError
from ._pool import Pool
from ._schema import INSUFFICIENT_PRIVILEGE, MAX_IDENTIFIER_BYTES, check_schema_name

# What the runtime role writes, table by table; it reads every table but the marks' secret.
_WRITES: Final[dict[str, str]] = {
    "subscriptions": "INSERT, UPDATE, DELETE",
    "projections": "INSERT, UPDATE, DELETE",
    "hosts": "INSERT, UPDATE, DELETE",
    "dead_letters": "INSERT, UPDATE, DELETE",
    "snapshots": "INSERT, UPDATE, DELETE",
    "serving_versions": "INSERT, UPDATE",
    "version_switches": "INSERT",
    # Keys made on first use; a forget replaces the key by its record, a rewrap rewraps
    # it (a trigger refuses anything else: migration 9).
    "subject_keys": "INSERT, UPDATE",
}
_READS: Final = ("schema_migrations", "events", "event_tags", "streams", *_WRITES)

#: What a runtime role may execute: the append functions run as the schema's owner
#: (SECURITY DEFINER) and are revoked from PUBLIC; the rest run as their caller.
DEFINER_FUNCTIONS: Final = (
    "append_events(text[], bigint[], int[], int[], int[], uuid[], text[], jsonb[], jsonb[], "
    "text[], text[], text[])",
    "read_query(text[], text[], text[], bigint, bigint, bigint, boolean)",
    "append_conditional(text, bigint, uuid[], text[], jsonb[], jsonb[], text[], text[], text[], "
    "text[], text[], text[], bigint, bigint)",
    # Migration 8's: append_many (shared appends, which carry no subject), the others for
    # clients of an earlier version during an upgrade.
    "append_events(text[], bigint[], int[], int[], int[], uuid[], text[], jsonb[], jsonb[], "
    "text[])",
    "append_many(int[], text[], bigint[], int[], int[], int[], uuid[], text[], jsonb[], jsonb[], "
    "text[])",
    "read_query(text[], text[], text[], bigint, bigint, bigint)",
    "append_conditional(text, bigint, uuid[], text[], jsonb[], jsonb[], text[], text[], text[], "
    "text[], bigint, bigint)",
    # Migration 5's, for clients of an earlier version during an upgrade.
    "append_events(text[], bigint[], int[], int[], int[], uuid[], text[], jsonb[], jsonb[])",
    "append_many(int[], text[], bigint[], int[], int[], int[], uuid[], text[], jsonb[], jsonb[])",
    "announce_writer()",
)

RUNTIME_FUNCTIONS: Final = (*DEFINER_FUNCTIONS, "read_horizon()", "stream_hash(text)")


def quote_identifier(name: str) -> str:
    """*name* as a quoted SQL identifier (double quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def check_role_name(role: object) -> str:
    """Validate a role's name: any text PostgreSQL accepts as an identifier.

    Raises:
        ConfigurationError: not a str, empty, longer than PostgreSQL's 63 bytes, or holding
            a NUL or control character.
    """
    if not isinstance(role, str):
        raise ConfigurationError(f"role must be a str, got {type(role).__name__}")
    if not role or len(role.encode()) > MAX_IDENTIFIER_BYTES:
        raise ConfigurationError(
            f"role must be a PostgreSQL role name of 1 to {MAX_IDENTIFIER_BYTES} bytes, "
            f"got {role!r}"
        )
    if any(not ch.isprintable() for ch in role):
        raise ConfigurationError(
            f"role must be printable text (no NUL or control characters), got {role!r}"
        )
    return role


def runtime_grants(role: str, *, schema: str = "eventcore") -> list[str]:
    """The statements that let *role* run against *schema* as a least-privilege runtime role.

    Run them as the schema's owner (``eventcore-trio migrate --grant ROLE`` does, after
    migrating; ``--print`` prints them). The role may then append (through the append
    functions only), read, checkpoint, host projections (leadership, the hosts table,
    status), keep dead letters and snapshots, and open the store with ``migrate=True`` once
    the schema is at the latest version. It may not insert, update, delete or truncate
    events or streams, draw positions, or run DDL. Applying them again changes nothing.

    Raises:
        ConfigurationError: an invalid role or schema name.

    .. versionadded:: 0.3
    """
    check_role_name(role)
    check_schema_name(schema)
    s = f'"{schema}"'
    r = quote_identifier(role)
    functions = ", ".join(f"{s}.{function}" for function in RUNTIME_FUNCTIONS)
    definers = ", ".join(f"{s}.{function}" for function in DEFINER_FUNCTIONS)
    return [
        f"GRANT USAGE ON SCHEMA {s} TO {r};",
        f"GRANT SELECT ON {', '.join(f'{s}.{table}' for table in _READS)} TO {r};",
        *(f"GRANT {rights} ON {s}.{table} TO {r};" for table, rights in _WRITES.items()),
        # Reads compare checkpoints with the last position drawn; SELECT draws none.
        f"GRANT SELECT ON SEQUENCE {s}.events_position_seq TO {r};",
        # Only granted roles append (migration 5 revokes it too; again, for older grants).
        f"REVOKE EXECUTE ON FUNCTION {definers} FROM PUBLIC;",
        f"GRANT EXECUTE ON FUNCTION {functions} TO {r};",
    ]


async def grant_runtime_role(pool: Pool, schema: str, role: str) -> list[str]:
    """Apply `runtime_grants` in one transaction, as the role of *pool*; return them.

    Raises:
        ConfigurationError: an invalid role or schema name, no such role, the schema's
            owner itself (which has every right already), or a role of *pool* that may not
            grant them (only the schema's owner, or a superuser, may).
    """
    statements = runtime_grants(role, schema=schema)
    async with pool.acquire() as connection, connection.transaction():
        row = await connection.fetchrow(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = $1) AS exists, "
            "n.nspowner::regrole::text AS owner, "
            "pg_catalog.pg_has_role(n.nspowner, 'USAGE') AS owning, current_user AS me "
            "FROM (SELECT 1) AS one "
            "LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = $2",
            role,
            schema,
        )
        assert row is not None
        # A role without the owner's rights would only get warnings ("no privileges were
        # granted") from GRANT, and nothing granted: refused instead.
        if not row["owning"]:
            raise ConfigurationError(
                f"role {row['me']!r} does not own schema {schema!r} and may not grant its "
                "rights: run `eventcore-trio migrate --grant` as the schema's owner"
            )
        if not row["exists"]:
            raise ConfigurationError(
                f"there is no role {role!r}: create it first (CREATE ROLE "
                f"{quote_identifier(role)} LOGIN PASSWORD '...'), then grant it"
            )
        if row["owner"] in (role, quote_identifier(role)):
            raise ConfigurationError(
                f"role {role!r} owns schema {schema!r} and has every right already: grant a "
                "role of its own to the processes that only run the store"
            )
        try:
            await connection.execute("\n".join(statements))
        except DatabaseError as exc:
            if exc.sqlstate != INSUFFICIENT_PRIVILEGE:
                raise
            raise ConfigurationError(
                f"could not grant {role!r} its rights on schema {schema!r} ({exc}): run "
                "`eventcore-trio migrate --grant` as the schema's owner"
            ) from exc
    return statements
