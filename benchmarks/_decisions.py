"""Our side of the decision benchmarks (issue 28): `read_query` and the conditional
`append_tagged` on the events of `benchmarks._decision_data`.

``append_conditional``: a decision on a course (read its subscriptions, check the capacity,
append one subscription on the condition that none was added since the read), each on a
course of its own with three subscriptions among all the events. ``read_query_latency``: one
`read_query` returning ten subscriptions among a million events. Both load their events
through the store's batch append (writing the rows straight into the tables was measured no
faster: the server's index maintenance is the cost either way).
"""

from __future__ import annotations

import time
from typing import Final

from eventcore_trio import (
    AppendCondition,
    EventQuery,
    NewEvent,
    open_postgres_store,
)
from eventcore_trio.postgres import PostgresStore

from ._decision_data import CAPACITY, CHUNK, SUBSCRIBED, Event, course_tag, decision_events

#: Untimed decisions (and reads) before the timed ones, each side: the first statements of a
#: connection are prepared and their PL/pgSQL functions compiled, once per session.
WARM_UP: Final = 20

#: Subscriptions each course of append_conditional has when it is decided on.
DECISION_MATCHES: Final = 3

#: Subscriptions each course of read_query_latency has: what one read returns.
QUERY_MATCHES: Final = 10

#: The courses read_query_latency reads, in turn.
QUERY_COURSES: Final = 1_000


def course_query(course: int) -> EventQuery:
    """The subscriptions of *course*: what a decision on it reads and conditions on."""
    return EventQuery.of(types=[SUBSCRIBED], tags=[course_tag(course)])


async def _vacuum(store: PostgresStore) -> None:
    # As autovacuum would soon after a load: the planner's statistics for the new rows.
    for table in ("events", "event_tags"):
        await store.admin.execute(f'VACUUM (ANALYZE) "{store.schema}".{table}')


async def load(store: PostgresStore, events: list[Event]) -> None:
    """Append *events* through the store's batch append, `CHUNK` per stream and call."""
    for start in range(0, len(events), CHUNK):
        await store.append(
            f"load-{start // CHUNK}",
            [
                NewEvent(type_, data, tags=tags)
                for type_, tags, data in events[start : start + CHUNK]
            ],
        )
    await _vacuum(store)


async def _subscribe(store: PostgresStore, course: int) -> None:
    query = course_query(course)
    result = await store.read_query(query)
    students = {event.data["student"] for event in result.events}
    if len(result.events) != DECISION_MATCHES or len(students) >= CAPACITY:
        raise RuntimeError(f"course {course}: {len(result.events)} subscriptions read")
    student = f"new-{course}"
    await store.append_tagged(
        [
            NewEvent(
                SUBSCRIBED, {"student": student}, tags=[course_tag(course), f"student:{student}"]
            )
        ],
        condition=AppendCondition(fail_if_events_match=query, after=result.position),
    )


async def append_conditional(dsn: str, schema: str, count: int, decisions: int) -> float:
    """Load *count* events, then decide on *decisions* courses one after the other (after
    `WARM_UP` untimed ones): a read_query of three events, a conditional append of one.
    Decisions/s."""
    async with open_postgres_store(dsn, schema=schema) as store:
        await load(store, decision_events(count, decisions + WARM_UP, DECISION_MATCHES))
        for course in range(decisions, decisions + WARM_UP):
            await _subscribe(store, course)
        started = time.perf_counter()
        for course in range(decisions):
            await _subscribe(store, course)
        return decisions / (time.perf_counter() - started)


async def load_query_events(dsn: str, schema: str, count: int) -> None:
    """read_query_latency's table: *count* events, `QUERY_MATCHES` subscriptions for each of
    `QUERY_COURSES` courses among them."""
    async with open_postgres_store(dsn, schema=schema) as store:
        await load(store, decision_events(count, QUERY_COURSES, QUERY_MATCHES))


async def read_query_latency(dsn: str, schema: str, reads: int) -> list[float]:
    """*reads* `read_query` calls, each returning one course's ten subscriptions (the
    courses in turn, after `WARM_UP` untimed reads); each call's time in ms."""
    queries = [course_query(course) for course in range(QUERY_COURSES)]
    times: list[float] = []
    async with open_postgres_store(dsn, schema=schema) as store:
        for n in range(WARM_UP):
            await store.read_query(queries[n % QUERY_COURSES])
        for n in range(reads):
            query = queries[(n + WARM_UP) % QUERY_COURSES]
            started = time.perf_counter()
            result = await store.read_query(query)
            times.append((time.perf_counter() - started) * 1000)
            if len(result.events) != QUERY_MATCHES:
                raise RuntimeError(f"read {len(result.events)} events, expected {QUERY_MATCHES}")
    return times
