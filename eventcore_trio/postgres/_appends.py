"""Appends: one statement per append, whatever the number of streams and events.

Everything is validated and encoded before any I/O; the statement calls the schema's
``append_events`` function (see `_schema`), which locks the streams in one order, checks every
expected version and inserts the events, or raises and writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, final

from .._events import AppendResult, StreamAppend, prepare_appends
from .._positions import Position
from .._validation import encode_json_object
from ._bridge import Record


@final
class AppendStatement:
    """Builds the one statement of an append: ``sql, args = statement(appends)``."""

    def __init__(self, schema: str) -> None:
        self._sql = f'SELECT * FROM "{schema}".append_events($1, $2, $3, $4, $5, $6, $7, $8, $9)'

    def __call__(self, appends: Sequence[StreamAppend]) -> tuple[str, list[Any]]:
        """The SQL and arguments for *appends*, validated and encoded.

        Raises:
            InvalidArgument: a malformed request (`EventEncodeError` for bad payloads).
        """
        # Streams in one global order: the append function locks them in this order, which
        # is what keeps concurrent multi-stream appends from deadlocking.
        requests = sorted(prepare_appends(appends), key=lambda a: a.stream_id)
        streams: list[str] = []
        expected: list[int | None] = []
        counts: list[int] = []
        event_stream: list[int] = []
        offsets: list[int] = []
        event_ids: list[object] = []
        types: list[str] = []
        data: list[str] = []
        metadata: list[str] = []
        for index, request in enumerate(requests, start=1):
            streams.append(request.stream_id)
            expected.append(request.expected_version)
            counts.append(len(request.events))
            for offset, event in enumerate(request.events, start=1):
                event_stream.append(index)
                offsets.append(offset)
                event_ids.append(event.event_id)
                types.append(event.type)
                data.append(encode_json_object("data", event.data))
                metadata.append(encode_json_object("metadata", event.metadata))
        # NULL instead of arrays that say nothing (see the append function): fewer bytes to
        # encode, send and unnest for the common single-stream, id-less, metadata-less append.
        single = len(streams) == 1
        args = [
            streams,
            expected,
            counts,
            None if single else event_stream,
            None if single else offsets,
            event_ids if any(i is not None for i in event_ids) else None,
            types,
            data,
            None if all(m == "{}" for m in metadata) else metadata,
        ]
        return self._sql, args


def append_result(row: Record | None, args: Sequence[Any]) -> AppendResult:
    """The `AppendResult` of the append statement that returned *row* for *args*."""
    assert row is not None
    position = None if row["last_tx"] is None else Position(row["last_tx"], row["last_position"])
    streams, counts = args[0], args[2]
    # The function returns each stream's version before the append; add what was appended.
    versions = {
        stream: base + count
        for stream, base, count in zip(streams, row["versions"], counts, strict=True)
    }
    return AppendResult(position, versions)
