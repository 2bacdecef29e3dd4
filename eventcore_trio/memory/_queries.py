"""Dynamic consistency boundaries: reading the events a query matches, and the conditional
append. Atomic here as everything else in the memory store: between two Trio checkpoints one
task checks and writes alone, so two overlapping decisions never both succeed."""

from __future__ import annotations

from collections.abc import Sequence

from .._backend._decoding import require_decoded
from .._errors import AppendConditionFailed, InvalidArgument
from .._events import AppendResult, NewEvent, RecordedEvent, StreamAppend
from .._positions import Position
from .._queries import AppendCondition, EventQuery, QueryResult, tagged_stream_id
from ._appends import apply, check_appends, stage
from ._reads import first_after
from ._state import MemoryState


def _refuse_ahead(state: MemoryState, after: Position | None) -> None:
    # A position past the last event was never given by this store: a condition after it
    # would pass over events written later (the PostgreSQL store refuses it too).
    if after is not None and (not state.positions or after > state.positions[-1]):
        raise InvalidArgument(
            f"the position {after} is ahead of everything this store has written: pass the "
            "position of a read_query of this store (QueryResult.position), or None"
        )


def read_query(
    state: MemoryState, query: EventQuery, after: Position | None, limit: int | None
) -> QueryResult:
    """The events matching *query* after *after* (at most *limit*), and how far the read is
    complete: the last returned event when *limit* cut it short, else the store's last
    position (every event is visible at once here)."""
    _refuse_ahead(state, after)
    events: list[RecordedEvent] = []
    for stored in state.log[first_after(state, after) :]:
        if query.matches(stored.type, stored.tags):
            # As read_events does by default: an event that does not decode is an error,
            # never silently left out of a decision's read.
            events.append(require_decoded(stored.decode()))
            if limit is not None and len(events) == limit:
                return QueryResult(events=tuple(events), position=stored.position)
    head = state.positions[-1] if state.positions else None
    return QueryResult(events=tuple(events), position=head)


def append_tagged(
    state: MemoryState,
    events: Sequence[NewEvent],
    condition: AppendCondition | None,
    stream_id: str | None,
    expected_version: int | None,
) -> AppendResult:
    """Check *condition*, then append *events* as one commit (see `TaggedEventStore`)."""
    stream = tagged_stream_id(stream_id)
    staged = stage([StreamAppend(stream, events, expected_version=expected_version)])
    if condition is not None:
        _refuse_ahead(state, condition.after)
        query = condition.fail_if_events_match
        conflicts = [
            str(stored.position)
            for stored in state.log[first_after(state, condition.after) :]
            if query.matches(stored.type, stored.tags)
        ]
        if conflicts:
            raise AppendConditionFailed(tuple(conflicts))
    check_appends(state, [staged])
    return apply(state, staged)
