"""Snapshots: read (a copy, as a database would hand back), write (never backwards), delete."""

from __future__ import annotations

import attrs

from .._backend._decoding import decode_json_object
from .._snapshots import Snapshot
from .._validation import encode_json_object
from ._state import MemoryState, now


def read(state: MemoryState, stream_id: str, name: str) -> Snapshot | None:
    """The snapshot of *stream_id* under state *name*, as a copy: callers cannot change what
    is kept."""
    kept = state.snapshots.get((stream_id, name))
    if kept is None:
        return None
    data = decode_json_object(encode_json_object("snapshot", kept.data))
    return attrs.evolve(kept, data=data or {})


def write(state: MemoryState, snapshot: Snapshot, text: str) -> None:
    """Keep *snapshot* (its data encoded as *text*) unless a proven one as far along is kept."""
    key = (snapshot.stream_id, snapshot.state)
    kept = state.snapshots.get(key)
    if (
        kept is not None
        and kept.state_version == snapshot.state_version
        and kept.stream_version >= snapshot.stream_version
        and _proves(state, kept)
    ):
        return
    state.snapshots[key] = attrs.evolve(
        snapshot, data=decode_json_object(text) or {}, taken_at=now()
    )


def _proves(state: MemoryState, snapshot: Snapshot) -> bool:
    # Whether the stream's event at the snapshot's version is still the recorded event it
    # ended at, id and recorded_at (a restore may have rewritten the stream since, and a
    # writer's retry put the same id back: see commands/_states.py, _proves); one that is not
    # is replaced by any newer write, as on PostgreSQL.
    stream = state.streams.get(snapshot.stream_id, [])
    if (
        snapshot.event_id is None
        or snapshot.event_recorded_at is None
        or len(stream) < snapshot.stream_version
    ):
        return False
    event = stream[snapshot.stream_version - 1]
    return event.event_id == snapshot.event_id and event.recorded_at == snapshot.event_recorded_at


def delete(state: MemoryState, stream_id: str | None) -> int:
    """Delete the snapshots of *stream_id* (every stream's when None); return how many."""
    doomed = [key for key in state.snapshots if stream_id is None or key[0] == stream_id]
    for key in doomed:
        del state.snapshots[key]
    return len(doomed)
