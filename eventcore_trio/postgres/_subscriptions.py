"""Everything about the ``subscriptions`` table (dead letters: see `_dead_letters`).

Where is a checkpoint written? Here: `checkpoint_upsert` is the one compare-and-set statement,
used by `Subscriptions.save_checkpoint` (a position that never moves backwards) and, fenced, by
a projection batch (`_batch`: from exactly the position the batch started at, and only while
its session holds the lock). Also here: loading checkpoints (refusing another cluster's),
leaders' reports, status and reset.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from collections.abc import Sequence
from typing import Any, Final, final

import attrs

from .._errors import CheckpointAhead, CheckpointConflict, ClusterMismatch
from .._filters import EventFilter
from .._partitions import Partition, Unit, plan_repartition, split_parent, units_of
from .._positions import Position, position_parts
from .._status import (
    DeadLetter,
    HostState,
    LeaderInfo,
    OpenTransaction,
    ProjectionState,
    ProjectionStatus,
    ahead_error,
    count_change,
    host_coverage,
    status_order,
    unit_state,
)
from ._admin import foreign_locks
from ._bridge import Connection, Record
from ._dead_letters import DeadLetterTable
from ._keys import projector_lock_key, writer_lock_key
from ._pool import Pool
from ._reads import ReadQueries

_NAME: Final = "subscription_name"

# The columns status reads from a subscriptions row, for a unit that has none yet.
_NO_ROW: Final[dict[str, object]] = {
    "tx": None,
    "position": None,
    "filter": None,
    "state": ProjectionState.STOPPED.value,
    "leader_pid": None,
    "leader_host": None,
    "leader_application": None,
    "leader_backend_pid": None,
    "last_error": None,
    "updated_at": None,
    "dead_letters": 0,
    "ahead": False,
}


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
    return json.dumps(
        {
            "event_types": None
            if event_filter.event_types is None
            else sorted(event_filter.event_types),
            "stream_prefix": event_filter.stream_prefix,
            "stream_pattern": event_filter.stream_pattern,
            "partition": None
            if event_filter.partition is None
            else [event_filter.partition.index, event_filter.partition.count],
        }
    )


def _child_filter(parent: str | None, child: Unit) -> str | None:
    # The parent's stored filter (for lag) narrowed to the child's partition.
    if parent is None:
        return None
    fields: dict[str, Any] = json.loads(parent)
    assert child.partition is not None
    fields["partition"] = [child.partition.index, child.partition.count]
    return json.dumps(fields)


def _filter_from_json(text: str | None) -> EventFilter | None:
    if text is None:
        return None
    fields: dict[str, Any] = json.loads(text)
    partition = fields.pop("partition", None)
    return EventFilter(**fields, partition=None if partition is None else Partition(*partition))


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


@attrs.frozen
class _UnitLocks:
    holder_pid: int | None
    # RESETTING or REPARTITIONING when the holder is a reset's or a count change's session.
    holder_role: ProjectionState | None
    # Sessions waiting to lead (an operator's waiting reset is not a standby).
    standbys: int


def _lock_sessions(locks: Sequence[Record], name: str) -> _UnitLocks:
    # Sessions say what they are in their application_name (see PostgresStore._acquire): a
    # reset's is "<application> reset <unit>"; a change of the partition count holds every
    # unit of the old count on one session, "<application> repartition <projection>" (before
    # version 0.3: one session per unit, "... repartition <unit>").
    projection = Unit.parse(name).projection
    resets = (f" reset {name}",)
    repartitions = (f" repartition {projection}", f" repartition {name}")

    def role(lock: Record) -> ProjectionState | None:
        application = lock["application_name"] or ""
        if application.endswith(resets):
            return ProjectionState.RESETTING
        if application.endswith(repartitions):
            return ProjectionState.REPARTITIONING
        return None

    holders = [lock for lock in locks if lock["granted"]]
    holder = holders[0] if holders else None
    return _UnitLocks(
        holder_pid=None if holder is None else holder["pid"],
        holder_role=None if holder is None else role(holder),
        standbys=sum(1 for lock in locks if not lock["granted"] and role(lock) is None),
    )


def _leader_units(schema: str, locks: Sequence[Record]) -> set[str]:
    # The units whose lock a leader's (or standby's) session holds or waits for, as far as
    # their session names them: "<application> leader <unit>", unless application_name
    # was truncated (63 bytes), which the key check below notices.
    units = set()
    for lock in locks:
        application: str = lock["application_name"] or ""
        start = application.find(" leader ")
        while start >= 0:
            candidate = application[start + len(" leader ") :]
            if projector_lock_key(schema, candidate) == lock["key"]:
                units.add(candidate)
                break
            start = application.find(" leader ", start + 1)
    return units


@final
class Subscriptions:
    """Checkpoints, status, reset and dead letters of one schema, on the store's pool."""

    def __init__(
        self, pool: Pool, schema: str, system_identifier: str | None, reads: ReadQueries
    ) -> None:
        self._pool = pool
        self._schema = schema
        self._system_identifier = system_identifier
        # The store's read statements, for lag.
        self._reads = reads
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
                            _child_filter(parent["filter"], child),
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

    async def status(
        self, hosts: Sequence[tuple[HostState, LeaderInfo]] = ()
    ) -> list[ProjectionStatus]:
        """One record per unit with a row or that a live host of *hosts* (what each
        published, and who it is) runs; see `PostgresStore.projection_status`."""
        rows = await self._pool.fetch(
            "SELECT c.subscription_name, c.tx, c.position, c.filter::text AS filter, c.state, "
            "c.leader_pid, c.leader_host, c.leader_application, c.leader_backend_pid, "
            "c.last_error, c.updated_at, "
            f"coalesce({stored_ahead(self._schema, 'c.tx', 'c.position')}, false) AS ahead, "
            f"(SELECT count(*) FROM {self.dead_letters_table} d "
            " WHERE d.subscription_name = c.subscription_name) AS dead_letters "
            f"FROM {self.table} c ORDER BY c.subscription_name"
        )
        # Every advisory lock (held or awaited) with its session's application_name, which
        # says whether a session leads or stands by, or is an operator's reset.
        locks = await self._pool.fetch(
            "SELECT ((l.classid::bigint << 32) | l.objid::bigint) AS key, l.granted, l.pid, "
            "a.application_name FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.objsubid = 1 "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        sessions: dict[int, list[Record]] = {}
        for lock in locks:
            sessions.setdefault(lock["key"], []).append(lock)
        recorded = {
            row["name"]: row["partitions"]
            for row in await self._pool.fetch(
                f"SELECT name, partitions FROM {self.projections_table}"
            )
        }
        held_back_by = await self._oldest_open_transaction()
        by_name = {row[_NAME]: row for row in rows}
        runnable = {u for state, _ in hosts for u in state.can_run}
        in_use = _leader_units(self._schema, locks)

        def other_count(unit: Unit) -> int | None:
            # The projection's recorded count, when *unit* is of another one.
            count = recorded.get(unit.projection)
            return None if count is None or count == unit.partitions else count

        # Projections with something applied under their recorded count: only a split may
        # change their count.
        applied = set()
        for row in rows:
            ran = Unit.parse(row[_NAME])
            if (row["tx"] is not None or row["dead_letters"]) and other_count(ran) is None:
                applied.add(ran.projection)
        # A unit a live host runs is listed before it first runs (no row yet): as stopped,
        # with every event of its partition as lag (its filter is recorded when it runs).
        # A unit of a count the projection does not have (a change of count under way, or
        # refused) is listed while a live host runs it or a session leads or awaits it.
        names = set(by_name) | runnable | {u for u in in_use if other_count(Unit.parse(u))}
        # Sessions from outside the store on its locks: every record has those on the
        # store's own locks, and those on its unit's lock.
        foreign = await foreign_locks(self._pool, self._schema, sorted(names))
        store_wide = tuple(lock for lock in foreign if lock.unit is None)
        now = dt.datetime.now(dt.UTC)
        result = []
        for name in sorted(names):
            row = by_name.get(name) or {_NAME: name, **_NO_ROW}
            parsed = Unit.parse(name)
            key = projector_lock_key(self._schema, name)
            recorded_count = other_count(parsed)
            if recorded_count is not None and not (
                name in runnable or name in in_use or key in sessions
            ):
                continue  # a unit of a count the projection no longer has, or never had
            checkpoint = None if row["tx"] is None else Position(row["tx"], row["position"])
            ahead = checkpoint is not None and bool(row["ahead"])
            event_filter = _filter_from_json(row["filter"])
            if name not in by_name and parsed.partition is not None:
                event_filter = EventFilter(partition=parsed.partition)
            lag_from = checkpoint
            runnable_by, lacking = host_coverage(name, hosts)
            unit = _lock_sessions(sessions.get(key, []), name)
            holder: ProjectionState | None = unit.holder_role
            leader = None
            last = ProjectionState(row["state"])
            last_error = row["last_error"]
            if recorded_count is not None:
                # It applies nothing, whoever holds its lock: it waits for the count to
                # change (its lag counts from the checkpoint it will continue from), or its
                # hosts are refused.
                change = count_change(parsed, recorded_count, applied=parsed.projection in applied)
                holder = holder or change.state
                last_error = change.error or last_error
                parent = None if change.parent is None else by_name.get(change.parent.name)
                if parent is not None and parent["tx"] is not None and not parent["ahead"]:
                    lag_from = Position(parent["tx"], parent["position"])
                    if parent["filter"] is not None:
                        event_filter = _filter_from_json(_child_filter(parent["filter"], parsed))
            elif holder is None and unit.holder_pid is not None:
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
            if checkpoint is not None and ahead:
                last_error = ahead_error(name, checkpoint, last_error)
                lag_from = None  # a reset rebuilds from the beginning: all of it is lag
            lag_events, oldest = await self._lag(lag_from, event_filter)
            state = unit_state(holder=holder, standbys=unit.standbys, last=last)
            result.append(
                ProjectionStatus(
                    name=parsed.projection,
                    partition=None if parsed.partition is None else parsed.partition.index,
                    partitions=parsed.partitions,
                    checkpoint=checkpoint,
                    lag_events=lag_events,
                    lag_seconds=0.0 if oldest is None else max(0.0, (now - oldest).total_seconds()),
                    leader=leader,
                    standbys=unit.standbys,
                    state=state,
                    last_error=last_error,
                    updated_at=row["updated_at"],
                    dead_letters=int(row["dead_letters"]),
                    held_back_by=held_back_by,
                    runnable_by=runnable_by,
                    lacking_hosts=lacking,
                    checkpoint_ahead=ahead,
                    foreign_locks=store_wide + tuple(f for f in foreign if f.unit == name),
                )
            )
        return sorted(result, key=status_order)

    async def _lag(
        self, checkpoint: Position | None, event_filter: EventFilter | None
    ) -> tuple[int, dt.datetime | None]:
        sql, args = self._reads.lag(checkpoint, event_filter)
        row = await self._pool.fetchrow(sql, *args)
        assert row is not None
        return int(row["n"]), row["oldest"]

    async def _oldest_open_transaction(self) -> OpenTransaction | None:
        # The oldest open transaction that has announced itself as an event writer (holds the
        # writer lock) and has an id, when committed events wait: it holds readers back.
        # Other open transactions do not (docs/postgres.md, "The read horizon").
        horizon = await self._pool.fetchrow(self._reads.horizon)
        if horizon is None or not horizon["held_back"]:
            return None
        row = await self._pool.fetchrow(
            "SELECT pid, application_name, state, xact_start, left(query, 200) AS query "
            "FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid IN ("
            "  SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            "  AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = $1"
            "  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ") ORDER BY age(backend_xid) DESC LIMIT 1",
            writer_lock_key(self._schema),
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
