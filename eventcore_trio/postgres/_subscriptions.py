"""Everything about the ``subscriptions`` and ``dead_letters`` tables.

Where is a checkpoint written? Here: `checkpoint_upsert` is the one compare-and-set statement,
used by `Subscriptions.save_checkpoint` (a position that never moves backwards) and, fenced, by
a projection batch (`_batch`: from exactly the position the batch started at, and only while
its session holds the lock). Also here: loading checkpoints (refusing another cluster's),
leaders' reports, status, reset and dead letters.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from collections.abc import Sequence
from typing import Any, Final, final

import attrs

from .._decoding import decode_stored
from .._errors import CheckpointConflict, ClusterMismatch
from .._events import RecordedEvent, UndecodableEvent
from .._filters import EventFilter
from .._positions import Position, position_parts
from .._status import (
    DeadLetter,
    LeaderInfo,
    OpenTransaction,
    ProjectionState,
    ProjectionStatus,
    unit_state,
)
from ._bridge import Connection, Pool, Record
from ._keys import projector_lock_key
from ._reads import ReadQueries

_NAME: Final = "subscription_name"


def checkpoint_upsert(subscriptions: str, *, condition: str, fence: str | None = None) -> str:
    """The compare-and-set that saves a checkpoint: one statement, one row back or none.

    Arguments ``$1``-``$4``: name, tx, position, system identifier. The row is inserted, or
    updated only where *condition* holds (``c`` is the stored row, ``excluded`` the new one);
    with *fence*, nothing happens unless that condition holds too. No row back means nothing
    was saved: another writer moved the checkpoint, or the fence failed.
    """
    return (
        f"INSERT INTO {subscriptions} AS c ({_NAME}, tx, position, system_identifier, "
        "updated_at) "
        f"SELECT $1::text, $2::bigint, $3::bigint, $4::text, now() WHERE {fence or 'true'} "
        f"ON CONFLICT ({_NAME}) DO UPDATE "
        "SET tx = excluded.tx, position = excluded.position, "
        "system_identifier = excluded.system_identifier, updated_at = now() "
        f"WHERE {condition} RETURNING 1"
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
        }
    )


def _filter_from_json(text: str | None) -> EventFilter | None:
    if text is None:
        return None
    fields: dict[str, Any] = json.loads(text)
    return EventFilter(**fields)


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
    holder_resetting: bool
    standbys: int


def _lock_sessions(locks: Sequence[Record], name: str) -> _UnitLocks:
    # Reset sessions are named "<application> reset <name>" (see PostgresStore._acquire).
    def resetting(lock: Record) -> bool:
        return (lock["application_name"] or "").endswith(f" reset {name}")

    holders = [lock for lock in locks if lock["granted"]]
    holder = holders[0] if holders else None
    return _UnitLocks(
        holder_pid=None if holder is None else holder["pid"],
        holder_resetting=holder is not None and resetting(holder),
        standbys=sum(1 for lock in locks if not lock["granted"] and not resetting(lock)),
    )


def _to_dead_letter(row: Record) -> DeadLetter:
    event = decode_stored(
        Position(row["tx"], row["position"]),
        row["stream_id"],
        row["stream_version"],
        row["event_id"],
        row["type"],
        row["data"],
        row["metadata"],
        row["event_recorded_at"],
        known_error=row["decode_error"],
    )
    return DeadLetter(
        id=row["id"],
        projection=row[_NAME],
        event=event,
        error_type=row["error_type"],
        error_message=row["error_message"],
        retries=row["retries"],
        recorded_at=row["recorded_at"],
    )


def dead_letter_arguments(
    name: str, event: RecordedEvent | UndecodableEvent, error: BaseException, retries: int
) -> list[object]:
    """The arguments of `Subscriptions.dead_letter_insert` for *event*."""
    tx, seq = position_parts(event.position)
    if isinstance(event, RecordedEvent):
        data, metadata, decode_error = json.dumps(event.data), json.dumps(event.metadata), None
    else:
        data, metadata, decode_error = event.raw_data, event.raw_metadata, event.error
    return [
        name,
        tx,
        seq,
        event.event_id,
        event.stream_id,
        event.stream_version,
        event.type,
        data,
        metadata,
        decode_error,
        event.recorded_at,
        f"{type(error).__module__}.{type(error).__qualname__}",
        str(error),
        retries,
    ]


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
        self.dead_letters_table = f"{s}.dead_letters"
        self.dead_letter_insert = (
            f"INSERT INTO {self.dead_letters_table} ({_NAME}, tx, position, event_id, stream_id, "
            "stream_version, type, data, metadata, decode_error, event_recorded_at, "
            "error_type, error_message, retries) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
        )
        self.dead_letter_delete = (
            f"DELETE FROM {self.dead_letters_table} WHERE id = $1 AND {_NAME} = $2"
        )
        self._sql_load = (
            f"SELECT tx, position, system_identifier FROM {self.table} WHERE {_NAME} = $1"
        )
        # Moves only forward: never behind the stored position.
        self._sql_save = checkpoint_upsert(
            self.table,
            condition="c.tx IS NULL OR (c.tx, c.position) <= (excluded.tx, excluded.position)",
        )

    @property
    def system_identifier(self) -> str | None:
        """The cluster's identity, stored with every checkpoint."""
        return self._system_identifier

    async def load_checkpoint(self, name: str) -> Position | None:
        """The saved position, refusing one saved on another cluster.

        Raises:
            ClusterMismatch: saved on another cluster (for example before a dump and restore).
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
        return Position(row["tx"], row["position"])

    async def save_checkpoint(self, name: str, position: Position) -> None:
        """Save *position*, never moving the checkpoint backwards.

        Raises:
            CheckpointConflict: *position* is behind the saved checkpoint; nothing changed.
        """
        tx, seq = position_parts(position)
        saved = await self._pool.fetchval(self._sql_save, name, tx, seq, self._system_identifier)
        if saved is None:
            raise CheckpointConflict(name, position, await self.load_checkpoint(name))

    async def exists(self, name: str) -> bool:
        """Whether *name* has a row (it ran or checkpointed here)."""
        found = await self._pool.fetchval(f"SELECT 1 FROM {self.table} WHERE {_NAME} = $1", name)
        return found is not None

    async def reset(self, connection: Connection, name: str) -> None:
        """Forget *name*'s checkpoint and dead letters, on *connection* (in its transaction)."""
        await connection.execute(
            f"UPDATE {self.table} SET tx = NULL, position = NULL, state = 'stopped', "
            f"last_error = NULL, updated_at = now() WHERE {_NAME} = $1",
            name,
        )
        await connection.execute(f"DELETE FROM {self.dead_letters_table} WHERE {_NAME} = $1", name)

    async def dead_letters(self, name: str) -> list[DeadLetter]:
        """*name*'s dead letters, in position order."""
        rows = await self._pool.fetch(
            f"SELECT * FROM {self.dead_letters_table} WHERE {_NAME} = $1 ORDER BY tx, position",
            name,
        )
        return [_to_dead_letter(row) for row in rows]

    async def status(self) -> list[ProjectionStatus]:
        """One record per projection with a row; see `PostgresStore.projection_status`."""
        rows = await self._pool.fetch(
            "SELECT c.subscription_name, c.tx, c.position, c.filter::text AS filter, c.state, "
            "c.leader_pid, c.leader_host, c.leader_application, c.leader_backend_pid, "
            "c.last_error, c.updated_at, "
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
        held_back_by = await self._oldest_open_transaction()
        now = dt.datetime.now(dt.UTC)
        result = []
        for row in rows:
            name = row[_NAME]
            checkpoint = None if row["tx"] is None else Position(row["tx"], row["position"])
            lag_events, oldest = await self._lag(checkpoint, _filter_from_json(row["filter"]))
            unit = _lock_sessions(sessions.get(projector_lock_key(self._schema, name), []), name)
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
                holder=holder, standbys=unit.standbys, last=ProjectionState(row["state"])
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
        sql, args = self._reads.lag(checkpoint, event_filter)
        row = await self._pool.fetchrow(sql, *args)
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
