"""What `PostgresStore.projection_status` reports: one record per unit, read from the
``subscriptions`` rows, the recorded partition counts, every advisory lock with its session's
name, the live hosts, the read horizon and the lag of each unit."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any, Final, final

import attrs

from .._filters import EventFilter
from .._partitions import Partition, Unit
from .._positions import Position
from .._status import (
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
from .._versions import VersionRole, role_of, split_versioned
from ._admin import foreign_locks
from ._bridge import Record
from ._keys import projector_lock_key, writer_lock_key
from ._pool import Pool
from ._reads import ReadQueries, lag_estimate
from ._subscriptions import Subscriptions, child_filter, stored_ahead

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


def _filter_from_json(text: str | None) -> EventFilter | None:
    if text is None:
        return None
    fields: dict[str, Any] = json.loads(text)
    partition = fields.pop("partition", None)
    return EventFilter(**fields, partition=None if partition is None else Partition(*partition))


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
class StatusReport:
    """Reads the status of every unit of one schema, on the store's pool."""

    def __init__(self, pool: Pool, reads: ReadQueries, subscriptions: Subscriptions) -> None:
        self._pool = pool
        self._schema = subscriptions.schema
        # The store's read statements, for lag and the read horizon.
        self._reads = reads
        # The tables it reads: the checkpoints, the recorded counts, the dead letters.
        self._table = subscriptions.table
        self._projections_table = subscriptions.projections_table
        self._dead_letters_table = subscriptions.dead_letters_table

    async def read(
        self, hosts: Sequence[tuple[HostState, LeaderInfo]] = ()
    ) -> list[ProjectionStatus]:
        """One record per unit with a row or that a live host of *hosts* (what each
        published, and who it is) runs; see `PostgresStore.projection_status`."""
        rows = await self._pool.fetch(
            "SELECT c.subscription_name, c.tx, c.position, c.filter::text AS filter, c.state, "
            "c.leader_pid, c.leader_host, c.leader_application, c.leader_backend_pid, "
            "c.last_error, c.updated_at, "
            f"coalesce({stored_ahead(self._schema, 'c.tx', 'c.position')}, false) AS ahead, "
            f"(SELECT count(*) FROM {self._dead_letters_table} d "
            " WHERE d.subscription_name = c.subscription_name) AS dead_letters "
            f"FROM {self._table} c ORDER BY c.subscription_name"
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
                f"SELECT name, partitions FROM {self._projections_table}"
            )
        }
        # Which version of each projection serves, and which are withdrawn.
        serving = {
            row["name"]: (row["version"], frozenset(row["withdrawn"]))
            for row in await self._pool.fetch(
                f'SELECT name, version, withdrawn FROM "{self._schema}".serving_versions'
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
                        event_filter = _filter_from_json(child_filter(parent["filter"], parsed))
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
            lag_events, estimated, oldest = await self._lag(lag_from, event_filter)
            base, version = split_versioned(parsed.projection)
            served = serving.get(base)
            role = None if served is None else role_of(version, *served)
            state = unit_state(
                holder=holder,
                standbys=unit.standbys,
                last=last,
                superseded=role in (VersionRole.SUPERSEDED, VersionRole.WITHDRAWN),
            )
            result.append(
                ProjectionStatus(
                    name=base,
                    version=version,
                    serving=role is None or role is VersionRole.SERVING,
                    partition=None if parsed.partition is None else parsed.partition.index,
                    partitions=parsed.partitions,
                    checkpoint=checkpoint,
                    lag_events=lag_events,
                    lag_estimated=estimated,
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
    ) -> tuple[int, bool, dt.datetime | None]:
        sql, args = self._reads.lag(checkpoint, event_filter)
        return lag_estimate(await self._pool.fetch(sql, *args))

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
