"""How an append becomes stored events: validated and encoded first, checked whole against the
store (expected versions, event ids), then applied as one commit.

The same three steps serve `MemoryStore.append_atomic` and a batch's ``ctx.append``, whose
appends are checked when staged and again, with the batch's others, when it commits.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from .._errors import DuplicateEventId, SubjectForgottenError, VersionConflict
from .._events import AppendResult, NewEvent, StreamAppend, prepare_appends
from .._personal._envelope import sealed_data
from .._positions import Position
from .._validation import encode_json_object
from ._state import MemoryState, StoredEvent

#: An append_atomic request validated and encoded: requests in stream order, and per request
#: each event with its data and metadata as JSON.
Staged = tuple[list[StreamAppend], list[list[tuple[NewEvent, str, str]]]]


def stage(appends: Sequence[StreamAppend]) -> Staged:
    """*appends* validated and encoded (before any I/O; raises as `append_atomic` does).

    Personal fields must be sealed already (`_personal.seal_appends`): `sealed_data`
    refuses any that are not, so no path stores them in plain text.
    """
    requests = sorted(prepare_appends(appends), key=lambda a: a.stream_id)
    encoded = [
        [
            (
                e,
                encode_json_object("data", sealed_data(e) if e.personal else e.data),
                encode_json_object("metadata", e.metadata),
            )
            for e in request.events
        ]
        for request in requests
    ]
    return requests, encoded


def check_appends(state: MemoryState, batches: Sequence[Staged]) -> dict[str, int]:
    """Check every expected version and event id of *batches*, applied in order, before any
    is: one conflict and none is written. Returns each stream's version after them.

    Raises:
        VersionConflict: a stream is not at a request's expected version.
        DuplicateEventId: an event id is stored already, or given twice.
        SubjectForgottenError: an event has personal fields of a subject forgotten since
            they were sealed.
    """
    versions: dict[str, int] = {}
    new_ids: set[uuid.UUID] = set()
    for requests, encoded in batches:
        for request in requests:
            stream_id = request.stream_id
            actual = versions.get(stream_id, len(state.streams.get(stream_id, ())))
            if request.expected_version is not None and request.expected_version != actual:
                raise VersionConflict(stream_id, request.expected_version, actual)
            versions[stream_id] = actual + len(request.events)
        for batch in encoded:
            for event, _, _ in batch:
                if event.personal and event.subject in state.personal.forgets:
                    raise SubjectForgottenError(event.subject)
                if event.event_id is not None:
                    if event.event_id in state.event_ids or event.event_id in new_ids:
                        raise DuplicateEventId(
                            f"event id {event.event_id} is already stored; nothing was written",
                            event_id=str(event.event_id),
                        )
                    new_ids.add(event.event_id)
    return versions


def apply(state: MemoryState, staged: Staged) -> AppendResult:
    """Store *staged* (checked by `check_appends`) as one commit, and wake the readers."""
    requests, encoded = staged
    if not any(encoded):
        return AppendResult(
            None, {r.stream_id: len(state.streams.get(r.stream_id, ())) for r in requests}
        )
    state.commit += 1
    recorded_at = state.recording_time()
    versions: dict[str, int] = {}
    position: Position | None = None
    personal = state.personal
    for request, batch in zip(requests, encoded, strict=True):
        stream = state.streams.setdefault(request.stream_id, [])
        for event, data_json, metadata_json in batch:
            position = state.next_position()
            state.add_event(
                StoredEvent(
                    event_id=event.event_id or uuid.uuid4(),
                    stream_id=request.stream_id,
                    stream_version=len(stream) + 1,
                    position=position,
                    type=event.type,
                    data_json=data_json,
                    metadata_json=metadata_json,
                    recorded_at=recorded_at,
                    tags=event.tags,
                    subject=event.subject,
                    personal=event.personal,
                    keys=personal if event.personal else None,
                )
            )
            if event.personal:
                assert event.subject is not None  # NewEvent refuses personal fields without one
                personal.note(event.subject, request.stream_id)
        versions[request.stream_id] = len(stream)
    state.wake_readers()
    return AppendResult(position, versions)


def append_undecodable(state: MemoryState, stream_id: str) -> Position:
    """Store, as one commit, an event whose data is a JSON array, as a foreign writer could
    (bypassing every check of `stage`); return its position."""
    state.commit += 1
    position = state.next_position()
    state.add_event(
        StoredEvent(
            event_id=uuid.uuid4(),
            stream_id=stream_id,
            stream_version=len(state.streams.get(stream_id, ())) + 1,
            position=position,
            type="Undecodable",
            data_json="[1, 2, 3]",
            metadata_json="{}",
            recorded_at=state.recording_time(),
        )
    )
    state.wake_readers()
    return position
