"""``eventcore-trio query``: the events a query over types and tags matches, as a decision
reads them (`TaggedEventStore.read_query`), and the position the read is complete to."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

from .._errors import ConfigurationError, EventDecodeError, InvalidArgument
from .._events import RecordedEvent
from .._positions import Position
from .._queries import EventQuery, QueryResult
from .._validation import MAX_EVENT_TYPE_LENGTH, MAX_TAG_LENGTH, MAX_TAGS, check_identifier
from ._options import EXIT_FAILED, EXIT_OK, StoreOptions
from ._status import printable

#: ``--limit``'s default, and its greatest value: the read holds appends of matching events
#: back while it runs (docs/postgres.md, "Decisions over a query"), so it stays short;
#: ``--after`` pages on.
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 10_000

T = TypeVar("T")


def _argument(check: Callable[[], T]) -> T:
    # A library check as an argparse type: its message comes as "argument --tag: ...".
    try:
        return check()
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def tag(text: str) -> str:
    """An argparse type: one tag, checked as an event's tags are."""
    return _argument(lambda: check_identifier("tag", text, max_length=MAX_TAG_LENGTH))


def event_type(text: str) -> str:
    """An argparse type: one event type name."""
    return _argument(lambda: check_identifier("event type", text, max_length=MAX_EVENT_TYPE_LENGTH))


def position(text: str) -> Position:
    """An argparse type: a position as ``str(position)`` prints it (``1234:5``)."""
    return _argument(lambda: Position.parse(text))


def build_query(types: Sequence[str], tags: Sequence[str]) -> EventQuery:
    """The query of one item that ``--type`` and ``--tag`` describe.

    Raises:
        ConfigurationError: neither is given (a query matching every event holds every
            append back while it reads), or more tags than an event can carry.
    """
    if not types and not tags:
        raise ConfigurationError(
            "give --type or --tag (or both): a query with neither matches every event, and "
            "its read holds every append back while it runs"
        )
    if len(set(tags)) > MAX_TAGS:
        raise ConfigurationError(
            f"{len(set(tags))} distinct --tag values; an event carries at most {MAX_TAGS} "
            "tags, so none could match"
        )
    return EventQuery.of(types=types, tags=tags)


def _event_json(event: RecordedEvent) -> dict[str, object]:
    return {
        "position": str(event.position),
        "stream_id": event.stream_id,
        "stream_version": event.stream_version,
        "type": event.type,
        "tags": list(event.tags),
        "data": event.data,
        "metadata": event.metadata,
        "event_id": str(event.event_id),
        "recorded_at": event.recorded_at.isoformat(),
    }


def query_lines(result: QueryResult) -> list[str]:
    """What ``query`` prints: one line per event (position, stream, version, type, tags,
    data), every foreign string made printable, then where the read is complete."""
    p = printable
    lines = [
        f"{event.position}  {p(event.stream_id)}  v{event.stream_version}  {p(event.type)}  "
        f"[{p(', '.join(event.tags))}]  {p(json.dumps(event.data, ensure_ascii=False))}"
        for event in result.events
    ]
    if result.position is None:
        lines.append(f"{len(result.events)} event(s); the store holds no events")
    else:
        lines.append(
            f"{len(result.events)} event(s); complete up to {result.position} "
            f"(--after {result.position} reads on)"
        )
    return lines


async def query(
    options: StoreOptions,
    event_query: EventQuery,
    after: Position | None,
    limit: int,
    as_json: bool,
) -> int:
    # Once, first: which store this is (with --json on stderr, so stdout stays JSON).
    print(options.describe(), file=sys.stderr if as_json else sys.stdout, flush=True)
    async with options.open() as store:
        try:
            result = await store.read_query(event_query, after=after, limit=limit)
            for event in result.events:
                # Personal fields open when data is first read: here, inside the try.
                event.data  # noqa: B018
        except EventDecodeError as exc:
            # A stored event, not the command line, is at fault: the read found a problem.
            where = "" if exc.position is None else f" at {exc.position}"
            print(
                f"eventcore-trio: a matching event{where} does not decode: {printable(exc)}",
                file=sys.stderr,
            )
            return EXIT_FAILED
    if as_json:
        # json.dumps escapes control characters itself.
        position_text = None if result.position is None else str(result.position)
        print(
            json.dumps(
                {"events": [_event_json(e) for e in result.events], "position": position_text},
                indent=2,
            )
        )
    else:
        for line in query_lines(result):
            print(line)
    return EXIT_OK
