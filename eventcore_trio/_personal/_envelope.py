"""The sealed form: personal field values and snapshots encrypted under subjects' data keys.

A personal field's value is stored as an envelope, a string ``"$sealed:1:"`` followed by the
base64 of a fresh 12-byte nonce and the AES-GCM ciphertext (with its tag) of the JSON object
``{field: value}``. The associated data binds the subject and the field name, so a sealed
value opens only as the field of the subject it was sealed for: copied into another field or
under another subject it fails authentication instead of decoding as someone else's data.

Sealing happens in the process, before an event reaches any backend; a backend stores the
envelopes as ordinary JSON strings and never sees a personal value. What a backend gets from
`seal_event` carries the envelopes as `Sealed` strings, which `sealed_data` insists on: a
personal event that reaches a backend unsealed (a path that forgot to seal) is refused
instead of being stored in plain text.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs
import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .._errors import ConfigurationError
from .._events import NewEvent, RecordedEvent, UndecodableEvent, trusted_recorded_event
from .._validation import encode_json_object

#: The start of every sealed field value: the envelope's format, version 1.
ENVELOPE_PREFIX: Final = "$sealed:1:"
NONCE_BYTES: Final = 12
_TAG_BYTES: Final = 16
_FIELD_CONTEXT: Final = b"eventcore-trio personal field v1\x00"
_SNAPSHOT_CONTEXT: Final = b"eventcore-trio snapshot v1\x00"
#: A sealed snapshot's data: the sealed state, and the subjects whose keys seal it.
SNAPSHOT_SEALED: Final = "@sealed"
SNAPSHOT_SUBJECTS: Final = "@subjects"


class Sealed(str):
    """An envelope made by `seal_event`: only these pass `sealed_data`. Not a plain ``str``,
    so no caller's value can pass for sealed by looking like an envelope."""

    __slots__ = ()


@functools.lru_cache(maxsize=4096)
def _field_context(subject: str, field: str) -> bytes:
    # Subjects and field names hold no NUL (refused as control characters): the separator
    # is unambiguous.
    return _FIELD_CONTEXT + subject.encode() + b"\x00" + field.encode()


def seal_value(aead: AESGCM, subject: str, field: str, value: Any) -> Sealed:
    """*value* of personal field *field* of *subject*, sealed under the subject's key.

    Raises:
        EventEncodeError: the value is not JSON (as for any event data).
    """
    plain = encode_json_object("data", {field: value}).encode()
    nonce = os.urandom(NONCE_BYTES)
    sealed = aead.encrypt(nonce, plain, _field_context(subject, field))
    return Sealed(ENVELOPE_PREFIX + base64.b64encode(nonce + sealed).decode("ascii"))


def open_value(aead: AESGCM, subject: str, field: str, envelope: object) -> Any:
    """The value sealed in *envelope*.

    Raises:
        ValueError: it is no envelope, or it does not open under this key as this field of
            this subject (tampered with, moved, or sealed under another key).
    """
    if not isinstance(envelope, str) or not envelope.startswith(ENVELOPE_PREFIX):
        raise ValueError(f"personal field {field!r} does not hold a sealed value")
    try:
        # The C function itself (b64decode's wrapper costs as much again, once per field).
        raw = binascii.a2b_base64(envelope[len(ENVELOPE_PREFIX) :], strict_mode=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"personal field {field!r} holds a malformed sealed value") from None
    if len(raw) < NONCE_BYTES + _TAG_BYTES:
        raise ValueError(f"personal field {field!r} holds a truncated sealed value")
    try:
        plain = aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], _field_context(subject, field))
    except InvalidTag:
        raise ValueError(
            f"personal field {field!r} does not open under subject {subject!r}'s key (altered, "
            "moved from another field or subject, or sealed under another key)"
        ) from None
    decoded = _loads(plain)
    if not isinstance(decoded, dict) or field not in decoded:
        raise ValueError(f"personal field {field!r} opened to something else")
    return decoded[field]


#: Runs of digits long enough to be an integer beyond 64 bits.
_LONG_DIGITS: Final = re.compile(rb"[0-9]{19,}")


def _loads(plain: bytes) -> Any:
    # orjson parses several times faster (this runs for every personal field read); an
    # integer beyond 64 bits, which it reads inexactly or refuses, goes to the standard
    # parser, exact for them.
    if _LONG_DIGITS.search(plain) is None:
        try:
            return orjson.loads(plain)
        except orjson.JSONDecodeError:
            pass
    return json.loads(plain)


def seal_event(event: NewEvent, aead: AESGCM) -> NewEvent:
    """*event* with each personal field's value sealed under its subject's key *aead*."""
    assert event.subject is not None  # NewEvent refuses personal fields without a subject
    data = dict(event.data)
    for field in event.personal:
        data[field] = seal_value(aead, event.subject, field, data[field])
    return attrs.evolve(event, data=data)


def sealed_data(event: NewEvent) -> Mapping[str, Any]:
    """The data a backend stores for *event*: as it is, with each personal field's envelope.

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


def open_fields(
    data: dict[str, Any], subject: str, personal: Sequence[str], aead: AESGCM | None
) -> tuple[str, ...]:
    """Open *data*'s personal fields in place; return the fields removed (all of them when
    the subject was forgotten: *aead* is None), else ().

    Raises:
        ValueError: a personal field is missing or does not open (the event is undecodable).
    """
    if aead is None:
        for field in personal:
            data.pop(field, None)
        return tuple(personal)
    for field in personal:
        if field not in data:
            raise ValueError(f"personal field {field!r} is missing from the stored data")
        data[field] = open_value(aead, subject, field, data[field])
    return ()


def open_recorded(event: RecordedEvent, aead: AESGCM | None) -> RecordedEvent | UndecodableEvent:
    """*event*, read with its personal fields still sealed, opened (or without them, when
    its subject was forgotten); undecodable when a field does not open."""
    if not event.personal or event.subject is None:
        return event
    data = dict(event.data)
    try:
        forgotten = open_fields(data, event.subject, event.personal, aead)
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
