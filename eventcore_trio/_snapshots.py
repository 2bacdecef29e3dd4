"""Snapshots: a stream's folded state at a version, kept to spare a fresh process the fold."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any, final

import attrs

from ._errors import InvalidArgument
from ._validation import MAX_BIGINT, MAX_EVENT_TYPE_LENGTH, check_identifier, check_stream_id


@final
@attrs.frozen
class Snapshot:
    """One stream's state, as a `StateCommand`'s state class folded it, at one version.

    Never the source of truth: a snapshot only saves folding the events up to
    *stream_version*; deleting every snapshot changes nothing but speed. It is used only while
    the stream's event at *stream_version* is still the recorded event it ends at, the one
    *event_id* and *event_recorded_at* name together: a version number alone proves nothing
    once a restore has rewritten the stream and other writers have grown it back to that
    length, and an id alone proves nothing once a writer has retried a lost event with its
    own id (an idempotency key), which records that id again, later, on top of another
    history.

    Attributes:
        stream_id: the stream.
        state: the registered state name (`EventRegistry.state`).
        state_version: the state class's schema version when the snapshot was taken; one
            that differs from today's is ignored (or upcast with a state upcaster).
        stream_version: how many of the stream's events are folded into *data*.
        data: the state, as JSON values, and under the key ``"@fields"`` a fingerprint of
            the state class's fields (names and declared types) when it was taken. One of
            today's *state_version* whose fingerprint is not today's class's (the fields
            changed and the version was not raised), or that has none (taken before
            snapshots recorded it, or written by hand), is never used: the stream is folded
            from its events, with a warning in the first case, and the snapshot replaced.
        taken_at: when it was written (None before it is stored).
        event_id: the id of the last event folded into *data* (the stream's event at
            *stream_version*). A snapshot without one (written before it was recorded) is
            never used, and the next snapshot of the stream replaces it.
        event_recorded_at: that event's `RecordedEvent.recorded_at`. Given with *event_id*
            or not at all; a snapshot without it is never used either.

    .. versionadded:: 0.3
    """

    stream_id: str
    state: str
    state_version: int
    stream_version: int
    data: Mapping[str, Any]
    taken_at: dt.datetime | None = None
    event_id: uuid.UUID | None = attrs.field(default=None, kw_only=True)
    event_recorded_at: dt.datetime | None = attrs.field(default=None, kw_only=True)


def check_snapshot(snapshot: object) -> Snapshot:
    """Validate a snapshot handed to `SnapshotStore.write_snapshot`."""
    if not isinstance(snapshot, Snapshot):
        raise InvalidArgument(f"write_snapshot() takes a Snapshot, got {type(snapshot).__name__}")
    check_stream_id(snapshot.stream_id)
    check_identifier("state", snapshot.state, max_length=MAX_EVENT_TYPE_LENGTH)
    for field in ("state_version", "stream_version"):
        value = getattr(snapshot, field)
        if type(value) is not int or not 1 <= value <= MAX_BIGINT:
            raise InvalidArgument(f"Snapshot.{field} must be an int >= 1, got {value!r}")
    if snapshot.event_id is not None and not isinstance(snapshot.event_id, uuid.UUID):
        raise InvalidArgument(
            "Snapshot.event_id must be the uuid.UUID of the stream's event at its "
            f"stream_version (or None), got {snapshot.event_id!r}"
        )
    recorded_at = snapshot.event_recorded_at
    if recorded_at is not None and (
        not isinstance(recorded_at, dt.datetime) or recorded_at.utcoffset() is None
    ):
        raise InvalidArgument(
            "Snapshot.event_recorded_at must be the timezone-aware recorded_at of the stream's "
            f"event at its stream_version (or None), got {recorded_at!r}"
        )
    if (snapshot.event_id is None) != (recorded_at is None):
        raise InvalidArgument(
            "Snapshot.event_id and Snapshot.event_recorded_at name the stream's event at its "
            "stream_version together: give both (that RecordedEvent's event_id and "
            f"recorded_at) or neither, got event_id={snapshot.event_id!r}, "
            f"event_recorded_at={recorded_at!r}"
        )
    return snapshot
