"""Everything about the ``subscriptions`` table (dead letters: see `_dead_letters`).

Where is a checkpoint written? Here: `checkpoint_upsert` is the one compare-and-set statement,
used by `Subscriptions.save_checkpoint` (a position that never moves backwards) and, fenced, by
a projection batch (`_batch`: from exactly the position the batch started at, and only while
its session holds the lock). Also here: loading checkpoints (refusing another cluster's),
leaders' reports, changes of the partition count and reset. The status report, which reads
these rows: `_status_report`.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from typing import Any, Final, final

from .._errors import CheckpointAhead, CheckpointConflict, ClusterMismatch
from .._filters import EventFilter
from .._partitions import Unit, plan_repartition, split_parent, units_of
from .._positions import Position, position_parts
from .._status import (
    DeadLetter,
    ProjectionState,
)
from ._bridge import Connection
from ._dead_letters import DeadLetterTable
from ._pool import Pool

_NAME: Final = "subscription_name"


def last_drawn(schema: str) -> str:
    """SQL: the last position the events' sequence drew (0 before the first), or NULL when
    this role may not read the sequence (then positions are bounded by transaction id alone).

    A sequence only moves forward, outside transactions, so every position an event has (or
    had, in a transaction that rolled back) is at most this. ``pg_sequence_last_value`` is
    what the ``pg_sequences`` view reads; it is called only when permitted.
    """
    sequence = f"'\"{schema}\".events_position_seq'"
    return (
        f"CASE WHEN has_sequence_privilege({sequence}, 'SELECT, USAGE') "
        f"THEN coalesce(pg_sequence_last_value({sequence}::regclass), 0) END"
    )


def stored_ahead(schema: str, tx: str, position: str) -> str:
    """SQL: whether a stored checkpoint (*tx*, *position*) is beyond every position the store
    can have produced, by a statement that only reads.

    Every event's tx is at most a transaction id its writer owned (see writer_floor in
    `_schema`), and a checkpoint row is written by a transaction with a larger id (its save
    refuses a tx above its own id, and a batch checkpoints what it read before it began). So
    the row's writer, and the tx, lie below the xmax of any snapshot that sees the row: a
    tx at or above it was never produced. The same for a position above the last drawn.
    """
    return (
        f"({tx} >= pg_snapshot_xmax(pg_current_snapshot())::text::bigint "
        f"OR coalesce({position} > {last_drawn(schema)}, false))"
    )


def checkpoint_upsert(
    subscriptions: str, schema: str, *, condition: str, fence: str | None = None
) -> str:
    """The compare-and-set that saves a checkpoint: one statement, one row back.

    Arguments ``$1``-``$4``: name, tx, position, system identifier. The row comes back with
    ``ahead`` and ``saved``. ``ahead``: the position is beyond every position the store can
    have produced (a tx above every transaction id assigned so far, this statement's own
    included, or a position above the last one drawn), and nothing was saved. Otherwise the
    row is inserted, or updated only where *condition* holds (``c`` is the stored row,
    ``excluded`` the new one); with *fence*, nothing happens unless that condition holds too.
    ``saved`` false means nothing was saved: another writer moved the checkpoint, or the fence
    failed.

    The tx bound is this transaction's own id, which a checkpoint write takes anyway: any
    position its caller holds was drawn by a transaction that had its id before this one.
    """
    return (
        "WITH bound AS MATERIALIZED (SELECT "
        "($2::bigint > pg_current_xact_id()::text::bigint "
        f"OR coalesce($3::bigint > {last_drawn(schema)}, false)) AS ahead), "
        f"saved AS (INSERT INTO {subscriptions} AS c ({_NAME}, tx, position, system_identifier, "
        "updated_at) "
        "SELECT $1::text, $2::bigint, $3::bigint, $4::text, now() FROM bound "
        f"WHERE NOT bound.ahead AND {fence or 'true'} "
        f"ON CONFLICT ({_NAME}) DO UPDATE "
        "SET tx = excluded.tx, position = excluded.position, "
        "system_identifier = excluded.system_identifier, updated_at = now() "
        f"WHERE {condition} RETURNING 1) "
        "SELECT bound.ahead, EXISTS (SELECT 1 FROM saved) AS saved FROM bound"
    )


def filter_to_json(event_filter: EventFilter | None) -> str | None:
    """The filter as stored in ``subscriptions.filter`` (read back by status, for lag)."""
    if event_filter is None:
        return None
    fields: dict[str, object] = {
        "event_types": None
        if event_filter.event_types is None
        else sorted(event_filter.event_types),
        "stream_prefix": event_filter.stream_prefix,
        "stream_pattern": event_filter.stream_pattern,
        "partition": None
        if event_filter.partition is None
        else [event_filter.partition.index, event_filter.partition.count],
    }
    if event_filter.tags:
        # Only when there are tags: a host of an earlier version reads this back too (a
        # rolling upgrade), and would refuse a key it does not know.
        fields["tags"] = list(event_filter.tags)
    return json.dumps(fields)


def child_filter(parent: str | None, child: Unit) -> str | None:
    """The parent's stored filter (JSON, for lag) narrowed to the *child*'s partition."""
    if parent is None:
        return None
    fields: dict[str, Any] = json.loads(parent)
    assert child.partition is not None
    fields["partition"] = [child.partition.index, child.partition.count]
    return json.dumps(fields)


def report_statement(subscriptions: str) -> str:
    """What a leader records about itself: ``$1`` name, ``$2`` state, ``$3`` error, ``$4``
    filter, ``$5`` pid, ``$6`` host, ``$7`` the lock session's backend pid."""
    # A replay keeps the last error: it does not end what the last leader's failure says.
    return (
        f"INSERT INTO {subscriptions} AS c ({_NAME}, state, last_error, filter, leader_pid, "
        "leader_host, leader_application, leader_backend_pid, updated_at) "
        "VALUES ($1, $2, $3, $4::jsonb, $5, $6, current_setting('application_name'), $7, now()) "
        f"ON CONFLICT ({_NAME}) DO UPDATE SET state = excluded.state, "
        "last_error = CASE WHEN excluded.state = 'replaying' THEN c.last_error "
        "ELSE excluded.last_error END, "
        "filter = coalesce(excluded.filter, c.filter), "
        "leader_pid = excluded.leader_pid, leader_host = excluded.leader_host, "
        "leader_application = excluded.leader_application, "
        "leader_backend_pid = excluded.leader_backend_pid, updated_at = now()"
    )


def report_arguments(
    name: str,
    state: ProjectionState,
    error: str | None,
    event_filter: EventFilter | None,
    backend_pid: int,
) -> list[object]:
    """The arguments of `report_statement`."""
    running = state is ProjectionState.RUNNING
    holding = running or state is ProjectionState.REPLAYING
    return [
        name,
        state.value if state is not ProjectionState.STANDBY else "stopped",
        error,
        filter_to_json(event_filter),
        os.getpid() if running else None,
        socket.gethostname() if running else None,
        backend_pid if holding else None,
    ]


@final
class Subscriptions:
    """Checkpoints, partition counts, reset and dead letters of one schema, on the store's
    pool."""

    def __init__(self, pool: Pool, schema: str, system_identifier: str | None) -> None:
        self._pool = pool
        self._schema = schema
        self._system_identifier = system_identifier
        s = f'"{schema}"'
        self.table = f"{s}.subscriptions"
        self.projections_table = f"{s}.projections"
        self._stream_hash = f"{s}.stream_hash"
        # The dead letters of the units: their statements, and reading them back.
        self.letters = DeadLetterTable(pool, schema)
        self.dead_letters_table = self.letters.table
        self._sql_load = (
            f"SELECT tx, position, system_identifier, "
            f"{stored_ahead(schema, 'tx', 'position')} AS ahead "
            f"FROM {self.table} WHERE {_NAME} = $1"
        )
        # Moves only forward: never behind the stored position.
        self._sql_save = checkpoint_upsert(
            self.table,
            schema,
            condition="c.tx IS NULL OR (c.tx, c.position) <= (excluded.tx, excluded.position)",
        )

    @property
    def schema(self) -> str:
        """The schema of the tables (and of the events' position sequence)."""
        return self._schema

    @property
    def system_identifier(self) -> str | None:
        """The cluster's identity, stored with every checkpoint."""
        return self._system_identifier

    async def load_checkpoint(self, name: str) -> Position | None:
        """The saved position, refusing one saved on another cluster or ahead of the store.

        Raises:
            ClusterMismatch: saved on another cluster (for example before a dump and restore).
            CheckpointAhead: beyond every position this store can have produced.
        """
        row = await self._pool.fetchrow(self._sql_load, name)
        if row is None or row["tx"] is None:
            return None
        saved_on = row["system_identifier"]
        if saved_on is not None and self._system_identifier not in (None, saved_on):
            raise ClusterMismatch(
                f"checkpoint {name!r} was saved on PostgreSQL cluster {saved_on}, but this is "
                f"cluster {self._system_identifier}; its position would skip or repeat events "
                f"here. Reset the projection to rebuild it on this cluster."
            )
        position = Position(row["tx"], row["position"])
        if row["ahead"]:
            raise CheckpointAhead(name, position, stored=True)
        return position

    async def save_checkpoint(self, name: str, position: Position) -> None:
        """Save *position*, never moving the checkpoint backwards.

        Raises:
            CheckpointAhead: *position* is beyond every position the store can have
                produced; nothing changed.
            CheckpointConflict: *position* is behind the saved checkpoint; nothing changed.
        """
        tx, seq = position_parts(position)
        row = await self._pool.fetchrow(self._sql_save, name, tx, seq, self._system_identifier)
        assert row is not None
        if row["ahead"]:
            raise CheckpointAhead(name, position, stored=False)
        if not row["saved"]:
            raise CheckpointConflict(name, position, await self._stored(name))

    async def _stored(self, name: str) -> Position | None:
        # The stored checkpoint as it is, for a conflict's report (even one ahead).
        row = await self._pool.fetchrow(self._sql_load, name)
        return None if row is None or row["tx"] is None else Position(row["tx"], row["position"])

    async def exists(self, name: str) -> bool:
        """Whether *name* has a row (it ran or checkpointed here), or any partition of it has."""
        found = await self._pool.fetchval(
            f"SELECT 1 FROM {self.table} WHERE {_NAME} = ANY($1::text[]) LIMIT 1",
            await self.unit_names(name),
        )
        return found is not None

    async def partitions(self, name: str) -> int | None:
        """*name*'s partition count: as recorded; 1 for a projection that ran before one was
        recorded (a checkpoint row of its own name); None for one that never ran."""
        row = await self._pool.fetchrow(
            f"SELECT (SELECT partitions FROM {self.projections_table} WHERE name = $1) AS k, "
            f"EXISTS (SELECT 1 FROM {self.table} WHERE {_NAME} = $1) AS own_row",
            name,
        )
        assert row is not None
        if row["k"] is not None:
            return int(row["k"])
        return 1 if row["own_row"] else None

    async def unit_names(self, name: str) -> list[str]:
        """The lock and checkpoint names of *name*'s units (itself, if it is a unit name)."""
        if Unit.parse(name).partition is not None:
            return [name]
        return [unit.name for unit in units_of(name, await self.partitions(name) or 1)]

    async def check_change(self, name: str, current: int, requested: int) -> None:
        """Refuse now, before waiting for any lock, a change of *name*'s count from *current*
        to *requested* that `repartition` would refuse.

        Read without the locks: a unit that applies its first event meanwhile is noticed by
        `repartition`; a reset meanwhile makes this refusal one too many, which the caller's
        next attempt (after its backoff) no longer makes.

        Raises:
            PartitionsChanged: the change would divide applied events.
        """
        old = [unit.name for unit in units_of(name, current)]
        applied = await self._pool.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {self.table} WHERE {_NAME} = ANY($1::text[]) "
            "AND tx IS NOT NULL) OR EXISTS (SELECT 1 FROM "
            f"{self.dead_letters_table} WHERE {_NAME} = ANY($1::text[]))",
            old,
        )
        plan_repartition(name, current, requested, applied=bool(applied))

    async def repartition(
        self, connection: Connection, name: str, requested: int, *, locked: int | None
    ) -> bool:
        """Record *requested* as *name*'s partition count, changing it if need be.

        Runs on *connection*, in its transaction, while the caller holds the lock of every
        unit of count *locked* (None: none), so no unit of it commits meanwhile. A split
        copies each parent's checkpoint to its children and moves dead letters to the
        partition of their stream. Returns False, changing nothing, when the recorded count
        is not *locked* and must change: take that count's locks and call again.

        Raises:
            PartitionsChanged: the change would divide applied events (see `plan_repartition`).
        """
        # A projection that checkpointed before counts were recorded has one partition.
        await connection.execute(
            f"INSERT INTO {self.projections_table} (name, partitions) "
            f"SELECT $1, CASE WHEN EXISTS (SELECT 1 FROM {self.table} WHERE {_NAME} = $1) "
            "THEN 1 ELSE $2 END ON CONFLICT (name) DO NOTHING",
            name,
            requested,
        )
        current = await connection.fetchval(
            f"SELECT partitions FROM {self.projections_table} WHERE name = $1 FOR UPDATE", name
        )
        if current == requested:
            return True
        if current != locked:
            return False
        old = [unit.name for unit in units_of(name, current)]
        rows = {
            row[_NAME]: row
            for row in await connection.fetch(
                f"SELECT {_NAME}, tx, position, system_identifier, filter::text AS filter "
                f"FROM {self.table} WHERE {_NAME} = ANY($1::text[]) FOR UPDATE",
                old,
            )
        }
        letters = await connection.fetchval(
            f"SELECT count(*) FROM {self.dead_letters_table} WHERE {_NAME} = ANY($1::text[])", old
        )
        applied = letters > 0 or any(row["tx"] is not None for row in rows.values())
        plan = plan_repartition(name, current, requested, applied=applied)
        if plan == "split":
            children = []
            for child in units_of(name, requested):
                parent = rows.get(split_parent(child, current).name)
                if parent is not None:
                    children.append(
                        [
                            child.name,
                            parent["tx"],
                            parent["position"],
                            parent["system_identifier"],
                            child_filter(parent["filter"], child),
                        ]
                    )
            await connection.executemany(
                f"INSERT INTO {self.table} ({_NAME}, tx, position, system_identifier, filter) "
                "VALUES ($1, $2, $3, $4, $5::jsonb) "
                f"ON CONFLICT ({_NAME}) DO UPDATE SET tx = excluded.tx, "
                "position = excluded.position, system_identifier = excluded.system_identifier, "
                "filter = excluded.filter, state = 'stopped', last_error = NULL, "
                "leader_pid = NULL, leader_host = NULL, leader_application = NULL, "
                "leader_backend_pid = NULL, updated_at = now()",
                children,
            )
            # text || text and bigint % bigint only: pg_catalog's operators of exactly those
            # types (text || int, or bigint % int, would let a look-alike elsewhere win).
            await connection.execute(
                f"UPDATE {self.dead_letters_table} SET {_NAME} = $2::text || '[' "
                f"|| ({self._stream_hash}(stream_id) % $3::bigint)::text || '/' "
                f"|| $3::bigint::text || ']' WHERE {_NAME} = ANY($1::text[])",
                old,
                name,
                requested,
            )
        await connection.execute(f"DELETE FROM {self.table} WHERE {_NAME} = ANY($1::text[])", old)
        await connection.execute(
            f"UPDATE {self.projections_table} SET partitions = $2, updated_at = now() "
            "WHERE name = $1",
            name,
            requested,
        )
        return True

    async def reset(self, connection: Connection, names: Sequence[str]) -> None:
        """Forget the checkpoints and dead letters of units *names*, on *connection* (in its
        transaction)."""
        await connection.execute(
            f"UPDATE {self.table} SET tx = NULL, position = NULL, state = 'stopped', "
            f"last_error = NULL, updated_at = now() WHERE {_NAME} = ANY($1::text[])",
            names,
        )
        await connection.execute(
            f"DELETE FROM {self.dead_letters_table} WHERE {_NAME} = ANY($1::text[])", names
        )

    async def dead_letters(self, name: str) -> list[DeadLetter]:
        """The dead letters of *name* (every partition of it), in position order."""
        return await self.letters.read(await self.unit_names(name))
