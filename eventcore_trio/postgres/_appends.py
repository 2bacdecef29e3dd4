"""Appends: one statement per append, whatever the number of streams and events.

Everything is validated and encoded before any I/O (`encode_append`); the statement calls
the schema's ``append_events`` function (see `_schema`), which locks the streams in one
order, checks every expected version and inserts the events, or raises and writes nothing.
Concurrent appends may instead share one ``append_many`` statement (see `_group_commit`).

An append's encoded size is bounded (``max_append_bytes``, `DEFAULT_MAX_APPEND_BYTES`),
checked while encoding: PostgreSQL refuses a protocol message over 1 GB by closing the
session, which reads as "server unavailable" and leaves the outcome in doubt, and the client
holds several copies of the payload on the way there (asyncpg's buffers, the encoded text).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from itertools import chain, repeat
from operator import attrgetter, is_not
from typing import Any, Final, final

import attrs

from .._errors import AppendTooLarge, VersionConflict
from .._events import NO_METADATA, AppendResult, StreamAppend, prepare_appends
from .._personal._envelope import sealed_data
from .._positions import Position
from .._validation import encode_json_object
from ._bridge import Record

#: The default of ``open_postgres_store(max_append_bytes=...)``: 64 MiB. Any one event the
#: per-event limit allows fits (data and metadata at `MAX_EVENT_JSON_BYTES` each, 32 MiB), and
#: so do three events of the largest data or hundreds of thousands of small ones. It is a
#: sixteenth of PostgreSQL's 1 GB message limit, so a statement stays far from it whatever
#: the per-event overhead (ids, versions, array headers), and the client's peak stays at a few
#: hundred MB (the payload is copied three or four times on its way to the socket). A
#: statement this size also holds its streams' locks for the second or so it takes to send.
DEFAULT_MAX_APPEND_BYTES: Final = 64 * 1024 * 1024

#: What joins an event's tags into the one text the append functions take per event.
TAG_SEPARATOR: Final = "\x1f"

#: The largest ``max_append_bytes`` accepted: half of PostgreSQL's 1 GB limit on one protocol
#: message, which must also hold each event's id, version and array overhead.
MAX_APPEND_BYTES_LIMIT: Final = 512 * 1024 * 1024


@final
@attrs.frozen
class EncodedAppend:
    """One `append_atomic` request, validated and encoded: streams in lock order, and per
    event its stream's 1-based index and its 1-based offset in that stream's part.

    *size* is what the limit counts: UTF-8 bytes of stream ids, type names, data and metadata.
    """

    streams: list[str]
    expected: list[int | None]
    counts: list[int]
    event_stream: list[int]
    offsets: list[int]
    event_ids: list[uuid.UUID | None]
    types: list[str]
    data: list[str]
    metadata: list[str]
    #: Each event's tags joined by U+001F (tags hold no control characters), "" for none.
    tags: list[str] = attrs.field(factory=list)
    size: int = 0
    #: Each event's subject (None: none), or None when no event has one; then each event's
    #: personal field names joined by U+001F.
    subjects: list[str | None] | None = None
    personal: list[str] | None = None


def _utf8_size(text: str) -> int:
    # isascii() is a flag check on CPython's compact strings: no second encoding for the
    # common case.
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def encode_append(
    appends: Sequence[StreamAppend], *, max_bytes: int = DEFAULT_MAX_APPEND_BYTES
) -> EncodedAppend:
    """*appends* validated and encoded, ready for either statement.

    Raises:
        InvalidArgument: a malformed request (`EventEncodeError` for bad payloads).
        AppendTooLarge: the encoded request is over *max_bytes*; encoding stops at the event
            that passes it, so an oversized append costs no more memory than the limit.
    """
    # Streams in one global order: the append functions lock them in this order, which is
    # what keeps concurrent multi-stream appends from deadlocking.
    requests = sorted(prepare_appends(appends), key=lambda a: a.stream_id)
    streams: list[str] = []
    expected: list[int | None] = []
    counts: list[int] = []
    event_stream: list[int] = []
    offsets: list[int] = []
    event_ids: list[uuid.UUID | None] = []
    types: list[str] = []
    data: list[str] = []
    metadata: list[str] = []
    tags: list[str] = []
    subjects: list[str | None] = []
    add_data, add_metadata = data.append, metadata.append
    size = 0
    for index, request in enumerate(requests, start=1):
        events = request.events
        streams.append(request.stream_id)
        expected.append(request.expected_version)
        counts.append(len(events))
        size += _utf8_size(request.stream_id)
        # Per event only what depends on its payload (this loop runs once per event); the
        # other arrays are whole-stream copies, made after the payloads pass.
        for event in events:
            # A personal field not sealed (a path that forgot to) is refused by sealed_data.
            encoded_data = encode_json_object(
                "data", sealed_data(event) if event.personal else event.data
            )
            event_metadata = event.metadata
            encoded_metadata = (
                "{}"
                if event_metadata is NO_METADATA
                else encode_json_object("metadata", event_metadata)
            )
            event_type = event.type
            size += (
                (len(encoded_data) if encoded_data.isascii() else _utf8_size(encoded_data))
                + (len(event_type) if event_type.isascii() else _utf8_size(event_type))
                + _utf8_size(encoded_metadata)
            )
            if size > max_bytes:
                raise AppendTooLarge(size, max_bytes)
            add_data(encoded_data)
            add_metadata(encoded_metadata)
        event_stream.extend([index] * len(events))
        offsets.extend(range(1, len(events) + 1))
        event_ids.extend([event.event_id for event in events])
        types.extend([event.type for event in events])
        tags.extend([TAG_SEPARATOR.join(event.tags) for event in events])
        subjects.extend([event.subject for event in events])
    if size > max_bytes:  # stream ids alone (streams without events)
        raise AppendTooLarge(size, max_bytes)
    return EncodedAppend(
        streams,
        expected,
        counts,
        event_stream,
        offsets,
        event_ids,
        types,
        data,
        metadata,
        tags,
        size,
        *_subjects(subjects, requests),
    )


def _subjects(
    subjects: list[str | None], requests: Sequence[StreamAppend]
) -> tuple[list[str | None] | None, list[str] | None]:
    # The two arrays of check_subjects (migration 9), NULL when no event has a subject.
    if subjects.count(None) == len(subjects):
        return None, None
    personal = [
        TAG_SEPARATOR.join(event.personal) for request in requests for event in request.events
    ]
    return subjects, personal


def _or_null_ids(ids: list[uuid.UUID | None]) -> list[uuid.UUID | None] | None:
    # In C, stopping at the first id, instead of a generator step per event.
    return ids if any(map(is_not, ids, repeat(None))) else None


def _or_null_metadata(metadata: list[str]) -> list[str] | None:
    return None if metadata.count("{}") == len(metadata) else metadata


def or_null_tags(tags: list[str]) -> list[str] | None:
    """*tags* as the append functions take them: NULL when no event has any."""
    return tags if any(tags) else None


@final
class AppendStatement:
    """Builds the statements of appends: ``sql, args = statement.single(encoded)`` for one
    request, ``statement.many(requests)`` for several independent ones."""

    def __init__(self, schema: str, max_bytes: int = DEFAULT_MAX_APPEND_BYTES) -> None:
        #: The largest encoded append (``max_append_bytes``), and of a shared statement.
        self.max_bytes = max_bytes
        self._single_sql = (
            f'SELECT * FROM "{schema}".append_events('
            "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        )
        self._many_sql = (
            f'SELECT * FROM "{schema}".append_many($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)'
        )

    #: Seals the personal fields of appends (`_personal.PersonalData.seal_appends`), set by
    #: the store; every write path calls `seal` before `encode`.
    sealer: Callable[[Sequence[StreamAppend]], Awaitable[Sequence[StreamAppend]]] | None = None

    async def seal(self, appends: Sequence[StreamAppend]) -> Sequence[StreamAppend]:
        """*appends* with their personal fields sealed (as they are when none has any).

        Raises:
            ConfigurationError: personal fields and no key-encryption key.
            SubjectForgottenError: personal fields of a forgotten subject.
        """
        return appends if self.sealer is None else await self.sealer(appends)

    def __call__(self, appends: Sequence[StreamAppend]) -> tuple[str, list[Any]]:
        """The SQL and arguments for *appends*, validated and encoded.

        Raises:
            InvalidArgument: a malformed request (`EventEncodeError` for bad payloads,
                `AppendTooLarge` for one over the limit).
        """
        return self.single(self.encode(appends))

    def encode(self, appends: Sequence[StreamAppend]) -> EncodedAppend:
        """*appends* validated and encoded within this store's limit (see `encode_append`)."""
        return encode_append(appends, max_bytes=self.max_bytes)

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
            or_null_tags(encoded.tags),
            encoded.subjects,
            encoded.personal,
        ]
        return self._single_sql, args

    def many(self, requests: Sequence[EncodedAppend]) -> tuple[str, list[Any]]:
        """The ``append_many`` statement for several independent requests, in order."""
        # Each request's number for each of its streams, and its events' stream indexes
        # shifted past the streams of the requests before it; every other column is the
        # requests' columns one after the other.
        request: list[int] = []
        event_stream: list[int] = []
        for number, encoded in enumerate(requests, start=1):
            entries_before = len(request)
            request.extend([number] * len(encoded.streams))
            event_stream.extend(entries_before + index for index in encoded.event_stream)

        def joined(column: str) -> list[Any]:
            return list(chain.from_iterable(map(attrgetter(column), requests)))

        args = [
            request,
            joined("streams"),
            joined("expected"),
            joined("counts"),
            event_stream,
            joined("offsets"),
            _or_null_ids(joined("event_ids")),
            joined("types"),
            joined("data"),
            _or_null_metadata(joined("metadata")),
            or_null_tags(joined("tags")),
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
