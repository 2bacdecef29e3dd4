"""Tags, queries and append conditions: dynamic consistency boundaries (issue 28).

Events may carry *tags* (``"username:ada"``, ``"course:c1"``). A decision reads the events
matching an `EventQuery` and appends only if no event matching that query was written after
the point its read was complete (`AppendCondition`): the consistency boundary is the query,
chosen per decision, not a stream. See docs/commands.md and decision record 14.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Final, final

import attrs

from ._errors import InvalidArgument
from ._events import RecordedEvent
from ._positions import Position
from ._validation import MAX_EVENT_TYPE_LENGTH, check_identifier, check_tags

#: The most items one query may have.
MAX_QUERY_ITEMS: Final = 64


def _types(value: object) -> tuple[str, ...]:
    if value == ():
        return ()
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidArgument(
            f"QueryItem.types must be a list of event types, got {type(value).__name__}: "
            f"{value!r:.80}"
        )
    types = tuple(value)
    for event_type in types:
        check_identifier("event type", event_type, max_length=MAX_EVENT_TYPE_LENGTH)
    return tuple(sorted(set(types)))


def _item_tags(value: object) -> tuple[str, ...]:
    return check_tags(value, owner="QueryItem.tags")


@final
@attrs.frozen
class QueryItem:
    """One alternative of an `EventQuery`: events of one of *types* (any type when empty)
    carrying every one of *tags* (any tags when empty).

    .. versionadded:: 0.4
    """

    types: tuple[str, ...] = attrs.field(default=(), converter=_types)
    tags: tuple[str, ...] = attrs.field(default=(), converter=_item_tags)

    def matches(self, event_type: str, tags: Collection[str]) -> bool:
        """Whether an event of *event_type* carrying *tags* matches this item."""
        if self.types and event_type not in self.types:
            return False
        return all(tag in tags for tag in self.tags)


def _items(value: object) -> tuple[QueryItem, ...]:
    if isinstance(value, QueryItem) or not isinstance(value, Iterable):
        raise InvalidArgument(
            f"EventQuery.items must be a list of QueryItem, got {type(value).__name__}"
        )
    items = tuple(value)
    if not items:
        raise InvalidArgument(
            "a query needs at least one QueryItem (an item with no types and no tags matches "
            "every event)"
        )
    if len(items) > MAX_QUERY_ITEMS:
        raise InvalidArgument(f"a query has {len(items)} items; at most {MAX_QUERY_ITEMS}")
    for index, item in enumerate(items):
        if not isinstance(item, QueryItem):
            raise InvalidArgument(
                f"EventQuery.items[{index}] must be a QueryItem, got {type(item).__name__}"
            )
    return items


@final
@attrs.frozen
class EventQuery:
    """Which events a decision depends on: those matching any of *items*.

    Example::

        EventQuery([QueryItem(types=["UsernameClaimed"], tags=["username:ada"])])

    .. versionadded:: 0.4
    """

    items: tuple[QueryItem, ...] = attrs.field(converter=_items)

    @classmethod
    def of(cls, *, types: Iterable[str] = (), tags: Iterable[str] = ()) -> EventQuery:
        """A query of one item."""
        return cls([QueryItem(types=tuple(types), tags=tuple(tags))])

    def matches(self, event_type: str, tags: Collection[str]) -> bool:
        """Whether an event of *event_type* carrying *tags* matches any item."""
        return any(item.matches(event_type, tags) for item in self.items)

    def matches_event(self, event: RecordedEvent) -> bool:
        """Whether *event* matches."""
        return self.matches(event.type, event.tags)


@final
@attrs.frozen(kw_only=True)
class QueryResult:
    """What `read_query` returned.

    Attributes:
        events: the matching events, in the global order, gap-free.
        position: the point up to which the read is complete: every matching event not in
            *events* lies after it. Pass it as `AppendCondition.after`. None when the store
            holds no event at all.

    .. versionadded:: 0.4
    """

    events: tuple[RecordedEvent, ...]
    position: Position | None


def _query(value: object) -> EventQuery:
    if not isinstance(value, EventQuery):
        raise InvalidArgument(
            f"fail_if_events_match must be an EventQuery, got {type(value).__name__}"
        )
    return value


def _after(value: object) -> Position | None:
    if value is not None and not isinstance(value, Position):
        raise InvalidArgument(
            f"AppendCondition.after must be a Position or None, got {type(value).__name__}"
        )
    return value


@final
@attrs.frozen(kw_only=True)
class AppendCondition:
    """The condition of a conditional append: fail if any event matching
    *fail_if_events_match* lies after *after* (None: any such event at all).

    .. versionadded:: 0.4
    """

    fail_if_events_match: EventQuery = attrs.field(converter=_query)
    after: Position | None = attrs.field(default=None, converter=_after)
