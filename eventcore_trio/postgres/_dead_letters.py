"""The ``dead_letters`` table: the events a projection skipped, kept until replayed.

A batch records a letter in its own transaction (`DeadLetterTable.insert`) and deletes a
replayed one only while its session holds the unit's lock (`DeadLetterTable.delete`, the
fence of `_batch`); the store lists them back (`DeadLetterTable.read`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Final, final

from .._backend._decoding import decode_stored
from .._events import RecordedEvent, UndecodableEvent
from .._partitions import Unit
from .._personal._envelope import without_personal
from .._personal._forget import REDACTED_ERROR
from .._positions import Position, position_parts
from .._status import DeadLetter
from ._bridge import Record
from ._fence import HOLDS_LOCK
from ._pool import Pool

_NAME: Final = "subscription_name"


def to_dead_letter(row: Record) -> DeadLetter:
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
        tags=tuple(row["tags"]),
        subject=row["subject"],
        personal=tuple(row["personal"]),
        # Opened by the store (PersonalData.open_letters), which looks up the keys.
        keep_sealed=True,
    )
    unit = Unit.parse(row[_NAME])
    return DeadLetter(
        id=row["id"],
        projection=unit.projection,
        partition=None if unit.partition is None else unit.partition.index,
        event=event,
        error_type=row["error_type"],
        error_message=row["error_message"],
        retries=row["retries"],
        recorded_at=row["recorded_at"],
    )


def dead_letter_arguments(
    name: str, event: RecordedEvent | UndecodableEvent, error: BaseException, retries: int
) -> list[object]:
    """The arguments of `DeadLetterTable.insert` for *event*."""
    tx, seq = position_parts(event.position)
    tags: tuple[str, ...] = ()
    subject: str | None = None
    personal: tuple[str, ...] = ()
    if isinstance(event, RecordedEvent):
        subject, personal = event.subject, event.personal
        # Never the opened values: the statement copies the sealed ones from the events
        # row (see DeadLetterTable.insert).
        plain = without_personal(event)
        data, metadata, decode_error = json.dumps(plain), json.dumps(event.metadata), None
        tags = event.tags
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
        list(tags),
        subject,
        list(personal),
        REDACTED_ERROR,
    ]


@final
class DeadLetterTable:
    """The statements of one schema's ``dead_letters`` table, and its letters read back."""

    def __init__(self, pool: Pool, schema: str) -> None:
        self._pool = pool
        self.table = f'"{schema}".dead_letters'
        # An event with personal fields keeps them as the events row holds them, sealed
        # (its data as sent lacks them: it never holds a plain personal value). Its error
        # text (a handler's, which may quote a value) is replaced by $18 when the subject is
        # forgotten: a forget replaces the texts of the letters it finds, and the lock on
        # the subject's key row orders this insert with it (a forget under way commits
        # first and is seen; a later one waits for this transaction, then finds the letter).
        self.insert = (
            f"INSERT INTO {self.table} ({_NAME}, tx, position, event_id, stream_id, "
            "stream_version, type, data, metadata, decode_error, event_recorded_at, "
            "error_type, error_message, retries, tags, subject, personal) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, "
            "CASE WHEN cardinality($17::text[]) = 0 THEN $8 ELSE coalesce("
            f'(SELECT e.data::text FROM "{schema}".events AS e '
            "WHERE e.tx = $2 AND e.position = $3 AND e.event_id = $4), $8) END, "
            "$9, $10, $11, $12, "
            "CASE WHEN cardinality($17::text[]) > 0 AND coalesce("
            f'(SELECT k.wrapped_key IS NULL FROM "{schema}".subject_keys AS k '
            "WHERE k.subject = $16 FOR SHARE), false) THEN $18 ELSE $13 END, "
            "$14, $15, $16, $17)"
        )
        # Resolving a replayed dead letter: $1 id, $2 unit, $3 the lock session's backend
        # pid, $4 its lock key. Deletes the letter only if it is the unit's and only while
        # this session holds the unit's lock (the fence of _batch), and says which failed:
        # the replay's batch must not commit a letter it did not delete.
        fence = HOLDS_LOCK.format(pid="$3::int", key="$4::bigint")
        self.delete = (
            f"WITH deleted AS (DELETE FROM {self.table} "
            f"WHERE id = $1 AND {_NAME} = $2 AND {fence} RETURNING 1) "
            f"SELECT (SELECT count(*) FROM deleted) AS deleted, pg_backend_pid() AS pid, "
            f"{fence} AS held"
        )

    async def read(self, units: Sequence[str]) -> list[DeadLetter]:
        """The dead letters of the units *units*, in position order."""
        rows = await self._pool.fetch(
            f"SELECT * FROM {self.table} WHERE {_NAME} = ANY($1::text[]) ORDER BY tx, position",
            list(units),
        )
        return [to_dead_letter(row) for row in rows]
