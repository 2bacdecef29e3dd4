"""The ``snapshots`` table: reading, writing (never backwards) and deleting snapshots.

A snapshot row names the last event folded into it as recorded (``event_id`` and
``event_recorded_at``, migration 4), and is trusted only while that event is still the
stream's event at the row's version: the version alone proves only that the stream is that
long, which a restored stream that other writers have grown back is too, and the id alone
only that an event with that id is there, which a writer's retry of an event the restore
lost (the same id, its idempotency key) puts back, later, on top of another history.
"""

from __future__ import annotations

from typing import Any, final

from .._backend._decoding import decode_json_object
from .._events import RecordedEvent
from .._snapshots import Snapshot
from .._validation import encode_json_object
from ._bridge import Record
from ._personal import PersonalData
from ._pool import Pool
from ._reads import EVENT_COLUMNS, recorded_row


@final
class SnapshotTable:
    """The snapshot statements of one schema, run on the store's pool.

    The snapshot of a stream holding personal events is kept sealed under the keys of its
    subjects (`PersonalData.seal_snapshot`), and reads as none once one is forgotten.
    """

    def __init__(self, pool: Pool, schema: str, read_stream: str, personal: PersonalData) -> None:
        self._pool = pool
        self._personal = personal
        self._read_stream = read_stream
        table = f'"{schema}".snapshots'
        events = f'"{schema}".events'
        self._read = (
            "SELECT state_version, stream_version, data::text AS data, taken_at, event_id, "
            f"event_recorded_at FROM {table} WHERE stream_id = $1 AND state = $2"
        )
        # A snapshot only moves forward at one state version; a new state version replaces
        # the old one (during a rolling deploy two versions may take turns, which only costs
        # folds). A kept snapshot its stream no longer proves is replaced by any: one without
        # its event (taken before migration 4 recorded it), or one whose event, id and
        # recorded_at, is no longer the stream's event at its version (a restore rewrote the
        # stream; the check is one lookup in events_stream_version_key, made only on a
        # conflict).
        self._write = (
            f"INSERT INTO {table} AS t "
            "(stream_id, state, state_version, stream_version, data, event_id, "
            "event_recorded_at) "
            "VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7) "
            "ON CONFLICT (stream_id, state) DO UPDATE SET "
            "state_version = excluded.state_version, stream_version = excluded.stream_version, "
            "data = excluded.data, event_id = excluded.event_id, "
            "event_recorded_at = excluded.event_recorded_at, taken_at = now() "
            "WHERE t.state_version <> excluded.state_version "
            "OR t.stream_version < excluded.stream_version "
            "OR t.event_id IS NULL OR t.event_recorded_at IS NULL "
            f"OR NOT EXISTS (SELECT FROM {events} AS e WHERE e.stream_id = t.stream_id "
            "AND e.stream_version = t.stream_version AND e.event_id = t.event_id "
            "AND e.recorded_at = t.event_recorded_at)"
        )
        # The snapshot (as a row flagged first) and the events from its version on, in one
        # round trip: a cold command's whole read. The event at the snapshot's version comes
        # first: the caller compares its id and recorded_at with the snapshot's, which
        # proves that the snapshot folded this stream's history and not one a restore has
        # since replaced (its version alone proves only the stream's length). A snapshot
        # without its event is never trusted, so it reads as none: the whole stream follows.
        # The snapshot's event_recorded_at comes last, in a column of its own (NULL in the
        # events' rows, whose decoding reads only the columns before it).
        self._read_with_events = (
            f"WITH snap AS (SELECT state_version, stream_version, data, taken_at, event_id, "
            f"event_recorded_at FROM {table} WHERE stream_id = $1 AND state = $2 "
            "AND event_id IS NOT NULL AND event_recorded_at IS NOT NULL) "
            "SELECT * FROM ("
            "SELECT true AS is_snapshot, NULL::bigint AS tx, NULL::bigint AS position, "
            "$1::text AS stream_id, stream_version, event_id, "
            "state_version::text AS type, data, NULL::jsonb AS metadata, "
            "taken_at AS recorded_at, NULL::text[] AS tags, NULL::text AS subject, "
            "NULL::text AS personal, event_recorded_at FROM snap "
            f"UNION ALL SELECT false, {EVENT_COLUMNS}, NULL::timestamptz FROM {events} "
            "WHERE stream_id = $1 "
            "AND stream_version >= coalesce((SELECT stream_version FROM snap), 1)"
            ") AS r ORDER BY is_snapshot DESC, stream_version"
        )
        self._delete_one = f"DELETE FROM {table} WHERE stream_id = $1"
        self._delete_all = f"DELETE FROM {table}"

    async def read(self, stream_id: str, state: str) -> Snapshot | None:
        """The kept snapshot, or None (also when its data no longer parses)."""
        row = await self._pool.fetchrow(self._read, stream_id, state)
        if row is None:
            return None
        data = decode_json_object(row["data"])
        if data is not None:
            data = await self._personal.open_snapshot(stream_id, data)
        if data is None:
            return None
        return _snapshot(
            stream_id, state, row, data, state_version="state_version", taken_at="taken_at"
        )

    async def read_with_events(
        self, stream_id: str, state: str
    ) -> tuple[Snapshot | None, list[RecordedEvent]]:
        """The kept snapshot and the events from its version on (all, without one).

        A snapshot without its event (id and recorded_at) reads as none. Whether the first
        event is the one the snapshot ends at is for the caller (the state commands) to
        check.
        """
        rows = await self._pool.fetch(self._read_with_events, stream_id, state)
        # Each row starts with is_snapshot; events follow the snapshot's row.
        events: list[Any] = [tuple(row)[1:] for row in rows if not row["is_snapshot"]]
        snapshot = None
        if rows and rows[0]["is_snapshot"]:
            head = rows[0]
            data = decode_json_object(head["data"])
            if data is not None:
                data = await self._personal.open_snapshot(stream_id, data)
            if data is None:
                # Not a snapshot this library wrote (edited by hand?), or sealed under the
                # key of a forgotten subject: the whole stream.
                events = await self._pool.fetch(self._read_stream, stream_id, 0)
            else:
                # The snapshot's row carries its fields in the events' columns.
                snapshot = _snapshot(
                    stream_id, state, head, data, state_version="type", taken_at="recorded_at"
                )
        keys = await self._personal.keys_for(events)
        return snapshot, [recorded_row(row, keys) for row in events]

    async def write(self, snapshot: Snapshot) -> None:
        """Keep *snapshot* unless a newer one of the same state version is kept (and still
        proven by its stream)."""
        text = encode_json_object("snapshot", snapshot.data)
        kept = await self._personal.seal_snapshot(snapshot.stream_id, text)
        if kept is None:
            # A stream with a forgotten subject's events gets no snapshot again: a state
            # folded before the forget may hold its personal data.
            return
        await self._pool.execute(
            self._write,
            snapshot.stream_id,
            snapshot.state,
            snapshot.state_version,
            snapshot.stream_version,
            kept,
            snapshot.event_id,
            snapshot.event_recorded_at,
        )

    async def delete(self, stream_id: str | None) -> int:
        """Delete one stream's snapshots, or all; the number deleted."""
        if stream_id is None:
            status = await self._pool.execute(self._delete_all)
        else:
            status = await self._pool.execute(self._delete_one, stream_id)
        return int(status.rsplit(" ", 1)[-1])


def _snapshot(
    stream_id: str,
    state: str,
    row: Record,
    data: dict[str, Any],
    *,
    state_version: str,
    taken_at: str,
) -> Snapshot:
    # A snapshot from its row, whose state version and time come in the named columns.
    return Snapshot(
        stream_id,
        state,
        int(row[state_version]),
        int(row["stream_version"]),
        data,
        row[taken_at],
        event_id=row["event_id"],
        event_recorded_at=row["event_recorded_at"],
    )
