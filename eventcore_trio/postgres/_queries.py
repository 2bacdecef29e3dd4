"""Decisions over a query on PostgreSQL: the statements of `read_query` and of the
conditional `append_tagged` (migration 8, decision record 14, docs/postgres.md "Decisions
over a query").

A query is sent as *branches*, each one index walk: an item with tags walks the rows of its
first tag in ``event_tags`` (filtering by its types and by its other tags); an item with types
only walks each type's events; an item with neither walks every event. The functions take the
query's guard keys before they read, which is what makes the read's position and the
append's check safe under concurrency; the client only encodes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar, final

from .._errors import DatabaseError, InvalidArgument
from .._events import AppendResult, RecordedEvent
from .._positions import Position, position_parts
from .._queries import EventQuery, QueryResult
from ._appends import TAG_SEPARATOR, EncodedAppend, or_null_tags
from ._reads import Keys, recorded_row

logger = logging.getLogger("eventcore_trio.postgres")

#: The most branches one query may have (the functions refuse more).
MAX_BRANCHES: Final = 4096

#: PostgreSQL's SQLSTATE for a statement aborted to break a deadlock, and how many times a
#: decision's statement runs again after one.
DEADLOCK_SQLSTATE: Final = "40P01"
DEADLOCK_RETRIES: Final = 3

T = TypeVar("T")


async def retry_deadlock(statement: Callable[[], Awaitable[T]]) -> T:
    """Run a decision's statement (``read_query`` or ``append_conditional``), again when
    PostgreSQL aborted it to break a deadlock.

    It takes its query's keys exclusively, so a transaction that appends events of two of
    its tags in two statements, in the other order, can close a cycle with it (found by the
    interleaving review, `test_a_read_and_an_outbox_appending_two_tags_in_turn`). The
    statement is a transaction of its own and wrote nothing: running it again is safe.
    """
    for attempt in range(DEADLOCK_RETRIES):
        try:
            return await statement()
        except DatabaseError as exc:
            if exc.sqlstate != DEADLOCK_SQLSTATE:
                raise
            logger.debug("a decision's statement broke a deadlock (attempt %d)", attempt + 1)
    return await statement()


@final
class Branches:
    """A query as the functions take it: per branch its tag (or None), its types joined (or
    None: any type; a single type for a branch without a tag), and the tags its events must
    carry joined ("" when the branch's tag is the item's only one)."""

    __slots__ = ("tag", "tags", "types")

    def __init__(self, query: EventQuery) -> None:
        self.tag: list[str | None] = []
        self.types: list[str | None] = []
        self.tags: list[str] = []
        for item in query.items:
            if item.tags:
                # The first tag (the least, in code-point order) drives the walk; the
                # others are checked on the events it finds (none: no visit).
                others = item.tags if len(item.tags) > 1 else ()
                self._add(item.tags[0], TAG_SEPARATOR.join(item.types) or None, others)
            elif item.types:
                for event_type in item.types:
                    self._add(None, event_type, ())
            else:
                self._add(None, None, ())
        if len(self.tag) > MAX_BRANCHES:
            raise InvalidArgument(
                f"a query with {len(self.tag)} index walks (one per item with tags, one per "
                f"type of an item without); at most {MAX_BRANCHES}: split the query"
            )

    def _add(self, tag: str | None, types: str | None, tags: Sequence[str]) -> None:
        self.tag.append(tag)
        self.types.append(types)
        self.tags.append(TAG_SEPARATOR.join(tags))

    def args(self) -> list[Any]:
        """The three array arguments."""
        return [self.tag, self.types, self.tags]


@final
class QueryStatements:
    """The statements of one schema's decisions."""

    def __init__(self, schema: str) -> None:
        # Migration 9's overloads: with each event's subject and personal field names.
        self._read = f'SELECT * FROM "{schema}".read_query($1, $2, $3, $4, $5, $6, true)'
        self._append = (
            f'SELECT * FROM "{schema}".append_conditional('
            "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
        )

    def read(
        self, query: EventQuery, after: Position | None, limit: int | None
    ) -> tuple[str, list[Any]]:
        """The ``read_query`` statement (see `query_result` for its rows)."""
        tx, seq = (0, 0) if after is None else position_parts(after)
        return self._read, [*Branches(query).args(), tx, seq, limit]

    def append(
        self, encoded: EncodedAppend, query: EventQuery, after: Position | None
    ) -> tuple[str, list[Any]]:
        """The ``append_conditional`` statement for one stream's events."""
        tx, seq = (None, None) if after is None else position_parts(after)
        return self._append, [
            encoded.streams[0],
            encoded.expected[0],
            encoded.event_ids,
            encoded.types,
            encoded.data,
            encoded.metadata,
            or_null_tags(encoded.tags),
            encoded.subjects,
            encoded.personal,
            *Branches(query).args(),
            tx,
            seq,
        ]


def query_result(
    rows: Sequence[Any], after: Position | None, limit: int | None, keys: Keys | None = None
) -> QueryResult:
    """The `QueryResult` of a ``read_query`` statement's rows.

    The read is complete up to its last event when *limit* cut it short, else up to the
    snapshot's xmax: every matching event it did not return has a greater position.
    """
    events: list[RecordedEvent] = [recorded_row(row, keys) for row in rows if row["tx"] is not None]
    if limit is not None and len(events) == limit:
        return QueryResult(events=tuple(events), position=events[-1].position)
    position = Position(rows[0]["snapshot_xmax"], 0)
    if after is not None and after > position:
        position = after
    return QueryResult(events=tuple(events), position=position)


def conditional_result(row: Any, encoded: EncodedAppend) -> AppendResult:
    """The `AppendResult` of an ``append_conditional`` row."""
    position = None if row["last_tx"] is None else Position(row["last_tx"], row["last_position"])
    stream = encoded.streams[0]
    return AppendResult(position, {stream: row["versions"][0] + encoded.counts[0]})
