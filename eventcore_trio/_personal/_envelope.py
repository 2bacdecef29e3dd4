"""The sealed form: personal field values and snapshots encrypted under subjects' data keys.

An event's personal fields are sealed together, in one envelope: the first personal field
(by name) holds a string ``"$sealed:1:"`` followed by the base64 of a fresh 12-byte nonce
and the AES-GCM ciphertext (with its tag) of a flag byte and the JSON object of every
personal field; each other personal field holds `SEALED_WITH_FIRST`. The associated data
binds the subject and the names of the personal fields, so an envelope opens only as the
personal fields of the subject it was sealed for: copied to another subject's event, or with
its field names altered, it fails authentication instead of decoding as someone else's
data. One envelope per event, not one per field: reading a personal event costs one
decryption and one parse whatever the number of fields (a catch-up opens every event it
reads).

Sealing happens in the process, before an event reaches any backend; a backend stores the
envelopes as ordinary JSON strings and never sees a personal value. What a backend gets from
`seal_event` carries the envelope and markers as `Sealed` strings, which `sealed_data`
insists on: a personal event that reaches a backend unsealed (a path that forgot to seal) is
refused instead of being stored in plain text.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs
import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .._errors import ConfigurationError, EventDecodeError
from .._events import (
    NewEvent,
    RecordedEvent,
    UndecodableEvent,
    install_sealed_opener,
    trusted_recorded_event,
    unopened,
)
from .._json import may_hold_long_integer
from .._validation import encode_json_object

#: The start of the envelope in an event's first personal field: the format, version 1.
ENVELOPE_PREFIX: Final = "$sealed:1:"
#: What every other personal field of the event holds: its value is in the envelope.
SEALED_WITH_FIRST: Final = "$sealed:1"
NONCE_BYTES: Final = 12
_TAG_BYTES: Final = 16
_PREFIX_LENGTH: Final = len(ENVELOPE_PREFIX)
_FIELD_CONTEXT: Final = b"eventcore-trio personal fields v1\x00"
_SNAPSHOT_CONTEXT: Final = b"eventcore-trio snapshot v1\x00"
#: The plaintext is the fields' JSON, led by a space when the standard parser must read it
#: (a run of digits long enough to be an integer beyond 64 bits, which orjson reads as a
#: float): decided once when sealing, inside the authenticated plaintext, so that opening,
#: which runs for every personal event read, need not search the text.
_EXACT_JSON: Final = b" "
#: A sealed snapshot's data: the sealed state, and the subjects whose keys seal it.
SNAPSHOT_SEALED: Final = "@sealed"
SNAPSHOT_SUBJECTS: Final = "@subjects"


class Sealed(str):
    """An envelope or marker made by `seal_event`: only these pass `sealed_data`. Not a
    plain ``str``, so no caller's value can pass for sealed by looking like an envelope."""

    __slots__ = ()


_MARKER: Final = Sealed(SEALED_WITH_FIRST)


@functools.lru_cache(maxsize=4096)
def _names_context(subject: str, personal: tuple[str, ...]) -> bytes:
    # Subjects and field names hold no NUL (refused as control characters): the separators
    # are unambiguous.
    return _FIELD_CONTEXT + "\x00".join((subject, *personal)).encode() + b"\x00"


def _fields_context(event_id: uuid.UUID, subject: str, personal: tuple[str, ...]) -> bytes:
    # The event's id last, fixed-size: an envelope opens only in the event it was sealed for.
    return _names_context(subject, personal) + event_id.bytes


def seal_fields(
    aead: AESGCM,
    event_id: uuid.UUID,
    subject: str,
    personal: tuple[str, ...],
    values: Mapping[str, Any],
) -> Sealed:
    """The envelope of *values*, the personal fields *personal* (sorted names) of the event
    *event_id* of *subject*, sealed under the subject's key *aead*.

    Raises:
        EventEncodeError: a value is not JSON (as for any event data).
    """
    text = encode_json_object("data", {field: values[field] for field in personal})
    plain = (_EXACT_JSON if may_hold_long_integer(text) else b"") + text.encode()
    nonce = os.urandom(NONCE_BYTES)
    sealed = aead.encrypt(nonce, plain, _fields_context(event_id, subject, personal))
    return Sealed(ENVELOPE_PREFIX + base64.b64encode(nonce + sealed).decode("ascii"))


def open_envelope(
    aead: AESGCM,
    event_id: uuid.UUID,
    subject: str,
    personal: tuple[str, ...],
    envelope: object,
) -> dict[str, Any]:
    """The personal fields sealed in *envelope*, by name.

    Raises:
        ValueError: it is no envelope, or it does not open under this key as these personal
            fields of this event of this subject (tampered with, moved, or sealed under
            another key).
    """
    first = personal[0]
    if not isinstance(envelope, str) or not envelope.startswith(ENVELOPE_PREFIX):
        raise ValueError(f"personal field {first!r} does not hold the event's sealed values")
    try:
        # The C function itself (b64decode's wrapper costs as much again).
        raw = binascii.a2b_base64(envelope[_PREFIX_LENGTH:], strict_mode=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"personal field {first!r} holds a malformed sealed value") from None
    if len(raw) <= NONCE_BYTES + _TAG_BYTES:
        raise ValueError(f"personal field {first!r} holds a truncated sealed value")
    try:
        plain = aead.decrypt(
            raw[:NONCE_BYTES], raw[NONCE_BYTES:], _fields_context(event_id, subject, personal)
        )
    except InvalidTag:
        raise ValueError(
            f"personal fields {list(personal)!r} do not open under subject {subject!r}'s key "
            "(altered, moved from another event, or sealed under another key)"
        ) from None
    opened = _parse(plain)
    if (
        type(opened) is not dict
        or len(opened) != len(personal)
        or not all(map(opened.__contains__, personal))
    ):
        raise ValueError(f"personal fields {list(personal)!r} opened to something else")
    return opened


def _parse(plain: bytes) -> Any:
    try:
        if plain[:1] != _EXACT_JSON:
            try:
                return orjson.loads(plain)
            except orjson.JSONDecodeError:
                pass  # what orjson refuses the standard parser reads, or refuses in turn
        return json.loads(plain)
    except RecursionError:
        # Nested deeper than the parser can follow from where data is first read (maybe
        # deep in a handler's stack): undecodable, as for any event.
        raise ValueError("personal fields nested too deeply to decode") from None


def seal_event(event: NewEvent, aead: AESGCM) -> NewEvent:
    """*event* with its personal fields sealed under its subject's key *aead*, and an id
    (its own, or a new one): the envelope is bound to it."""
    assert event.subject is not None  # NewEvent refuses personal fields without a subject
    personal = event.personal
    event_id = event.event_id or uuid.uuid4()
    data = dict(event.data)
    data[personal[0]] = seal_fields(aead, event_id, event.subject, personal, data)
    for field in personal[1:]:
        data[field] = _MARKER
    return attrs.evolve(event, data=data, event_id=event_id)


def sealed_data(event: NewEvent) -> Mapping[str, Any]:
    """The data a backend stores for *event*: as it is, with its envelope and markers.

    Raises:
        ConfigurationError: a personal field is not sealed: the event came to the backend
            on a path that does not seal (a store that does not keep personal data).
    """
    if not event.personal:
        return event.data
    data = dict(event.data)
    for field in event.personal:
        value = data[field]
        if type(value) is not Sealed:
            raise ConfigurationError(
                f"event {event.type!r} reached the store with personal field {field!r} not "
                "sealed; this store or path does not keep personal data (see "
                "docs/personal-data.md for the stores that do), and nothing was written"
            )
        data[field] = str(value)  # a plain str: the JSON encoders' fast path
    return data


def open_event(event: RecordedEvent, sealed: dict[str, Any], key: AESGCM) -> dict[str, Any]:
    """*event*'s data, read as *sealed* (its personal fields still sealed), with them opened
    under *key*, its subject's: what reading the data of an event read unopened runs
    (`_events.install_sealed_opener`). A new dict each time: threads may open the same
    event at once, and the sealed data is never changed.

    Opening waits for that read because a catch-up reads every event and most projections
    read no personal field: decrypting and parsing them would be most of what a personal
    event costs to read. Whether the envelope is there at all is checked when the event is
    read (`read_fields`), so only an envelope that does not open is found late.

    Raises:
        EventDecodeError: they do not open: the envelope was altered, moved from another
            event, or sealed under another key.
    """
    personal = event.personal
    assert event.subject is not None  # a read event with personal fields has a subject
    try:
        opened = open_envelope(key, event.event_id, event.subject, personal, sealed[personal[0]])
    except ValueError as exc:
        raise EventDecodeError(
            f"event at {event.position} cannot be decoded: {exc}", position=event.position
        ) from None
    # Every field from the envelope, whatever its marker says.
    return {**sealed, **opened}


install_sealed_opener(open_event)


def _drop(data: dict[str, Any], personal: tuple[str, ...]) -> tuple[str, ...]:
    # A forgotten subject's event: its personal fields left out, and named.
    for field in personal:
        data.pop(field, None)
    return personal


def read_fields(
    data: dict[str, Any], personal: tuple[str, ...], aead: AESGCM | None
) -> tuple[str, ...]:
    """What reading an event finds of its personal fields: the fields removed when its
    subject was forgotten (*aead* is None; removed from *data* in place), else () once the
    envelope is found where it belongs (it is opened when the data is first read:
    `open_event`).

    Raises:
        ValueError: there is no envelope where it belongs (the event is undecodable).
    """
    if aead is None:
        return _drop(data, personal)
    envelope = data.get(personal[0])
    if not isinstance(envelope, str) or not envelope.startswith(ENVELOPE_PREFIX):
        raise ValueError(f"personal field {personal[0]!r} does not hold the event's sealed values")
    return ()


def open_fields(
    data: dict[str, Any],
    event_id: uuid.UUID,
    subject: str,
    personal: tuple[str, ...],
    aead: AESGCM | None,
) -> tuple[str, ...]:
    """Open *data*'s personal fields in place now; return the fields removed (all of them
    when the subject was forgotten: *aead* is None), else ().

    Raises:
        ValueError: the envelope is missing or does not open (the event is undecodable).
    """
    if aead is None:
        return _drop(data, personal)
    # Every field takes its value from the envelope, whatever its marker says.
    data.update(open_envelope(aead, event_id, subject, personal, data.get(personal[0])))
    return ()


def without_personal(event: RecordedEvent) -> dict[str, Any]:
    """*event*'s data without its personal fields, which are not opened for it (a dead
    letter keeps them only sealed, and an event whose fields do not open has the rest)."""
    sealed = unopened(event)
    data = event.data if sealed is None else sealed
    return {k: v for k, v in data.items() if k not in event.personal}


def open_recorded(event: RecordedEvent, aead: AESGCM | None) -> RecordedEvent | UndecodableEvent:
    """*event*, read with its personal fields still sealed, opened (or without them, when
    its subject was forgotten); undecodable when a field does not open."""
    if not event.personal or event.subject is None:
        return event
    data = dict(event.data)
    try:
        forgotten = open_fields(data, event.event_id, event.subject, event.personal, aead)
    except ValueError as exc:
        return UndecodableEvent(
            event_id=event.event_id,
            stream_id=event.stream_id,
            stream_version=event.stream_version,
            position=event.position,
            type=event.type,
            raw_data=encode_json_object("data", event.data),
            raw_metadata=encode_json_object("metadata", event.metadata),
            recorded_at=event.recorded_at,
            error=str(exc),
        )
    return trusted_recorded_event(
        event.event_id,
        event.stream_id,
        event.stream_version,
        event.position,
        event.type,
        data,
        event.metadata,
        event.recorded_at,
        event.tags,
        subject=event.subject,
        personal=event.personal,
        forgotten=forgotten,
    )


# -- snapshots -------------------------------------------------------------------------------


def _snapshot_context(stream_id: str, subject: str) -> bytes:
    return _SNAPSHOT_CONTEXT + stream_id.encode() + b"\x00" + subject.encode()


def seal_snapshot(text: str, stream_id: str, keys: Sequence[tuple[str, AESGCM]]) -> dict[str, Any]:
    """A snapshot's data (JSON *text*) sealed under the key of each subject in *keys*.

    Layered: sealed under the first subject's key, that under the second's, and so on, so
    that it opens only while every one of those keys exists; forgetting any of the subjects
    makes it unreadable. (A stream's events are nearly always of one subject.)
    """
    blob = text.encode()
    subjects = []
    for subject, aead in keys:
        nonce = os.urandom(NONCE_BYTES)
        blob = nonce + aead.encrypt(nonce, blob, _snapshot_context(stream_id, subject))
        subjects.append(subject)
    return {SNAPSHOT_SEALED: base64.b64encode(blob).decode("ascii"), SNAPSHOT_SUBJECTS: subjects}


def snapshot_subjects(data: Mapping[str, Any]) -> list[str] | None:
    """The subjects whose keys seal a snapshot's *data*; None when it is not sealed."""
    subjects = data.get(SNAPSHOT_SUBJECTS)
    if SNAPSHOT_SEALED not in data or not isinstance(subjects, list):
        return None
    return [s for s in subjects if isinstance(s, str)]


def open_snapshot(
    data: Mapping[str, Any], stream_id: str, keys: Mapping[str, AESGCM | None]
) -> dict[str, Any] | None:
    """A sealed snapshot's data opened with *keys* (by subject); None when a key is missing
    (its subject was forgotten) or it does not open: a snapshot is a cache, and the stream
    is folded from its events instead."""
    subjects = snapshot_subjects(data)
    sealed = data.get(SNAPSHOT_SEALED)
    if subjects is None or not isinstance(sealed, str):
        return None
    try:
        blob = base64.b64decode(sealed, validate=True)
        for subject in reversed(subjects):
            aead = keys.get(subject)
            if aead is None:
                return None
            blob = aead.decrypt(
                blob[:NONCE_BYTES], blob[NONCE_BYTES:], _snapshot_context(stream_id, subject)
            )
        opened = json.loads(blob)
    except (InvalidTag, ValueError, binascii.Error):
        return None
    return opened if isinstance(opened, dict) else None
