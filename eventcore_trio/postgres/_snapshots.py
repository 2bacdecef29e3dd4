"""The ``snapshots`` table: reading, writing (never backwards) and deleting snapshots."""

from __future__ import annotations

from typing import final

from .._decoding import decode_json_object
from .._snapshots import Snapshot
from .._validation import encode_json_object
from ._pool import Pool


@final
class SnapshotTable:
    """The snapshot statements of one schema, run on the store's pool."""

    def __init__(self, pool: Pool, schema: str) -> None:
        self._pool = pool
        table = f'"{schema}".snapshots'
        self._read = (
            "SELECT state_version, stream_version, data::text AS data, taken_at "
            f"FROM {table} WHERE stream_id = $1 AND state = $2"
        )
        # A snapshot only moves forward at one state version; a new state version replaces
        # the old one (during a rolling deploy two versions may take turns, which only costs
        # folds).
        self._write = (
            f"INSERT INTO {table} AS t "
            "(stream_id, state, state_version, stream_version, data) "
            "VALUES ($1, $2, $3, $4, $5::jsonb) "
            "ON CONFLICT (stream_id, state) DO UPDATE SET "
            "state_version = excluded.state_version, stream_version = excluded.stream_version, "
            "data = excluded.data, taken_at = now() "
            "WHERE t.state_version <> excluded.state_version "
            "OR t.stream_version < excluded.stream_version"
        )
        self._delete_one = f"DELETE FROM {table} WHERE stream_id = $1"
        self._delete_all = f"DELETE FROM {table}"

    async def read(self, stream_id: str, state: str) -> Snapshot | None:
        """The kept snapshot, or None (also when its data no longer parses)."""
        row = await self._pool.fetchrow(self._read, stream_id, state)
        if row is None:
            return None
        data = decode_json_object(row["data"])
        if data is None:
            return None
        return Snapshot(
            stream_id,
            state,
            int(row["state_version"]),
            int(row["stream_version"]),
            data,
            row["taken_at"],
        )

    async def write(self, snapshot: Snapshot) -> None:
        """Keep *snapshot* unless a newer one of the same state version is kept."""
        text = encode_json_object("snapshot", snapshot.data)
        await self._pool.execute(
            self._write,
            snapshot.stream_id,
            snapshot.state,
            snapshot.state_version,
            snapshot.stream_version,
            text,
        )

    async def delete(self, stream_id: str | None) -> int:
        """Delete one stream's snapshots, or all; the number deleted."""
        if stream_id is None:
            status = await self._pool.execute(self._delete_all)
        else:
            status = await self._pool.execute(self._delete_one, stream_id)
        return int(status.rsplit(" ", 1)[-1])
