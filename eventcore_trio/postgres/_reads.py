"""The read path: the SQL that reads events, gap-free, and the decoding of its rows.

Gap-free visibility: readers see only rows of transactions below the snapshot's xmin, all of
which have ended. A transaction that drew its position early but commits late has a ``tx`` at
or above today's xmin, so it is read later, never skipped. See docs/postgres.md ("Gap-free
reads"). Filters are WHERE clauses, so they apply before the LIMIT.
"""

from __future__ import annotations

from typing import Any, Final, final

from .._decoding import decode_stored, require_decoded
from .._events import RecordedEvent, UndecodableEvent
from .._filters import EventFilter
from .._positions import Position, position_parts, trusted_position

EVENT_COLUMNS: Final = (
    "tx, position, stream_id, stream_version, event_id, type, data, metadata, recorded_at"
)

#: Rows of transactions that have all ended: the gap-free visibility rule.
VISIBLE: Final = "tx < pg_snapshot_xmin(pg_current_snapshot())::text::bigint"


def _next_prefix(prefix: str) -> str | None:
    # The smallest string greater than every string that starts with prefix, in code-point
    # order (the "C" collation of stream_id): lets a prefix filter be an index range scan.
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            return "".join(chars) + chr(last + 1)
    return None


def filter_clauses(event_filter: EventFilter | None, args: list[object]) -> list[str]:
    """WHERE clauses for *event_filter*; its parameters are appended to *args*."""
    clauses: list[str] = []
    if event_filter is None:
        return clauses
    if event_filter.event_types is not None:
        args.append(sorted(event_filter.event_types))
        clauses.append(f"type = ANY(${len(args)}::text[])")
    if event_filter.stream_prefix is not None:
        args.append(event_filter.stream_prefix)
        clauses.append(f"stream_id >= ${len(args)}")
        upper = _next_prefix(event_filter.stream_prefix)
        if upper is not None:
            args.append(upper)
            clauses.append(f"stream_id < ${len(args)}")
    if event_filter.stream_regex is not None:
        args.append(event_filter.stream_regex)
        clauses.append(f"stream_id ~ ${len(args)}")
    if event_filter.partition is not None:
        # The stored hash (see _partitions); the count is written into the SQL, so that the
        # expression matches that of the count's index (`partition_index`).
        args.append(event_filter.partition.index)
        clauses.append(
            f"{partition_expression(event_filter.partition.count)} = ${len(args)}::bigint"
        )
    return clauses


def partition_expression(count: int) -> str:
    """Which of *count* partitions an events row is in, as SQL (*count* is a checked int)."""
    return f"(stream_hash % {int(count)})"


def partition_index(schema: str, count: int) -> tuple[str, str]:
    """The name of the index that serves reads of one of *count* partitions, and the
    statement that builds it without blocking appends."""
    name = f"events_partition_{int(count)}_idx"
    return name, (
        f'CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON "{schema}".events '
        f"({partition_expression(count)}, tx, position)"
    )


def decode_row(row: Any) -> RecordedEvent | UndecodableEvent:
    """An events row (columns in `EVENT_COLUMNS` order) as an event value."""
    # By index (an asyncpg Record is also a sequence): this runs once per event read.
    tx, seq, stream_id, stream_version, event_id, event_type, raw_data, raw_metadata, at = row
    return decode_stored(
        trusted_position(tx, seq),
        stream_id,
        stream_version,
        event_id,
        event_type,
        raw_data,
        raw_metadata,
        at,
    )


def recorded_row(row: Any) -> RecordedEvent:
    """An events row as a `RecordedEvent`, or `EventDecodeError`."""
    return require_decoded(decode_row(row))


@final
class ReadQueries:
    """The read statements of one schema."""

    def __init__(self, schema: str) -> None:
        self._events = f'"{schema}".events'
        self.read_stream = (
            f"SELECT {EVENT_COLUMNS} FROM {self._events} "
            "WHERE stream_id = $1 AND stream_version > $2 ORDER BY stream_version"
        )

    def read_events(
        self, after: Position | None, limit: int, event_filter: EventFilter | None
    ) -> tuple[str, list[object]]:
        """One statement for a page, walked along the ``(tx, position)`` primary key."""
        tx, seq = (0, 0) if after is None else position_parts(after)
        args: list[object] = [tx, seq, limit]
        clauses = ["(tx, position) > ($1, $2)", VISIBLE, *filter_clauses(event_filter, args)]
        return (
            f"SELECT {EVENT_COLUMNS} FROM {self._events} "
            f"WHERE {' AND '.join(clauses)} ORDER BY tx, position LIMIT $3",
            args,
        )

    def last_position(self, event_filter: EventFilter | None) -> tuple[str, list[object]]:
        """The last visible event matching *event_filter*: ``tx, position`` or no row."""
        args: list[object] = []
        clauses = [VISIBLE, *filter_clauses(event_filter, args)]
        return (
            f"SELECT tx, position FROM {self._events} WHERE {' AND '.join(clauses)} "
            "ORDER BY tx DESC, position DESC LIMIT 1",
            args,
        )

    def lag(
        self, checkpoint: Position | None, event_filter: EventFilter | None
    ) -> tuple[str, list[object]]:
        """How many visible matching events follow *checkpoint*, and the oldest's time."""
        tx, seq = (0, 0) if checkpoint is None else position_parts(checkpoint)
        args: list[object] = [tx, seq]
        clauses = ["(tx, position) > ($1, $2)", VISIBLE, *filter_clauses(event_filter, args)]
        return (
            f"SELECT count(*) AS n, min(recorded_at) AS oldest FROM {self._events} "
            f"WHERE {' AND '.join(clauses)}",
            args,
        )
