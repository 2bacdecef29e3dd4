"""The read path: a stream's events, a page of the global order, the last position.

Every event is visible from the moment its append returns (appends are synchronous), so the
global order has no gaps to wait for, unlike PostgreSQL's (see postgres/_reads.py).
"""

from __future__ import annotations

import bisect

from .._backend._decoding import require_decoded
from .._backend._reader import Undecodable
from .._events import RecordedEvent, UndecodableEvent
from .._filters import EventFilter
from .._positions import Position
from ._state import MemoryState


def read_stream(state: MemoryState, stream_id: str, after_version: int) -> list[RecordedEvent]:
    """The events of *stream_id* after *after_version*, decoded (or raising)."""
    stream = state.streams.get(stream_id, [])
    return [require_decoded(e.decode()) for e in stream[after_version:]]


def first_after(state: MemoryState, after: Position | None) -> int:
    """The index in the log of the first event after *after*."""
    return 0 if after is None else bisect.bisect_right(state.positions, after)


def read_page(
    state: MemoryState,
    after: Position | None,
    limit: int,
    filter: EventFilter | None,
    mode: Undecodable,
) -> list[RecordedEvent | UndecodableEvent]:
    """Up to *limit* events after *after* matching *filter*, decoded as *mode* says (see
    `ReadEventsBase._read_page`)."""
    page: list[RecordedEvent | UndecodableEvent] = []
    for stored in state.log[first_after(state, after) :]:
        if filter is None or filter.matches(stored.stream_id, stored.type, stored.tags):
            decoded = stored.decode()
            page.append(require_decoded(decoded) if mode == "raise" else decoded)
            if len(page) == limit:
                break
    return page


def last_position(state: MemoryState, filter: EventFilter | None) -> Position | None:
    """The position of the last stored event matching *filter*, or None."""
    for stored in reversed(state.log):
        if filter is None or filter.matches(stored.stream_id, stored.type, stored.tags):
            return stored.position
    return None
