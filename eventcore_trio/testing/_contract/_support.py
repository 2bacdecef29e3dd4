"""What the contract's parts share: building events, reading everything, following a store,
and the Hypothesis settings of the property-based contracts."""

from __future__ import annotations

from typing import Any

import hypothesis
import trio
import trio.lowlevel

from ..._events import NewEvent, RecordedEvent
from ..._filters import EventFilter
from ..._positions import Position
from ..._protocols import Store


def events(*types: str, **data: Any) -> list[NewEvent]:
    """Build NewEvents of the given types, each with *data*."""
    return [NewEvent(t, dict(data)) for t in types]


async def read_all(
    store: Store,
    *,
    after: Position | None = None,
    filter: EventFilter | None = None,
    page_size: int = 100,
) -> list[RecordedEvent]:
    """Read every visible event after *after*, page by page."""
    result: list[RecordedEvent] = []
    while True:
        page = await store.read_events(after, limit=page_size, filter=filter)
        result.extend(page)
        if len(page) < page_size:
            return result
        after = page[-1].position


async def follow_until(
    store: Store, done: trio.Event, seen: list[RecordedEvent], *, limit: int = 100
) -> None:
    """Poll `read_events` from the start into *seen* until *done* is set and all is read.

    A polling reader, as a projection is: it keeps reading after *done* until a read that
    began after *done* was set finds nothing more, so nothing committed before *done* is missed.

    .. versionadded:: 0.2
    """
    cursor: Position | None = None
    while True:
        finished = done.is_set()
        page = await store.read_events(cursor, limit=limit)
        seen.extend(page)
        if page:
            cursor = page[-1].position
        elif finished:
            return
        else:
            await trio.lowlevel.checkpoint()


PROPERTY_SETTINGS = hypothesis.settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
)
