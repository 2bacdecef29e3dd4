"""Tags, queries and append conditions: dynamic consistency boundaries (issue 28).

Events may carry *tags* (``"username:ada"``, ``"course:c1"``). A decision reads the events
matching an `EventQuery` and appends only if no event matching that query was written after
the point its read was complete (`AppendCondition`): the consistency boundary is the query,
chosen per decision, not a stream. See docs/commands.md and decision record 14.
"""

from __future__ import annotations

import uuid
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
        """A query of one item: ``EventQuery.of(types=[...], tags=[...])`` is
        ``EventQuery([QueryItem(types=[...], tags=[...])])``.

        Raises:
            InvalidArgument: as `QueryItem` does (a lone string instead of a list is refused:
                it would be read as its characters).
        """
        return cls([QueryItem(types=types, tags=tags)])

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
            *events* lies after it. Pass it as `AppendCondition.after`, or as *after* of the
            next `read_query` of the same query. The memory store gives the position of its
            last event (None when it holds none); PostgreSQL one past what its snapshot could
            see, which need not be an event's.

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


def check_read_query(query: object, after: object, limit: object) -> None:
    """The arguments of `TaggedEventStore.read_query`, checked alike by every backend.

    Raises:
        InvalidArgument: *query* is not an `EventQuery`, *after* not a Position or None,
            *limit* not None or a positive int.
    """
    if not isinstance(query, EventQuery):
        raise InvalidArgument(f"query must be an EventQuery, got {type(query).__name__}")
    if after is not None and not isinstance(after, Position):
        raise InvalidArgument(f"after must be a Position or None, got {type(after).__name__}")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise InvalidArgument(f"limit must be None or a positive int, got {limit!r}")


def check_append_tagged(
    condition: object, stream_id: str | None, expected_version: int | None
) -> None:
    """The arguments of `TaggedEventStore.append_tagged` other than the events, checked alike
    by every backend.

    Raises:
        InvalidArgument: *condition* is not an `AppendCondition` or None, or
            *expected_version* is given without a *stream_id*.
    """
    if condition is not None and not isinstance(condition, AppendCondition):
        raise InvalidArgument(
            f"condition must be an AppendCondition or None, got {type(condition).__name__}"
        )
    if stream_id is None and expected_version is not None:
        raise InvalidArgument("expected_version needs a stream_id")


def tagged_stream_id(stream_id: str | None) -> str:
    """The stream of an `append_tagged` call: *stream_id*, or a new ``$tagged-<uuid>``."""
    return f"$tagged-{uuid.uuid4().hex}" if stream_id is None else stream_id
