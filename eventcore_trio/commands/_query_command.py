"""Commands over a query: the consistency boundary is the events a query matches, not a
stream (dynamic consistency boundaries, issue 28).

`execute` reads the events the command's query matches, folds them, decides, and appends the
decision on the condition that no event matching the query was written since the read; when
one was, it reads and decides again, under the same `RetryPolicy` as a version conflict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast, runtime_checkable

import trio

from .._errors import AppendConditionFailed, ConfigurationError, InvalidArgument, RetriesExhausted
from .._events import NewEvent, RecordedEvent
from .._protocols import EventStore, TaggedEventStore
from .._queries import AppendCondition, EventQuery
from .._util import conforms


@runtime_checkable
class QueryCommand(Protocol):
    """A decision over the events a query matches (tags and types), wherever they are.

    ``query()`` names the events the decision depends on; ``evolve`` folds each of them, in
    the global order, into the state that starts as ``initial_state()``; ``decide(state)``
    returns the events to append (`NewEvent` objects with their tags, or registered typed
    objects when `execute` is given the registry: ``registry.new_event(obj, tags=[...])``
    makes a tagged one), or raises a domain error. Optionally ``stream_id()`` names the stream
    the events go to (else a stream of their own). As for every command, ``decide`` runs again
    on each attempt and must have no side effects.

    Example: a username that must be unique across all users::

        class ClaimUsername:
            def __init__(self, user: str, name: str) -> None:
                self.user, self.name = user, name

            def query(self) -> EventQuery:
                return EventQuery.of(types=["UsernameClaimed"], tags=[f"username:{self.name}"])

            def initial_state(self) -> bool:
                return False

            def evolve(self, taken: bool, event: RecordedEvent) -> bool:
                return True

            def decide(self, taken: bool) -> list[NewEvent]:
                if taken:
                    raise UsernameTaken(self.name)
                return [NewEvent("UsernameClaimed", {"user": self.user},
                                 tags=[f"username:{self.name}"])]

    .. versionadded:: 0.4
    """

    def query(self) -> EventQuery:
        """The events the decision depends on."""
        ...

    def initial_state(self) -> Any:
        """The state before any event."""
        ...

    def evolve(self, state: Any, event: RecordedEvent) -> Any:
        """The state after *event*."""
        ...

    def decide(self, state: Any) -> Sequence[Any]:
        """The events to append (or raise a domain error)."""
        ...


async def execute_query_command(
    store: EventStore,
    command: QueryCommand,
    *,
    backoff: Callable[[int], float],
    max_attempts: int,
    to_new_event: Callable[[object], NewEvent],
) -> tuple[Any, Mapping[str, tuple[NewEvent, ...]], int]:
    """Read, fold, decide and append conditionally, retrying a failed condition; returns
    the append's result (None when nothing was decided), the events by stream, and the
    number of attempts.

    Raises:
        ConfigurationError: the store does not support queries.
        RetriesExhausted: the condition failed on every attempt; nothing was written.
    """
    if not conforms(store, TaggedEventStore):
        raise ConfigurationError(
            f"{type(command).__qualname__} decides over a query, but {type(store).__name__} "
            "does not read queries (TaggedEventStore: the memory and PostgreSQL stores do)"
        )
    tagged = cast(TaggedEventStore, store)
    query = command.query()
    if not isinstance(query, EventQuery):
        raise InvalidArgument(
            f"{type(command).__qualname__}.query() returned {type(query).__name__}; it must "
            "return an EventQuery"
        )
    stream_of = getattr(command, "stream_id", None)
    stream_id = None if stream_of is None else stream_of()
    attempt = 0
    while True:
        attempt += 1
        read = await tagged.read_query(query)
        state = command.initial_state()
        for event in read.events:
            state = command.evolve(state, event)
        decided = command.decide(state)
        if isinstance(decided, Mapping | str | bytes):
            raise InvalidArgument(
                f"{type(command).__qualname__}.decide() returned {type(decided).__name__}; a "
                "QueryCommand's decide must return a list of events (it has no streams to "
                "map them to: stream_id() names one)"
            )
        events = tuple(to_new_event(e) for e in decided)
        if not events:
            return None, {}, attempt
        condition = AppendCondition(fail_if_events_match=query, after=read.position)
        try:
            result = await tagged.append_tagged(events, condition=condition, stream_id=stream_id)
        except AppendConditionFailed as failed:
            if attempt >= max_attempts:
                raise RetriesExhausted(
                    f"{type(command).__name__}'s append condition failed on each of {attempt} "
                    "attempts (events matching its query kept being written); nothing was "
                    "written",
                    attempts=attempt,
                ) from failed
            await trio.sleep(backoff(attempt))
            continue
        (written_to,) = result.stream_versions
        return result, {written_to: events}, attempt
