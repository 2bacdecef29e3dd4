"""Turning stored events back into values, and the read arguments: the same for every backend.

A backend stores data and metadata as JSON text (PostgreSQL hands ``jsonb`` back as text; the
memory store keeps the text it validated at append). Reading turns each stored event into a
`RecordedEvent`, or an `UndecodableEvent` when its JSON is not an object, so a projector's
``on_error`` decides and nothing is dropped.

An event with personal fields is stored sealed (see `_personal._envelope`); the backend
looks up its subject's data key and passes it in, and the event opens the fields with it
when its data is first read, or, when the key is gone (the subject was forgotten), comes
without them, naming them in `RecordedEvent.forgotten`. An event without its envelope is
undecodable; one whose envelope does not open raises `EventDecodeError` when its data is
read.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any, Final

import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .._errors import EventDecodeError, InvalidArgument
from .._events import RecordedEvent, UndecodableEvent, trusted_recorded_event
from .._filters import EventFilter
from .._json import may_hold_long_integer
from .._personal._envelope import read_fields
from .._positions import Position
from .._validation import check_limit

_json_loads: Final = json.loads
_orjson_loads: Final = orjson.loads


def _decode_object(text: str) -> Any:
    # Most metadata (and much data) is the empty object: skip the JSON parser for it.
    if text == "{}":
        return {}
    # orjson parses about seven times faster. What it refuses (numbers beyond a float's range,
    # escaped lone surrogates) or would read inexactly (integers beyond 64 bits) and jsonb can
    # hold goes to the standard parser, whose verdict stands.
    if not may_hold_long_integer(text):
        try:
            return _orjson_loads(text)
        except ValueError:
            pass
    try:
        return _json_loads(text)
    except RecursionError:
        # jsonb holds JSON nested deeper than orjson (1,024 levels) or Python's recursion
        # limit allows, when another tool wrote it: undecodable, like any other bad text, so
        # that on_error decides instead of every read crashing.
        raise ValueError(
            "JSON nested too deeply to decode (more levels than the parser's recursion "
            "limit allows)"
        ) from None


def decode_json_object(text: str) -> dict[str, Any] | None:
    """Stored JSON text as a dict, or None when it is not a JSON object."""
    try:
        value = _decode_object(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def decode_stored(
    position: Position,
    stream_id: str,
    stream_version: int,
    event_id: uuid.UUID,
    event_type: str,
    raw_data: str,
    raw_metadata: str,
    recorded_at: dt.datetime,
    *,
    known_error: str | None = None,
    tags: tuple[str, ...] = (),
    subject: str | None = None,
    personal: tuple[str, ...] = (),
    data_key: AESGCM | None = None,
    keep_sealed: bool = False,
) -> RecordedEvent | UndecodableEvent:
    """A stored event as a `RecordedEvent`, or an `UndecodableEvent` saying why it is not one.

    Runs once per event read, so it takes plain positional values (no row object) and skips
    the JSON parser for ``{}``. *known_error* marks an event already found undecodable (a dead
    letter keeps the reason).

    An event with *personal* fields (of *subject*) opens them with *data_key*, the
    subject's key, when its data is first read, or comes without them when it is None (the
    subject was forgotten); with *keep_sealed* they stay sealed (what a dead letter keeps).
    """
    error = known_error
    if error is None:
        try:
            data = _decode_object(raw_data)
            # Inline, the common empty metadata: one call fewer per event.
            metadata = {} if raw_metadata == "{}" else _decode_object(raw_metadata)
            if type(data) is not dict or type(metadata) is not dict:
                raise ValueError("data and metadata must be JSON objects")
            forgotten: tuple[str, ...] = ()
            key = None
            if personal:
                # Also for a dead letter (kept sealed): it would list the envelope as values.
                if subject is None:
                    raise ValueError("personal fields are stored without a subject")
                if not keep_sealed:
                    forgotten = read_fields(data, personal, data_key)
                    key = data_key  # None when forgotten: the data is complete as it is
        except ValueError as exc:
            error = str(exc)
        else:
            return trusted_recorded_event(
                event_id,
                stream_id,
                stream_version,
                position,
                event_type,
                data,
                metadata,
                recorded_at,
                tags,
                subject,
                personal,
                forgotten,
                key,
            )
    return UndecodableEvent(
        event_id=event_id,
        stream_id=stream_id,
        stream_version=stream_version,
        position=position,
        type=event_type,
        raw_data=raw_data,
        raw_metadata=raw_metadata,
        recorded_at=recorded_at,
        error=error,
    )


def require_decoded(event: RecordedEvent | UndecodableEvent) -> RecordedEvent:
    """*event*, or `EventDecodeError` when it could not be decoded.

    Raises:
        EventDecodeError: *event* is undecodable; the message says how to read it anyway.
    """
    if isinstance(event, UndecodableEvent):
        raise EventDecodeError(
            f"event at {event.position} cannot be decoded: {event.error}; read it with "
            "undecodable='include' to handle it",
            position=event.position,
        )
    return event


def check_read_arguments(after: object, limit: object, filter: object, undecodable: object) -> None:
    """Validate `EventReader.read_events` arguments before any I/O.

    Raises:
        InvalidArgument: an argument has the wrong type or value.
    """
    if after is not None and not isinstance(after, Position):
        raise InvalidArgument(f"after must be a Position or None, got {type(after).__name__}")
    check_limit(limit)
    if filter is not None and not isinstance(filter, EventFilter):
        raise InvalidArgument(f"filter must be an EventFilter, got {type(filter).__name__}")
    if undecodable not in ("raise", "include"):
        raise InvalidArgument(f"undecodable must be 'raise' or 'include', got {undecodable!r}")
