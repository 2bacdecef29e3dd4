"""Appends: one statement per append, whatever the number of streams and events.

Everything is validated and encoded before any I/O (`encode_append`); the statement calls
the schema's ``append_events`` function (see `_schema`), which locks the streams in one
order, checks every expected version and inserts the events, or raises and writes nothing.
Concurrent appends may instead share one ``append_many`` statement (see `_group_commit`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any, Final, final

import attrs

from .._errors import VersionConflict
from .._events import AppendResult, StreamAppend, prepare_appends
from .._positions import Position
from .._validation import encode_json_object
from ._bridge import Record


@final
@attrs.frozen
class EncodedAppend:
    """One `append_atomic` request, validated and encoded: streams in lock order, and per
    event its stream's 1-based index and its 1-based offset in that stream's part."""

    streams: list[str]
    expected: list[int | None]
    counts: list[int]
    event_stream: list[int]
    offsets: list[int]
    event_ids: list[uuid.UUID | None]
    types: list[str]
    data: list[str]
    metadata: list[str]


def encode_append(appends: Sequence[StreamAppend]) -> EncodedAppend:
    """*appends* validated and encoded, ready for either statement.

    Raises:
        InvalidArgument: a malformed request (`EventEncodeError` for bad payloads).
    """
    # Streams in one global order: the append functions lock them in this order, which is
    # what keeps concurrent multi-stream appends from deadlocking.
    requests = sorted(prepare_appends(appends), key=lambda a: a.stream_id)
    encoded = EncodedAppend([], [], [], [], [], [], [], [], [])
    for index, request in enumerate(requests, start=1):
        encoded.streams.append(request.stream_id)
        encoded.expected.append(request.expected_version)
        encoded.counts.append(len(request.events))
        for offset, event in enumerate(request.events, start=1):
            encoded.event_stream.append(index)
            encoded.offsets.append(offset)
            encoded.event_ids.append(event.event_id)
            encoded.types.append(event.type)
            encoded.data.append(encode_json_object("data", event.data))
            encoded.metadata.append(encode_json_object("metadata", event.metadata))
    return encoded


def _or_null_ids(ids: list[uuid.UUID | None]) -> list[uuid.UUID | None] | None:
    return ids if any(i is not None for i in ids) else None


def _or_null_metadata(metadata: list[str]) -> list[str] | None:
    return None if all(m == "{}" for m in metadata) else metadata


@final
class AppendStatement:
    """Builds the statements of appends: ``sql, args = statement.single(encoded)`` for one
    request, ``statement.many(requests)`` for several independent ones."""

    def __init__(self, schema: str) -> None:
        self._single_sql = (
            f'SELECT * FROM "{schema}".append_events($1, $2, $3, $4, $5, $6, $7, $8, $9)'
        )
        self._many_sql = (
            f'SELECT * FROM "{schema}".append_many($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)'
        )

    def __call__(self, appends: Sequence[StreamAppend]) -> tuple[str, list[Any]]:
        """The SQL and arguments for *appends*, validated and encoded.

        Raises:
            InvalidArgument: a malformed request (`EventEncodeError` for bad payloads).
        """
        return self.single(encode_append(appends))

    def single(self, encoded: EncodedAppend) -> tuple[str, list[Any]]:
        """The ``append_events`` statement for one request."""
        # NULL instead of arrays that say nothing (see the append function): fewer bytes to
        # encode, send and unnest for the common single-stream, id-less, metadata-less append.
        one_stream = len(encoded.streams) == 1
        args = [
            encoded.streams,
            encoded.expected,
            encoded.counts,
            None if one_stream else encoded.event_stream,
            None if one_stream else encoded.offsets,
            _or_null_ids(encoded.event_ids),
            encoded.types,
            encoded.data,
            _or_null_metadata(encoded.metadata),
        ]
        return self._single_sql, args

    def many(self, requests: Sequence[EncodedAppend]) -> tuple[str, list[Any]]:
        """The ``append_many`` statement for several independent requests, in order."""
        request: list[int] = []
        streams: list[str] = []
        expected: list[int | None] = []
        counts: list[int] = []
        event_stream: list[int] = []
        offsets: list[int] = []
        event_ids: list[uuid.UUID | None] = []
        types: list[str] = []
        data: list[str] = []
        metadata: list[str] = []
        for number, encoded in enumerate(requests, start=1):
            entries_before = len(streams)
            request.extend([number] * len(encoded.streams))
            streams.extend(encoded.streams)
            expected.extend(encoded.expected)
            counts.extend(encoded.counts)
            event_stream.extend(entries_before + index for index in encoded.event_stream)
            offsets.extend(encoded.offsets)
            event_ids.extend(encoded.event_ids)
            types.extend(encoded.types)
            data.extend(encoded.data)
            metadata.extend(encoded.metadata)
        args = [
            request,
            streams,
            expected,
            counts,
            event_stream,
            offsets,
            _or_null_ids(event_ids),
            types,
            data,
            _or_null_metadata(metadata),
        ]
        return self._many_sql, args


def append_result(row: Record | None, args: Sequence[Any]) -> AppendResult:
    """The `AppendResult` of the append statement that returned *row* for *args*."""
    assert row is not None
    return _result(row, args[0], args[2])


def _result(row: Record, streams: Sequence[str], counts: Sequence[int]) -> AppendResult:
    position = None if row["last_tx"] is None else Position(row["last_tx"], row["last_position"])
    # The functions return each stream's version before the append; add what was appended.
    versions = {
        stream: base + count
        for stream, base, count in zip(streams, row["versions"], counts, strict=True)
    }
    return AppendResult(position, versions)


@final
class Busy:
    """The outcome of a shared request that names a stream whose lock another transaction
    held: nothing of it was written; its caller sends it again on its own."""


BUSY: Final = Busy()


def many_results(
    rows: Sequence[Record], requests: Sequence[EncodedAppend]
) -> list[AppendResult | VersionConflict | Busy]:
    """Each request's outcome from the rows of an ``append_many`` statement: its result, the
    conflict that kept it from being written, or `BUSY`."""
    assert [row["request"] for row in rows] == list(range(1, len(requests) + 1))
    outcomes: list[AppendResult | VersionConflict | Busy] = []
    for row, encoded in zip(rows, requests, strict=True):
        if row["busy"]:
            outcomes.append(BUSY)
        elif row["conflict"] is not None:
            detail = json.loads(row["conflict"])
            outcomes.append(
                VersionConflict(detail["stream_id"], detail["expected"], detail["actual"])
            )
        else:
            outcomes.append(_result(row, encoded.streams, encoded.counts))
    return outcomes
