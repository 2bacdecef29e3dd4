"""Projection versions on PostgreSQL: the ``serving_versions`` and ``version_switches`` tables
(migration 7), the atomic switch, and each version's read-model schema.

The rules are `eventcore_trio._versions`'; this module is their SQL. Every decision that
changes which version serves locks the projection's ``serving_versions`` row (FOR UPDATE) and
records the switch in the same transaction, so two hosts (or a host and an operator) never
both switch, and readers move from one complete read model to the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, final

from .._errors import ConfigurationError, DatabaseError, InvalidArgument, ProjectionNotFound
from .._filters import EventFilter
from .._partitions import Unit, units_of
from .._positions import Position, position_parts
from .._versions import (
    VersionRole,
    VersionSwitch,
    read_model_schema_name,
    role_of,
    split_versioned,
    versioned_name,
)
from ._bridge import Connection, Record
from ._grants import quote_identifier
from ._pool import Pool
from ._reads import _next_prefix, filter_clauses
from ._schema import INSUFFICIENT_PRIVILEGE
from ._subscriptions import Subscriptions, stored_ahead

_NAME: Final = "subscription_name"


def search_path_begin(schema: str) -> str:
    """SQL that begins a batch's transaction with *schema* first on its ``search_path`` and
    the session's own after it: one simple-protocol round trip, two statements.

    Transaction-local (``set_config(..., true)``): the lock session's next transaction, and
    everything else on it, keep their own path.
    """
    quoted = quote_identifier(schema).replace("'", "''")
    return (
        "BEGIN; SELECT pg_catalog.set_config('search_path', pg_catalog.concat_ws(', ', "
        f"'{quoted}', NULLIF(pg_catalog.current_setting('search_path'), '')), true)"
    )


def create_schema_statement(schema: str) -> str:
    """SQL that creates *schema* when it is missing.

    Checked first: ``CREATE SCHEMA IF NOT EXISTS`` needs CREATE on the database even when the
    schema exists, which a role given one by its owner may well not have. Two sessions
    creating it at once: one of them meets a duplicate, which means it exists.
    """
    quoted = quote_identifier(schema)
    literal = schema.replace("'", "''")
    return (
        "DO $do$ BEGIN IF NOT EXISTS (SELECT FROM pg_catalog.pg_namespace "
        f"WHERE nspname = '{literal}') THEN CREATE SCHEMA IF NOT EXISTS {quoted}; END IF; "
        # Another unit of the version creating it at the same moment: it exists now.
        "EXCEPTION WHEN unique_violation OR duplicate_schema THEN NULL; END $do$"
    )


async def create_read_model_schema(connection: Connection, schema: str, unit: str) -> None:
    """Create *schema*, the read-model schema of *unit*'s version, when it is missing.

    Raises:
        ConfigurationError: it is missing and this role may not create schemas.
    """
    try:
        await connection.execute(create_schema_statement(schema))
    except DatabaseError as exc:
        if exc.sqlstate != INSUFFICIENT_PRIVILEGE:
            raise
        raise ConfigurationError(
            f"this role may not create schema {schema!r}, the read model of {unit!r} ({exc}): "
            "grant it CREATE on the database, or create the schema for it as its owner "
            f"(CREATE SCHEMA {quote_identifier(schema)} AUTHORIZATION <role>)"
        ) from exc


def drop_schema_statement(schema: str) -> str:
    """SQL that drops *schema* and everything in it, if it exists."""
    return f"DROP SCHEMA IF EXISTS {quote_identifier(schema)} CASCADE"


def _switch_row(row: Record) -> VersionSwitch:
    return VersionSwitch(
        name=row["name"],
        from_version=row["from_version"],
        to_version=row["to_version"],
        position=None if row["tx"] is None else Position(row["tx"], row["position"]),
        switched_at=row["switched_at"],
        reason=row["reason"],
    )


@final
class Versions:
    """Serving versions, switches and retired versions of one schema, on the store's pool."""

    def __init__(self, pool: Pool, subscriptions: Subscriptions) -> None:
        self._pool = pool
        self._subscriptions = subscriptions
        self._schema = subscriptions.schema
        s = f'"{self._schema}"'
        self.serving_table = f"{s}.serving_versions"
        self.switches_table = f"{s}.version_switches"
        self._events = f"{s}.events"
        # "first": the row for a projection no version of which serves yet, and its switch;
        # nothing when another session's row came first (it waits for that one to commit).
        self._sql_first = (
            f"WITH won AS (INSERT INTO {self.serving_table} (name, version) VALUES ($1, $2) "
            "ON CONFLICT (name) DO NOTHING RETURNING name, version), "
            f"logged AS (INSERT INTO {self.switches_table} (name, to_version, reason) "
            "SELECT name, version, 'first' FROM won) "
            "SELECT version, '{}'::integer[] AS withdrawn FROM won"
        )
        self._sql_serving = f"SELECT version, withdrawn FROM {self.serving_table} WHERE name = $1"

    def read_model_schema(self, name: str, version: int) -> str:
        """The read-model schema of *version* of projection *name* in this store."""
        return read_model_schema_name(self._schema, name, version)

    async def role(self, name: str, version: int) -> VersionRole:
        """*version*'s role, making it serve when no version of *name* does yet."""
        row = await self._pool.fetchrow(self._sql_serving, name)
        if row is None:
            # Two hosts asking at once: one inserts, the other's insert waits for it and
            # does nothing, and its next statement (a new snapshot) reads the winner's row.
            row = await self._pool.fetchrow(self._sql_first, name, version)
            if row is None:
                row = await self._pool.fetchrow(self._sql_serving, name)
        assert row is not None
        return role_of(version, row["version"], frozenset(row["withdrawn"]))

    async def serving(self, name: str) -> int | None:
        """The version of *name* that serves, or None while none has run."""
        found = await self._pool.fetchval(
            f"SELECT version FROM {self.serving_table} WHERE name = $1", name
        )
        return None if found is None else int(found)

    async def serving_map(self) -> dict[str, tuple[int, frozenset[int]]]:
        """Every projection's serving version and withdrawn versions (for status)."""
        rows = await self._pool.fetch(f"SELECT name, version, withdrawn FROM {self.serving_table}")
        return {row["name"]: (row["version"], frozenset(row["withdrawn"])) for row in rows}

    async def switches(self, name: str) -> list[VersionSwitch]:
        """*name*'s switches, oldest first."""
        rows = await self._pool.fetch(
            f"SELECT name, from_version, to_version, tx, position, switched_at, reason "
            f"FROM {self.switches_table} WHERE name = $1 ORDER BY id",
            name,
        )
        return [_switch_row(row) for row in rows]

    async def switch_if_caught_up(
        self, name: str, version: int, units: Sequence[tuple[str, EventFilter]]
    ) -> VersionRole:
        """Make *version* serve if it builds and every one of *units* has caught up: checked
        and recorded in one transaction, under the lock of *name*'s serving row."""
        projection = versioned_name(name, version)
        for unit, _ in units:
            if Unit.parse(unit).projection != projection:
                raise InvalidArgument(
                    f"unit {unit!r} is not a unit of version {version} of projection {name!r} "
                    f"(its units are named {projection!r} or {projection + '[i/n]'!r})"
                )
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.fetchrow(self._sql_first, name, version)
            row = await connection.fetchrow(
                f"SELECT version, withdrawn FROM {self.serving_table} WHERE name = $1 FOR UPDATE",
                name,
            )
            assert row is not None
            role = role_of(version, row["version"], frozenset(row["withdrawn"]))
            if role is not VersionRole.BUILDING:
                return role
            caught_up, reached = await self._caught_up(connection, units)
            if not caught_up:
                return role
            await self._record_switch(
                connection, name, row["version"], version, reached, "caught-up"
            )
            return VersionRole.SERVING

    async def _caught_up(
        self, connection: Connection, units: Sequence[tuple[str, EventFilter]]
    ) -> tuple[bool, Position | None]:
        # Whether every one of *units* has caught up, and their greatest checkpoint (None:
        # none has applied anything). A checkpoint beyond the store is not caught up: a
        # reset rebuilds it from the beginning.
        names = [unit for unit, _ in units]
        checkpoints: dict[str, Position] = {}
        for row in await connection.fetch(
            f"SELECT {_NAME}, tx, position, "
            f"coalesce({stored_ahead(self._schema, 'tx', 'position')}, false) AS ahead "
            f"FROM {self._subscriptions.table} WHERE {_NAME} = ANY($1::text[]) "
            "AND tx IS NOT NULL",
            names,
        ):
            if row["ahead"]:
                return False, None
            checkpoints[row[_NAME]] = Position(row["tx"], row["position"])
        if units:
            # One EXISTS per unit, each an index walk that stops at its first match: the
            # cost does not grow with how far behind a unit is.
            args: list[object] = []
            probes = []
            for unit, unit_filter in units:
                checkpoint = checkpoints.get(unit)
                args.extend((0, 0) if checkpoint is None else position_parts(checkpoint))
                clauses = [
                    f"(tx, position) > (${len(args) - 1}::bigint, ${len(args)}::bigint)",
                    *filter_clauses(unit_filter, args),
                ]
                probes.append(
                    f"EXISTS (SELECT 1 FROM {self._events} WHERE {' AND '.join(clauses)} LIMIT 1)"
                )
            if await connection.fetchval(f"SELECT {' OR '.join(probes)}", *args):
                return False, None
        return True, max(checkpoints.values(), default=None)

    async def _record_switch(
        self,
        connection: Connection,
        name: str,
        from_version: int | None,
        to_version: int,
        position: Position | None,
        reason: str,
        withdrawn: Sequence[int] | None = None,
    ) -> None:
        # In the caller's transaction, which holds the serving row's lock (or inserts it).
        tx, seq = (None, None) if position is None else position_parts(position)
        await connection.execute(
            f"INSERT INTO {self.serving_table} AS v (name, version, withdrawn) "
            "VALUES ($1, $2, coalesce($3::integer[], '{}')) "
            "ON CONFLICT (name) DO UPDATE SET version = excluded.version, "
            "withdrawn = coalesce($3::integer[], v.withdrawn), since = now()",
            name,
            to_version,
            None if withdrawn is None else sorted(withdrawn),
        )
        await connection.execute(
            f"INSERT INTO {self.switches_table} "
            "(name, from_version, to_version, tx, position, reason) "
            "VALUES ($1, $2, $3, $4, $5, $6)",
            name,
            from_version,
            to_version,
            tx,
            seq,
            reason,
        )

    async def serve(self, name: str, version: int) -> None:
        """An operator's switch to *version*, withdrawing every version above it that has
        not been retired.

        Raises:
            ProjectionNotFound: that version never ran here (or was retired).
        """
        async with self._pool.acquire() as connection, connection.transaction():
            row = await connection.fetchrow(
                f"SELECT version, withdrawn FROM {self.serving_table} WHERE name = $1 FOR UPDATE",
                name,
            )
            recorded = await self._recorded(connection, name)
            if version not in recorded:
                raise ProjectionNotFound(
                    f"version {version} of projection {name!r} has not run against this store "
                    "(or was retired)"
                )
            if row is not None and row["version"] == version:
                return
            withdrawn = set(() if row is None else row["withdrawn"]) - {version}
            withdrawn.update(v for v in recorded if v > version)
            reached = max(
                (
                    Position(r["tx"], r["position"])
                    for r in recorded[version]
                    if r["tx"] is not None
                ),
                default=None,
            )
            await self._record_switch(
                connection,
                name,
                None if row is None else row["version"],
                version,
                reached,
                "manual",
                withdrawn=sorted(withdrawn),
            )

    async def _recorded(self, connection: Connection, name: str) -> dict[int, list[Record]]:
        # Every version of projection *name* with a checkpoint row or a recorded partition
        # count, with its units' checkpoint rows (a version with only a count: none).
        units, args = _prefixed(_NAME, name)
        counted, _ = _prefixed("name", name)
        rows = await connection.fetch(
            f"SELECT {_NAME} AS n, tx, position FROM {self._subscriptions.table} "
            f"WHERE {units} UNION ALL SELECT name, NULL, NULL "
            f"FROM {self._subscriptions.projections_table} WHERE {counted}",
            *args,
        )
        found: dict[int, list[Record]] = {}
        for row in rows:
            base, version = split_versioned(Unit.parse(row["n"]).projection)
            if base == name:
                found.setdefault(version, []).append(row)
        return found

    async def retire_units(self, name: str, version: int) -> list[str] | None:
        """The units of *version* of *name* to lock for a retire: every unit with a row or
        dead letters, and those of its recorded count; None when it never ran here."""
        projection = versioned_name(name, version)
        prefixed, args = _prefixed(_NAME, projection)
        rows = await self._pool.fetch(
            f"SELECT {_NAME} FROM {self._subscriptions.table} WHERE {prefixed} "
            f"UNION SELECT DISTINCT {_NAME} FROM {self._subscriptions.dead_letters_table} "
            f"WHERE {prefixed}",
            *args,
        )
        units = {row[_NAME] for row in rows if Unit.parse(row[_NAME]).projection == projection}
        count = await self._pool.fetchval(
            f"SELECT partitions FROM {self._subscriptions.projections_table} WHERE name = $1",
            projection,
        )
        if count is None and not units:
            return None
        if count is not None:
            units.update(unit.name for unit in units_of(projection, int(count)))
        return sorted(units)

    async def retire(
        self, connection: Connection, name: str, version: int, units: Sequence[str]
    ) -> None:
        """Drop *version* of *name* on *connection*, in its transaction (the caller holds
        every one of *units*' locks): its rows, dead letters, count and read-model schema.

        Raises:
            InvalidArgument: *version* serves.
        """
        serving = await connection.fetchval(
            f"SELECT version FROM {self.serving_table} WHERE name = $1 FOR UPDATE", name
        )
        if serving == version:
            raise refuse_serving(name, version)
        projection = versioned_name(name, version)
        await connection.execute(
            f"DELETE FROM {self._subscriptions.table} WHERE {_NAME} = ANY($1::text[])", units
        )
        await connection.execute(
            f"DELETE FROM {self._subscriptions.dead_letters_table} WHERE {_NAME} = ANY($1::text[])",
            units,
        )
        await connection.execute(
            f"DELETE FROM {self._subscriptions.projections_table} WHERE name = $1", projection
        )
        await connection.execute(
            # Withdrawn for good: a host that still has it must never run it again, nor
            # may it take over on its own (a retired version above the serving one would
            # otherwise build again).
            f"UPDATE {self.serving_table} SET withdrawn = array_append("
            "array_remove(withdrawn, $2), $2) WHERE name = $1",
            name,
            version,
        )
        await connection.execute(drop_schema_statement(self.read_model_schema(name, version)))


def refuse_serving(name: str, version: int) -> InvalidArgument:
    """The error for retiring the version that serves."""
    return InvalidArgument(
        f"version {version} of projection {name!r} serves reads; switch to another version "
        "first (store.serve_version, or eventcore-trio serve NAME VERSION; or let a higher "
        "one catch up), then retire it"
    )


def _prefixed(column: str, prefix: str) -> tuple[str, list[object]]:
    # SQL: *column* (of the "C" collation) starts with *prefix*, as an index range.
    upper = _next_prefix(prefix)
    if upper is None:
        return f"{column} >= $1", [prefix]
    return f"{column} >= $1 AND {column} < $2", [prefix, upper]
