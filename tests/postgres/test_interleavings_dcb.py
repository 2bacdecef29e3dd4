"""Decisions over a query in every order (issue 28, decision record 14, docs/postgres.md
"Decisions over a query"): the explorer of `tests/postgres/interleavings.py` runs decisions,
outbox transactions, plain and group-commit appenders of tagged events and a follower,
statement by statement, in every order PostgreSQL allows.

A *decision* reads with the real ``read_query`` statement (one step), decides from what it
read, then appends with the real ``append_conditional`` statement in a transaction of its
own (BEGIN and the statement: one step, which may wait for a lock) and commits (a step of its
own, so that others may run between its check and its commit). After each schedule the check
asserts, over the events the schedule committed:

- (C0) each read's position: every event its read returned is at or below it, every
  matching event it did not return above it;
- (C1) where the scenario says so, at most (or exactly) one committed event per key;
- (C2) serializability: a committed decision's query matches no event that its read did not
  return and whose transaction committed before its append step ended (the step ends when
  its statement does, after any lock it waited for); and the committed transactions have a
  serial order in which each committed decision follows the writers of the matching events
  it read and precedes the writers of those it did not (two overlapping decisions that both
  committed, each unseen by the other, have none);
- (C3) a decision refused with EV005 names exactly the matching events its read did not
  return that committed before its append step ended (so there was one);
- (C4) the follower got every committed event once, each stream in order (the check of
  `tests/postgres/test_interleavings.py`);
- (C5) in the scenarios of disjoint keys, no actor ever waited for a lock.

Time is counted in steps: the explorer lets one actor run one statement at a time and settles
every actor a statement released before the next, so a step's number orders commits and
checks exactly. Each test asserts how many schedules it ran, as the horizon scenarios do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack

import attrs
import pytest
import trio

from eventcore_trio import (
    AppendConditionFailed,
    ConfigurationError,
    DatabaseError,
    EventQuery,
    InvalidArgument,
    NewEvent,
    Position,
    QueryItem,
    QueryResult,
    StoreConnectionError,
    StreamAppend,
)
from eventcore_trio._positions import position_parts
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.postgres._appends import BUSY, AppendStatement, encode_append, many_results
from eventcore_trio.postgres._bridge import Connection
from eventcore_trio.postgres._queries import QueryStatements, query_result
from eventcore_trio.testing import read_all

from ..conftest import oldest_server_param
from .interleavings import Actor, Exploration, Session, Step, explore
from .test_interleavings import Scenario, prepared_transactions  # noqa: F401 (a fixture)

pytestmark = pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)

#: What a scripted writer does in one step: SQL (``{s}`` the schema, ``{gid}`` a name for
#: PREPARE TRANSACTION), or an append of events to one of the scenario's streams.
Op = str | tuple[str, Sequence[NewEvent]]
Script = Sequence[tuple[str, Sequence[Op]]]

#: A decision's rule: the events to append, given what its read returned (none: it does not
#: append).
Decide = Callable[[QueryResult], Sequence[NewEvent]]


@attrs.define
class DecisionLog:
    """What one decision did in a schedule."""

    name: str
    query: EventQuery
    stream: str
    read: QueryResult | None = None
    #: The step in which its append statement ended (the check ran in it).
    appended_at: int | None = None
    #: The positions EV005 named, when the condition failed.
    failed: tuple[str, ...] | None = None
    committed: bool = False


@attrs.frozen
class Commit:
    """Which transaction wrote a stream's events in a schedule, and in which step it
    committed."""

    txn: str
    step: int


@attrs.frozen
class Stored:
    """A committed event of the schedule."""

    position: Position
    stream: str
    type: str
    tags: tuple[str, ...]


class DcbScenario(Scenario):
    """The shared scenario, with decisions, tagged writers and the checks above."""

    def __init__(
        self, store: PostgresStore, connections: list[Connection], monitor: Connection
    ) -> None:
        super().__init__(store, connections)
        #: The explorer's session, which watches the others' lock waits.
        self.monitor = monitor
        self.queries = QueryStatements(store.schema)
        self.clock = 0
        #: Every event of earlier schedules is below it (see `advance_baseline`).
        self.baseline = Position(0, 0)
        self.next_baseline = self.baseline
        self.decisions: list[DecisionLog] = []
        #: Per stream, the transaction that wrote to it and when it committed.
        self.commits: dict[str, Commit] = {}
        #: Tags that exactly one committed event of the schedule must carry each (C1).
        self.exactly_one: list[str] = []
        #: Group-commit requests that came back busy and were sent again, in all schedules.
        self.resent = 0

    def begin(self, run: int) -> None:
        """Start schedule *run*: fresh names, empty logs."""
        self.run = run
        self.clock = 0
        self.decisions = []
        self.commits = {}
        self.exactly_one = []

    async def advance_baseline(self) -> None:
        """Every event stored so far is below the baseline: schedules read after it (so that
        their reads and checks see their own events only)."""
        await self.stored()
        self.baseline = self.next_baseline

    # -- names ----------------------------------------------------------------------------

    def tag(self, tag: str) -> str:
        """*tag* ("kind:value") made this schedule's own (so that no schedule waits for
        another's keys)."""
        kind, value = tag.split(":")
        return f"{kind}:{self.stream(value)}"

    def claim(self, name: str, by: str) -> NewEvent:
        """A claim of username *name*."""
        return NewEvent("UsernameClaimed", {"by": by}, tags=[self.tag(f"user:{name}")])

    def username(self, name: str) -> EventQuery:
        """The claims of username *name*."""
        return EventQuery.of(types=["UsernameClaimed"], tags=[self.tag(f"user:{name}")])

    # -- steps ----------------------------------------------------------------------------

    async def at(self, step: Step, label: str) -> int:
        """Wait for the explorer to choose this actor, then count the step."""
        await step(label)
        self.clock += 1
        return self.clock

    # -- actors ---------------------------------------------------------------------------

    def decision(
        self,
        name: str,
        at: int,
        query: EventQuery,
        decide: Decide,
        *,
        limit: int | None = None,
        twin_of: int | None = None,
    ) -> Actor:
        """A decision: read *query*, decide, append on the condition, commit.

        Its read step begins with a lone append of an unrelated event, committed: the read's
        snapshot then has an xmax past every id assigned before (a read in a busy store), so
        that an id claimed before the read and used after it would sort below its position.
        """
        connection = self.connections[at]
        stream = self.stream(name)
        traffic_sql, traffic_args = self.statement(
            [StreamAppend(f"{stream}-traffic", [NewEvent("Traffic", {})])]
        )

        async def body(step: Step, session: Session) -> None:
            session.uses(connection)
            log = DecisionLog(name, query, stream)
            self.decisions.append(log)
            await self.at(step, "read")
            await connection.fetchrow(traffic_sql, *traffic_args)
            self.commits[f"{stream}-traffic"] = Commit(f"{name} traffic", self.clock)
            sql, args = self.queries.read(query, self.baseline, limit)
            log.read = query_result(await connection.fetch(sql, *args), self.baseline, limit)
            events = decide(log.read)
            if not events:
                return
            encoded = encode_append([StreamAppend(stream, events)])
            sql, args = self.queries.append(encoded, query, log.read.position)
            await self.at(step, "append")
            await connection.execute("BEGIN")
            try:
                await connection.fetchrow(sql, *args)
            except AppendConditionFailed as exc:
                log.appended_at = self.clock
                log.failed = exc.positions
                # As the store's own statement does: its transaction ends with it.
                await connection.execute("ROLLBACK")
                return
            log.appended_at = self.clock
            self.commits[stream] = Commit(name, await self.at(step, "commit"))
            await connection.execute("COMMIT")
            log.committed = True

        return Actor(name, body, twin_of=twin_of)

    def writer(
        self,
        name: str,
        at: int,
        script: Script,
        *,
        twin_of: int | None = None,
        condition: EventQuery | None = None,
        setup: Sequence[tuple[str, Sequence[NewEvent]]] = (),
    ) -> Actor:
        """A writer that runs *script*: its appends go through ``append_events`` (with
        p_tags), or, given a *condition*, through ``append_conditional`` on that query
        matching nothing of the schedule (a decision without a read of its own: an outbox
        transaction that decides). *setup* is appended and committed before its first step.
        """
        connection = self.connections[at]
        gid = f"il-{self.schema}-{name}"

        async def body(step: Step, session: Session) -> None:
            session.uses(connection)
            for stream, events in setup:
                await self.store.append(self.stream(stream), events)
                self.commits[self.stream(stream)] = Commit(f"setup of {stream}", 0)
            log = None
            if condition is not None:
                log = DecisionLog(name, condition, "")
                log.read = QueryResult(events=(), position=self.baseline)
                self.decisions.append(log)
            written: set[str] = set()
            for label, ops in script:
                await self.at(step, label)
                for op in ops:
                    if isinstance(op, str):
                        await connection.execute(op.format(s=f'"{self.schema}"', gid=gid))
                        if op.startswith("COMMIT"):
                            # The step in which it ended: a statement of this step before
                            # it may have waited for a lock until a later step.
                            self.commits.update(dict.fromkeys(written, Commit(name, self.clock)))
                            if log is not None:
                                log.committed = True
                        continue
                    stream, events = op
                    encoded = encode_append([StreamAppend(self.stream(stream), events)])
                    written.add(self.stream(stream))
                    if log is None:
                        sql, args = self.statement.single(encoded)
                        await connection.fetchrow(sql, *args)
                        continue
                    log.stream = self.stream(stream)
                    sql, args = self.queries.append(encoded, log.query, self.baseline)
                    try:
                        await connection.fetchrow(sql, *args)
                    except AppendConditionFailed as exc:
                        log.failed = exc.positions
                        return
                    finally:
                        log.appended_at = self.clock

        async def end(step: Step, session: Session) -> None:
            try:
                await body(step, session)
            finally:
                # A failed condition (or check) leaves the transaction open: end it.
                await connection.execute("ROLLBACK")

        return Actor(name, end, twin_of=twin_of)

    def group_commit(
        self, name: str, at: int, requests: Sequence[tuple[str, Sequence[NewEvent]]]
    ) -> Actor:
        """A group-commit statement carrying *requests* (stream, events); a request that
        comes back busy is sent again on its own, in a transaction of its own, as the group
        commit does."""
        connection = self.connections[at]

        async def body(step: Step, session: Session) -> None:
            session.uses(connection)
            encoded = [
                encode_append([StreamAppend(self.stream(stream), events)])
                for stream, events in requests
            ]
            sql, args = self.statement.many(encoded)
            await self.at(step, "append")
            await connection.execute("BEGIN")
            outcomes = many_results(await connection.fetch(sql, *args), encoded)
            tick = await self.at(step, "commit")
            await connection.execute("COMMIT")
            for request, outcome in zip(encoded, outcomes, strict=True):
                if outcome is not BUSY:
                    self.commits[request.streams[0]] = Commit(name, tick)
            for request, outcome in zip(encoded, outcomes, strict=True):
                if outcome is BUSY:
                    self.resent += 1
                    sql, args = self.statement.single(request)
                    await self.at(step, "resend")
                    await connection.execute("BEGIN")
                    await connection.fetchrow(sql, *args)
                    tick = await self.at(step, "commit")
                    self.commits[request.streams[0]] = Commit(f"{name} {request.streams[0]}", tick)
                    await connection.execute("COMMIT")

        return Actor(name, body)

    # -- the check ------------------------------------------------------------------------

    async def stored(self) -> list[Stored]:
        """The events this schedule committed, in the global order; and the next baseline,
        from the same snapshot (every writer has ended: every event is below its xmax)."""
        tx, seq = position_parts(self.baseline)
        rows = await self.store.admin.fetch(
            "SELECT x.xmax, e.tx, e.position, e.stream_id, e.type, e.tags "
            "FROM (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax) AS x "
            f'LEFT JOIN "{self.schema}".events AS e ON (e.tx, e.position) > ($1, $2) '
            "ORDER BY e.tx, e.position",
            tx,
            seq,
        )
        self.next_baseline = Position(rows[0]["xmax"], 0)
        return [
            Stored(Position(r["tx"], r["position"]), r["stream_id"], r["type"], tuple(r["tags"]))
            for r in rows
            if r["tx"] is not None
        ]

    async def check(self, run: int, schedule: str) -> None:
        """C0-C4 (see the module's docstring)."""
        stored = await self.stored()
        assert all(event.stream in self.commits for event in stored), (
            f"events of writers that never committed: {stored}, commits {self.commits}"
        )
        for tag in self.exactly_one:
            count = sum(tag in event.tags for event in stored)
            assert count == 1, f"{count} committed events carry {tag}"
        for log in self.decisions:
            _check_decision(log, stored, self.commits)
        _check_serial_order(self.decisions, stored, self.commits)
        await super().check(run, schedule)
        self.baseline = self.next_baseline


def _check_decision(log: DecisionLog, stored: list[Stored], commits: dict[str, Commit]) -> None:
    read = log.read
    if read is None:
        return
    assert read.position is not None
    returned = {event.position for event in read.events}
    assert all(log.query.matches_event(event) for event in read.events), log.name
    assert all(p <= read.position for p in returned), (
        f"{log.name} read events above its position {read.position}"
    )
    matching = [e for e in stored if log.query.matches(e.type, e.tags) and e.stream != log.stream]
    unseen = [e for e in matching if e.position not in returned]
    below = [e for e in unseen if e.position <= read.position]
    assert not below, f"{log.name}'s read missed {below} below its position {read.position}"
    if log.appended_at is None:
        return
    # Committed before the decision's check ran: the check must have seen them.
    early = [str(e.position) for e in unseen if commits[e.stream].step <= log.appended_at]
    if log.failed is not None:
        assert early, f"{log.name} failed with EV005 ({log.failed}) but no unseen event existed"
        assert list(log.failed) == early[:10], (
            f"{log.name} failed naming {log.failed}; the unseen events were {early}"
        )
    else:
        assert log.committed
        assert not early, (
            f"{log.name} committed although {early} (matching, not read) committed before its "
            f"check, at steps {[commits[e.stream].step for e in unseen]}, its append at "
            f"{log.appended_at}"
        )


def _check_serial_order(
    decisions: list[DecisionLog], stored: list[Stored], commits: dict[str, Commit]
) -> None:
    """C2, the order: the committed transactions can be put in one serial order in which
    each committed decision comes after the writers of the matching events it read and
    before those of the matching events it did not (a cycle: no such order)."""
    after: dict[str, set[str]] = {}
    for log in decisions:
        if not log.committed or log.read is None:
            continue
        returned = {event.position for event in log.read.events}
        for event in stored:
            if event.stream == log.stream or not log.query.matches(event.type, event.tags):
                continue
            writer = commits[event.stream].txn
            first, then = (writer, log.name) if event.position in returned else (log.name, writer)
            after.setdefault(first, set()).add(then)
    # Depth first: a transaction met again while its successors are being visited closes a
    # cycle.
    state: dict[str, str] = {}

    def visit(txn: str, path: list[str]) -> None:
        state[txn] = "open"
        for then in sorted(after.get(txn, ())):
            assert state.get(then) != "open", (
                f"no serial order: {' -> '.join([*path, txn, then])} (each must precede the next)"
            )
            if then not in state:
                visit(then, [*path, txn])
        state[txn] = "done"

    for txn in sorted(after):
        if txn not in state:
            visit(txn, [])


@pytest.fixture
async def dcb(store: PostgresStore) -> AsyncIterator[DcbScenario]:
    await store.admin.execute(f'CREATE TABLE "{store.schema}".scratch (n int)')
    async with AsyncExitStack() as stack:
        connections = [
            await stack.enter_async_context(store.admin.connection(f"dcb interleavings {i}"))
            for i in range(6)
        ]
        monitor = await stack.enter_async_context(store.admin.connection("dcb monitor"))
        yield DcbScenario(store, connections, monitor)


async def explore_all(scenario: DcbScenario, actors: Callable[[], Sequence[Actor]]) -> Exploration:
    """Explore every schedule of *actors* and return what the exploration did."""
    await scenario.follower.drain(0)
    while page := await scenario.store.read_events(scenario.follower.cursor, limit=1000):
        scenario.follower.cursor = page[-1].position
    await scenario.advance_baseline()

    def make(run: int) -> Sequence[Actor]:
        scenario.begin(run)
        return actors()

    result = await explore(scenario.monitor, make, scenario.check)
    print(f"explored {result.schedules} schedules of up to {result.steps} steps")
    return result


ROW = "INSERT INTO {s}.scratch VALUES (1)"


def claim_if_free(s: DcbScenario, name: str, by: str) -> Decide:
    """Claim username *name* only if the read found no claim of it."""

    def decide(read: QueryResult) -> Sequence[NewEvent]:
        return [] if read.events else [s.claim(name, by)]

    return decide


def always(*events: NewEvent) -> Decide:
    """Append *events* whatever the read found."""
    return lambda _read: events


# -- 1. two decisions, one username ---------------------------------------------------------


async def test_two_decisions_claim_one_username(dcb: DcbScenario) -> None:
    """Two decisions claim "ada" (each only if its read found no claim), and the follower:
    exactly one claim is stored in every order, and the decision that lost either read the
    winner's claim or failed naming it."""
    s = dcb

    def actors() -> list[Actor]:
        s.exactly_one = [s.tag("user:ada")]
        return [
            s.decision("D1", 0, s.username("ada"), claim_if_free(s, "ada", "D1")),
            s.decision("D2", 1, s.username("ada"), claim_if_free(s, "ada", "D2"), twin_of=0),
            s.reader(),
        ]

    result = await explore_all(s, actors)
    # The later append waits for the earlier decision's commit in some orders: the waits
    # that the disjoint scenarios must never show are detected.
    assert result.first_wait is not None
    assert result.schedules == 114


# -- 2. a decision and a late outbox --------------------------------------------------------


def outbox_script(s: DcbScenario, variant: str) -> Script:
    """An outbox transaction that writes a row of its own, then appends a claim of "ada"
    unconditionally, and commits late, in one of the ways a transaction can."""
    claim: Op = ("o", [s.claim("ada", "outbox")])
    scripts: dict[str, Script] = {
        "read committed": [
            ("row", ["BEGIN", ROW]),
            ("append", [claim]),
            ("commit", ["COMMIT"]),
        ],
        "repeatable read": [
            ("begin", ["BEGIN ISOLATION LEVEL REPEATABLE READ", "SELECT {s}.announce_writer()"]),
            ("row", [ROW]),
            ("append", [claim]),
            ("commit", ["COMMIT"]),
        ],
        "savepoint": [
            ("row", ["BEGIN", ROW]),
            ("append", ["SAVEPOINT s", claim]),
            ("release", ["RELEASE SAVEPOINT s"]),
            ("commit", ["COMMIT"]),
        ],
        "prepared": [
            ("row", ["BEGIN", ROW]),
            ("append", [claim]),
            ("prepare", ["PREPARE TRANSACTION '{gid}'"]),
            ("commit", ["COMMIT PREPARED '{gid}'"]),
        ],
        "rolled back, redone": [
            ("row", ["BEGIN", ROW]),
            ("append", ["SAVEPOINT s", claim]),
            ("rollback to", ["ROLLBACK TO SAVEPOINT s"]),
            ("append", [claim]),
            ("commit", ["COMMIT"]),
        ],
    }
    return scripts[variant]


@pytest.mark.usefixtures("prepared_transactions")
@pytest.mark.parametrize(
    ("variant", "schedules"),
    [
        ("read committed", 310),
        ("repeatable read", 24),
        ("savepoint", 16),
        ("prepared", 16),
        ("rolled back, redone", 29),
    ],
)
async def test_a_decision_and_a_late_outbox(
    dcb: DcbScenario,
    variant: str,
    schedules: int,
) -> None:
    """The issue's case: a decision claims "ada" if free; an outbox transaction that wrote
    its own row first appends a claim of "ada" unconditionally and commits late. Whatever
    the order, the decision never commits over a claim it did not read that committed before
    its check (C2), and fails only naming one (C3)."""
    s = dcb

    def actors() -> list[Actor]:
        return [
            s.decision("D", 0, s.username("ada"), claim_if_free(s, "ada", "D")),
            s.writer("O", 1, outbox_script(s, variant)),
            # The follower in one variant: the others' write paths are the horizon
            # scenarios' late writers, read in every order there.
            *([s.reader()] if variant == "read committed" else []),
        ]

    result = await explore_all(s, actors)
    assert result.schedules == schedules


# -- 3. an untagged append, then a tagged one, in one transaction ---------------------------


@pytest.mark.parametrize(
    ("first", "schedules"),
    [("a row of its own", 310), ("nothing", 310)],
)
async def test_an_untagged_append_then_a_tagged_one(
    dcb: DcbScenario, first: str, schedules: int
) -> None:
    """A transaction appends an untagged event (after a row of its own, as the outbox does,
    or first thing, as ``append_atomic``-style code does), then, in a later statement, a
    claim of "ada", and commits; a decision claims "ada" if free. (The decision's read
    follows a commit of other traffic: its snapshot's xmax passes the transaction's first
    claim of an id, which its tagged append must not reuse.)"""
    s = dcb
    begin = ["BEGIN", ROW] if first == "a row of its own" else ["BEGIN"]

    def actors() -> list[Actor]:
        return [
            s.decision("D", 0, s.username("ada"), claim_if_free(s, "ada", "D")),
            s.writer(
                "O",
                1,
                [
                    ("untagged", [*begin, ("o", [NewEvent("OrderPlaced", {})])]),
                    ("tagged", [("o", [s.claim("ada", "O")])]),
                    ("commit", ["COMMIT"]),
                ],
            ),
            s.reader(),
        ]

    result = await explore_all(s, actors)
    assert result.schedules == schedules


# -- 4. a conditional append inside an outbox transaction -----------------------------------


async def test_a_conditional_append_inside_an_outbox(dcb: DcbScenario) -> None:
    """An outbox transaction (a row of its own first, READ COMMITTED) claims "ada" on the
    condition that no claim exists; a decision claims "ada" if free: exactly one claim."""
    s = dcb

    def actors() -> list[Actor]:
        s.exactly_one = [s.tag("user:ada")]
        return [
            s.decision("D", 0, s.username("ada"), claim_if_free(s, "ada", "D")),
            s.writer(
                "O",
                1,
                [
                    ("row", ["BEGIN", ROW]),
                    ("append", [("o", [s.claim("ada", "O")])]),
                    ("commit", ["COMMIT"]),
                ],
                condition=s.username("ada"),
            ),
        ]

    result = await explore_all(s, actors)
    assert result.schedules == 13


async def test_a_conditional_append_is_refused_at_repeatable_read(dcb: DcbScenario) -> None:
    """The same conditional append in a REPEATABLE READ transaction (announced at BEGIN, as
    ``store.transaction()`` does) is refused: its check would read the transaction's old
    snapshot. Nothing is written."""
    store = dcb.store
    queries = QueryStatements(store.schema)
    query = EventQuery.of(types=["UsernameClaimed"], tags=["user:ada"])
    encoded = encode_append(
        [StreamAppend("o", [NewEvent("UsernameClaimed", {}, tags=["user:ada"])])]
    )
    sql, args = queries.append(encoded, query, None)
    async with store.admin.connection("outbox") as outbox:
        await outbox.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await outbox.execute(f'SELECT "{store.schema}".announce_writer()')
        await outbox.execute(ROW.format(s=f'"{store.schema}"'))
        with pytest.raises(ConfigurationError, match="READ COMMITTED"):
            await outbox.fetchrow(sql, *args)
        await outbox.execute("ROLLBACK")
    assert await store.last_position() is None


# -- 5. disjoint decisions never wait -------------------------------------------------------


async def test_disjoint_decisions_never_wait(dcb: DcbScenario) -> None:
    """Decisions over "ada" and "bob", and a transaction appending a claim of "carol" and an
    untagged claim event, committing late: nobody ever waits (C5), both decisions commit."""
    s = dcb

    def actors() -> list[Actor]:
        s.exactly_one = [s.tag("user:ada"), s.tag("user:bob")]
        return [
            s.decision("D1", 0, s.username("ada"), claim_if_free(s, "ada", "D1")),
            # A mirror image of D1 under renaming: half the orders are skipped.
            s.decision("D2", 1, s.username("bob"), claim_if_free(s, "bob", "D2"), twin_of=0),
            s.writer(
                "P",
                2,
                [
                    (
                        "append",
                        [
                            "BEGIN",
                            ("p", [s.claim("carol", "P"), NewEvent("UsernameClaimed", {})]),
                        ],
                    ),
                    ("commit", ["COMMIT"]),
                ],
            ),
        ]

    result = await explore_all(s, actors)
    assert result.first_wait is None, result.first_wait
    assert result.schedules == 280


async def test_writers_of_one_key_never_wait(dcb: DcbScenario) -> None:
    """Two transactions and a group-commit statement append claims of "carol" (the same
    keys, shared): nobody ever waits, and no request comes back busy."""
    s = dcb

    def plain(name: str, at: int, twin_of: int | None = None) -> Actor:
        script: Script = [
            ("append", ["BEGIN", (name, [s.claim("carol", name)])]),
            ("commit", ["COMMIT"]),
        ]
        return s.writer(name, at, script, twin_of=twin_of)

    def actors() -> list[Actor]:
        return [
            plain("P1", 0),
            plain("P2", 1, twin_of=0),
            s.group_commit(
                "M", 2, [("m1", [s.claim("carol", "M")]), ("m2", [s.claim("carol", "M")])]
            ),
        ]

    result = await explore_all(s, actors)
    assert result.first_wait is None, result.first_wait
    assert s.resent == 0
    assert result.schedules == 45


# -- 6. write skew --------------------------------------------------------------------------


async def test_write_skew_over_a_shared_tag(dcb: DcbScenario) -> None:
    """A student subscribes to course c and to course d at once (at most one course per
    student): each decision's query is (course) or (student); each one's write matches the
    other's query only through the student's tag. One subscription, in every order."""
    s = dcb

    def subscribe(name: str, at: int, course: str, twin_of: int | None = None) -> Actor:
        student, course_tag = s.tag("student:s"), s.tag(f"course:{course}")
        query = EventQuery(
            [
                QueryItem(types=["Subscribed"], tags=[course_tag]),
                QueryItem(types=["Subscribed"], tags=[student]),
            ]
        )

        def decide(read: QueryResult) -> Sequence[NewEvent]:
            if any(student in event.tags for event in read.events):
                return []
            return [NewEvent("Subscribed", {"by": name}, tags=[course_tag, student])]

        return s.decision(name, at, query, decide, twin_of=twin_of)

    def actors() -> list[Actor]:
        s.exactly_one = [s.tag("student:s")]
        return [subscribe("D1", 0, "c"), subscribe("D2", 1, "d", twin_of=0), s.reader()]

    result = await explore_all(s, actors)
    assert result.schedules == 114


async def test_write_skew_across_two_tags(dcb: DcbScenario) -> None:
    """D1 reads tag x and writes y if it found nothing; D2 reads y and writes x. A serial
    order allows one of them only (C2 refuses both committing), and one of them always."""
    s = dcb

    def skew(name: str, at: int, reads: str, writes: str, twin_of: int | None = None) -> Actor:
        return s.decision(
            name,
            at,
            EventQuery.of(tags=[s.tag(reads)]),
            lambda read: (
                [] if read.events else [NewEvent("Mark", {}, tags=[s.tag(writes), s.tag("k:z")])]
            ),
            twin_of=twin_of,
        )

    def actors() -> list[Actor]:
        s.exactly_one = [s.tag("k:z")]
        return [skew("D1", 0, "k:x", "k:y"), skew("D2", 1, "k:y", "k:x", twin_of=0)]

    result = await explore_all(s, actors)
    assert result.schedules == 6


# -- 7. group commit --------------------------------------------------------------------------


async def test_a_group_commit_statement_and_a_decision(dcb: DcbScenario) -> None:
    """One ``append_many`` statement carrying a claim of "ada" and one of "bob" (a request
    whose keys a decision holds comes back busy and is sent again alone), a decision over
    "ada", and the follower."""
    s = dcb

    def actors() -> list[Actor]:
        return [
            s.decision("D", 0, s.username("ada"), claim_if_free(s, "ada", "D")),
            s.group_commit("M", 1, [("m1", [s.claim("ada", "M")]), ("m2", [s.claim("bob", "M")])]),
            s.reader(),
        ]

    result = await explore_all(s, actors)
    # Sent while the decision held "ada" between its check and its commit.
    assert s.resent > 0
    assert result.schedules == 179


# -- 8. items without tags, without types, without either ---------------------------------


@pytest.mark.parametrize(
    ("item", "schedules"),
    [("type only", 6), ("tag only", 6), ("match all", 114)],
)
async def test_items_without_tags_or_types(dcb: DcbScenario, item: str, schedules: int) -> None:
    """A decision over an item of one type and no tags (invoice numbers: it always appends
    the next), over a tag of any type, or over every event, and a transaction appending an
    event it matches (an untagged one of that type; another type with that tag; anything),
    committing late; the match-all case with the follower (its read and append take the
    writer lock exclusively)."""
    s = dcb

    def actors() -> list[Actor]:
        invoice = f"InvoiceIssued{s.run}"
        query, written = {
            "type only": (EventQuery.of(types=[invoice]), NewEvent(invoice, {})),
            "tag only": (
                EventQuery.of(tags=[s.tag("order:1")]),
                NewEvent("OrderCancelled", {}, tags=[s.tag("order:1"), s.tag("x:1")]),
            ),
            "match all": (EventQuery([QueryItem()]), NewEvent("Anything", {})),
        }[item]

        def decide(read: QueryResult) -> Sequence[NewEvent]:
            number = {"n": len(read.events) + 1}
            if item == "type only":
                return [NewEvent(invoice, number)]
            return [NewEvent("Decided", number, tags=[s.tag("order:1")])]

        return [
            s.decision("D", 0, query, decide),
            s.writer("P", 1, [("append", ["BEGIN", ("p", [written])]), ("commit", ["COMMIT"])]),
            *([s.reader()] if item == "match all" else []),
        ]

    result = await explore_all(s, actors)
    assert result.schedules == schedules


# -- 9. a read cut short by its limit -------------------------------------------------------


@pytest.mark.parametrize(("limit", "schedules"), [(1, 5), (2, 6)])
async def test_a_read_cut_short_by_its_limit(dcb: DcbScenario, limit: int, schedules: int) -> None:
    """Two claims of "ada" are stored; a decision reads them with *limit* (a full page: its
    position is the last event returned, not the snapshot's), then claims again; a writer
    appends a third claim. With limit 1 the second stored claim is after the position and
    the decision always fails; with 2 it fails exactly when the writer committed first."""
    s = dcb

    def actors() -> list[Actor]:
        setup = [("setup", [s.claim("ada", "setup"), s.claim("ada", "setup")])]
        return [
            s.decision("D", 0, s.username("ada"), always(s.claim("ada", "D")), limit=limit),
            s.writer(
                "P",
                1,
                [("append", ["BEGIN", ("p", [s.claim("ada", "P")])]), ("commit", ["COMMIT"])],
                setup=setup,
            ),
        ]

    result = await explore_all(s, actors)
    assert result.schedules == schedules


# -- wide appends (more than 128 keys: the writer lock, exclusively) -------------------------


async def test_a_wide_append_a_decision_and_the_follower(dcb: DcbScenario) -> None:
    """A transaction appends an event of 64 tags (129 keys: it takes the writer lock
    exclusively instead), a decision reads one of those tags, and the follower reads while
    the writer lock is held exclusively."""
    s = dcb

    def actors() -> list[Actor]:
        wide = NewEvent("Wide", {}, tags=[s.tag(f"w:{n:02}") for n in range(64)])
        return [
            s.decision("D", 0, EventQuery.of(tags=[s.tag("w:07")]), always(s.claim("ada", "D"))),
            s.writer("W", 1, [("append", ["BEGIN", ("w", [wide])]), ("commit", ["COMMIT"])]),
            s.reader(),
        ]

    result = await explore_all(s, actors)
    assert result.schedules == 114


# -- attacks: waits and deadlocks on real sessions -------------------------------------------


async def _waits(store: PostgresStore, pid: int) -> bool:
    """Whether session *pid* waits for a lock."""
    return bool(
        await store.admin.fetchval(
            "SELECT EXISTS (SELECT FROM pg_locks WHERE pid = $1 AND NOT granted)", pid
        )
    )


async def _until_waits(store: PostgresStore, pid: int) -> None:
    """Until session *pid* waits for a lock (polled: the wait happens inside the server)."""
    with trio.fail_after(10):
        while not await _waits(store, pid):  # noqa: ASYNC110  (a wait inside the server)
            await trio.sleep(0.005)


def _wide(prefix: str) -> NewEvent:
    """An event of 64 tags, the most an event may carry: 129 keys."""
    return NewEvent("Wide", {}, tags=[f"{prefix}:{n:02}" for n in range(64)])


async def test_two_outbox_transactions_each_append_an_event_of_64_tags(
    store: PostgresStore,
) -> None:
    """Two REPEATABLE READ transactions (announced at BEGIN: the writer lock, shared) each
    append one event of 64 tags to a stream of its own, both inside their transactions at
    once: both must commit, as any two outbox transactions of different streams do."""
    inside = [trio.Event(), trio.Event()]
    failed: list[str | None] = []

    async def outbox(n: int) -> None:
        try:
            async with store.transaction(isolation="repeatable read") as tx:
                await tx.execute("SELECT 1")
                inside[n].set()
                await inside[1 - n].wait()
                await tx.append(f"wide-{n}", [_wide(f"w{n}")])
        except DatabaseError as exc:
            failed.append(exc.sqlstate)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox, 0)
        nursery.start_soon(outbox, 1)
    assert failed == [], f"an outbox transaction failed: {failed}"
    assert len(await read_all(store)) == 2


async def test_a_wide_append_stalls_no_unrelated_decision(store: PostgresStore) -> None:
    """An outbox transaction that appended (the writer lock, shared) stays open; a lone
    append of an event of 64 tags runs (today it waits for the outbox: it wants the writer
    lock exclusively); a decision's read of an unrelated tag must not wait."""
    statement = AppendStatement(store.schema)
    queries = QueryStatements(store.schema)
    async with (
        store.admin.connection("outbox") as outbox,
        store.admin.connection("wide") as wide,
        store.admin.connection("decision") as decision,
    ):
        await outbox.execute("BEGIN")
        sql, args = statement([StreamAppend("order", [NewEvent("OrderPlaced", {})])])
        await outbox.fetchrow(sql, *args)
        wide_done = trio.Event()
        read: list[QueryResult] = []

        async def append_wide() -> None:
            sql, args = statement([StreamAppend("wide", [_wide("w")])])
            await wide.fetchrow(sql, *args)
            wide_done.set()

        async def decide() -> None:
            sql, args = queries.read(EventQuery.of(tags=["unrelated:1"]), None, None)
            read.append(query_result(await decision.fetch(sql, *args), None, None))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(append_wide)
            with trio.fail_after(10):
                while not (  # noqa: ASYNC110  (a wait inside the server)
                    wide_done.is_set() or await _waits(store, wide.backend_pid)
                ):
                    await trio.sleep(0.005)
            nursery.start_soon(decide)
            waited = False
            with trio.fail_after(10):
                while not read and not waited:
                    waited = await _waits(store, decision.backend_pid)
                    await trio.sleep(0.005)
            await outbox.execute("COMMIT")
        assert not waited, "the unrelated decision waited for the open outbox"


async def test_a_read_and_an_outbox_appending_two_tags_in_turn(store: PostgresStore) -> None:
    """An outbox transaction appends an event tagged with the tag of the larger key, then
    one of the smaller; between the two, a decision reads both tags (it takes the smaller
    key, then waits for the larger): PostgreSQL breaks the deadlock by aborting the read
    (it waited first; the outbox's session waits longer before it looks). The read is one
    statement that writes nothing: it should be run again, not fail."""
    keys = await store.admin.fetch(
        "SELECT t.tag FROM unnest(ARRAY['dl:a', 'dl:b']) AS t(tag) "
        "ORDER BY hashtext(chr(31) || t.tag) DESC"
    )
    first, second = (row["tag"] for row in keys)
    statement = AppendStatement(store.schema)
    read: list[QueryResult] = []
    failed: list[str | None] = []
    async with store.admin.connection("outbox") as outbox:
        await outbox.execute("SET deadlock_timeout = '20s'")
        await outbox.execute("BEGIN")
        sql, args = statement([StreamAppend("o", [NewEvent("T", {}, tags=[first])])])
        await outbox.fetchrow(sql, *args)

        async def decide() -> None:
            query = EventQuery([QueryItem(tags=[first]), QueryItem(tags=[second])])
            try:
                read.append(await store.read_query(query))
            except DatabaseError as exc:
                failed.append(exc.sqlstate)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(decide)
            with trio.fail_after(10):
                while not await store.admin.fetchval(  # noqa: ASYNC110  (in the server)
                    "SELECT EXISTS (SELECT FROM pg_locks WHERE NOT granted AND pid <> $1)",
                    outbox.backend_pid,
                ):
                    await trio.sleep(0.005)
            sql, args = statement([StreamAppend("o", [NewEvent("T", {}, tags=[second])])])
            await outbox.fetchrow(sql, *args)
            await outbox.execute("COMMIT")
    assert failed == [], f"the read failed: {failed}"
    assert [event.stream_id for event in read[0].events] == ["o", "o"]


async def test_a_query_of_50000_types_is_bad_input_not_an_outage(store: PostgresStore) -> None:
    """One item of 50,000 types (one guard key each): answered (by a coarser lock) or
    refused as bad input before any I/O, not an out-of-shared-memory error that reads as an
    unavailable server (and fails every other session's locks meanwhile)."""
    query = EventQuery([QueryItem(types=[f"T{n}" for n in range(50_000)], tags=["x:1"])])
    try:
        result = await store.read_query(query)
    except InvalidArgument:
        return
    except StoreConnectionError as exc:
        raise AssertionError(f"reported as an unavailable server: {exc}") from exc
    assert result.events == ()
