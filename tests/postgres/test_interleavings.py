"""Every interleaving of small scenarios of writers and a reader returns every event once.

The scenarios put together the write paths of docs/postgres.md ("The read horizon"): plain
appends, group-commit appends (``append_many``), transactions that wrote a row of their own
before appending (the outbox at READ COMMITTED, reactors' batches), transactions that
announced themselves at BEGIN (the outbox at REPEATABLE READ and SERIALIZABLE), appends in
a savepoint, prepared transactions; and a reader that runs the real horizon statement and
the real page read as two steps, so that writers may start, append and commit between
them. After each schedule a reader drains the store with ``read_events`` and the check
asserts that what the reader was given, from its own cursor, is every committed event of
the schedule exactly once, each stream in order.

Each test reports how many schedules it ran (``-rP`` shows it); the counts are asserted
too, so that a driver that silently explored less would fail.

They run on one server of those under test, the oldest: some 23,000 schedules take a
couple of minutes, and what they check (the SQL of the append functions and the reader
against PostgreSQL's snapshot and lock semantics) is the same on every supported version;
the rest of the suite runs on all of them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any, cast

import pytest
import trio

from eventcore_trio import NewEvent, Position, StreamAppend, open_postgres_store
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.postgres._appends import AppendStatement, encode_append
from eventcore_trio.postgres._bridge import Connection
from eventcore_trio.postgres._pool import Pool
from eventcore_trio.postgres._reads import ReadQueries, read_page

from ..conftest import oldest_server_param
from .interleavings import Actor, Session, Step, explore

#: A scripted writer's steps: a label and the statements it runs (see `Scenario.scripted`).
Script = Sequence[tuple[str, Sequence[str]]]

pytestmark = pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)


class Follower:
    """A reader with a cursor of its own: the real horizon and page statements, one step
    each, and a final drain through ``store.read_events``."""

    def __init__(self, store: PostgresStore, connection: Connection) -> None:
        self.store = store
        self.connection = connection
        self.queries = ReadQueries(store.schema)
        self.cursor: Position | None = None
        self.seen: list[tuple[str, int, Position]] = []

    def _take(self, rows: Sequence[Any]) -> None:
        for row in rows:
            position = Position(row["tx"], row["position"])
            assert self.cursor is None or position > self.cursor, "the cursor moved back"
            self.cursor = position
            self.seen.append((row["stream_id"], row["stream_version"], position))

    async def read_round(self, step: Step, session: Session) -> None:
        """One round of the read path: the horizon, then the page below it."""
        session.uses(self.connection)
        await step("horizon")
        horizon = int(
            await self.connection.fetchval(f"SELECT horizon FROM ({self.queries.horizon}) h")
        )
        await step("read")
        sql, args = self.queries.read_events(self.cursor, 1000, None, horizon)
        self._take(await self.connection.fetch(sql, *args))

    async def read_below_xmin(self, step: Step, session: Session) -> None:
        """The cheap read: below the snapshot's xmin, in one statement."""
        session.uses(self.connection)
        await step("read")
        sql, args = self.queries.read_events(self.cursor, 1000, None)
        self._take(await self.connection.fetch(sql, *args))

    async def read_page_round(self, step: Step, session: Session) -> list[tuple[str, int]]:
        """The store's own read, `read_page`, each of its statements one step ("page",
        "horizon", "read on"); returns what it read."""
        session.uses(self.connection)
        rows = await read_page(
            cast(Pool, _SteppingPool(self.connection, step)), self.queries, self.cursor, 1000, None
        )
        self._take(rows)
        return [(row["stream_id"], row["stream_version"]) for row in rows]

    async def drain(self, wanted: int) -> None:
        """Read on with ``store.read_events`` until *wanted* events have been seen.

        Every writer has ended by now, so everything committed is readable: reads that bring
        nothing while events are missing mean they were skipped (or never become readable),
        and the check fails. Not the first such read alone: a transaction that is no
        writer's (autovacuum's, any session's in the database) and ends while a read works
        out its horizon makes that read shorter (``read_horizon``: "costs nothing but a
        shorter read"), so reads go on for `DRAIN_PATIENCE` seconds first.
        """
        with trio.move_on_after(DRAIN_PATIENCE):
            while len(self.seen) < wanted:
                page = await self.store.read_events(self.cursor, limit=1000)
                if not page:
                    await trio.sleep(0.01)
                for event in page:
                    assert self.cursor is None or event.position > self.cursor
                    self.cursor = event.position
                    self.seen.append((event.stream_id, event.stream_version, event.position))


class _SteppingPool:
    """What `read_page` uses of a pool, running each statement as a step on one session."""

    def __init__(self, connection: Connection, step: Step) -> None:
        self._connection = connection
        self._step = step
        self._fetches = 0

    async def fetch(self, sql: str, *args: object) -> list[Any]:
        self._fetches += 1
        await self._step("page" if self._fetches == 1 else "read on")
        return list(await self._connection.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: object) -> Any:
        await self._step("horizon")
        return await self._connection.fetchrow(sql, *args)


#: How long `Follower.drain` reads on while nothing comes. A read made shorter is followed
#: by a whole one within milliseconds; the check waits this long only to fail.
DRAIN_PATIENCE = 2.0


class Scenario:
    """Sessions, statements and the check shared by the scenarios below."""

    def __init__(self, store: PostgresStore, connections: list[Connection]) -> None:
        self.store = store
        self.schema = store.schema
        self.connections = connections
        self.statement = AppendStatement(store.schema)
        self.follower = Follower(store, connections[-1])
        self.run = 0

    def stream(self, name: str) -> str:
        return f"il{self.run}-{name}"

    def append_sql(self, *streams: str) -> tuple[str, list[Any]]:
        return self.statement(
            [StreamAppend(self.stream(s), [NewEvent("E", {"s": s})]) for s in streams]
        )

    # -- writers --------------------------------------------------------------------------

    def plain(self, name: str, at: int, stream: str) -> Actor:
        """An append in a transaction of its own (as a lone or group-commit append is)."""
        connection = self.connections[at]

        async def body(step: Step, session: Session) -> None:
            session.uses(connection)
            sql, args = self.append_sql(stream)
            await step("append")
            # BEGIN and the append in one crossing (BEGIN alone changes nothing others see).
            await connection.run_writes([("BEGIN", [()]), (sql, [args])])
            await step("commit")
            await connection.execute("COMMIT")

        return Actor(name, body)

    def many(self, name: str, at: int, *streams: str) -> Actor:
        """A group-commit statement: one ``append_many`` carrying a request per stream."""
        connection = self.connections[at]

        async def body(step: Step, session: Session) -> None:
            session.uses(connection)
            sql, args = self.statement.many(
                [
                    encode_append([StreamAppend(self.stream(s), [NewEvent("E", {"s": s})])])
                    for s in streams
                ]
            )
            await step("append")
            await connection.run_writes([("BEGIN", [()]), (sql, [args])])
            await step("commit")
            await connection.execute("COMMIT")

        return Actor(name, body)

    def late(
        self,
        name: str,
        at: int,
        stream: str,
        *,
        twin_of: int | None = None,
        isolation: str = "READ COMMITTED",
        end: str = "commit",
    ) -> Actor:
        """A transaction that writes a row of its own (and so holds an id) before it
        appends: the outbox, a reactor's batch. *isolation* other than READ COMMITTED
        announces itself at BEGIN, as ``store.transaction()`` does. *end* is ``commit``,
        ``savepoint`` (the append runs in a savepoint, released before the commit) or
        ``prepared`` (PREPARE TRANSACTION, then COMMIT PREPARED)."""
        connection = self.connections[at]
        gid = f"il-{self.schema}-{name}"

        async def body(step: Step, session: Session) -> None:
            session.uses(connection)
            sql, args = self.append_sql(stream)
            if isolation != "READ COMMITTED":
                await step("begin")
                await connection.execute(f"BEGIN ISOLATION LEVEL {isolation}")
                await connection.execute(f'SELECT "{self.schema}".announce_writer()')
                await step("row")
                await connection.execute(f'INSERT INTO "{self.schema}".scratch VALUES (1)')
            else:
                await step("row")
                await connection.execute(f'BEGIN; INSERT INTO "{self.schema}".scratch VALUES (1)')
            await step("append")
            if end == "savepoint":
                await connection.execute("SAVEPOINT s")
            await connection.fetchrow(sql, *args)
            if end == "savepoint":
                await step("release")
                await connection.execute("RELEASE SAVEPOINT s")
            if end == "prepared":
                await step("prepare")
                await connection.execute(f"PREPARE TRANSACTION '{gid}'")
                await step("commit")
                await connection.execute(f"COMMIT PREPARED '{gid}'")
            else:
                await step("commit")
                await connection.execute("COMMIT")

        return Actor(name, body, twin_of=twin_of)

    def scripted(
        self, name: str, at: int, script: Script, *, other_schema: str | None = None
    ) -> Actor:
        """A writer that runs *script*: per step, a label and its statements. ``APPEND x``
        appends one event to the scenario's stream x; ``OTHER x`` appends to stream x in
        *other_schema*; ``EXCEPT x`` appends to x inside a plpgsql block that then raises
        and catches an error (the append is undone with the block's subtransaction);
        anything else is SQL, ``{s}`` standing for the schema."""
        connection = self.connections[at]

        async def body(step: Step, session: Session) -> None:
            session.uses(connection)
            for label, statements in script:
                await step(label)
                for statement in statements:
                    verb, *words = statement.split()
                    if verb == "APPEND":
                        sql, args = self.append_sql(*words)
                        await connection.fetchrow(sql, *args)
                    elif verb == "OTHER":
                        assert other_schema is not None
                        sql, args = AppendStatement(other_schema)(
                            [StreamAppend(self.stream(words[0]), [NewEvent("E", {})])]
                        )
                        await connection.fetchrow(sql, *args)
                    elif verb == "EXCEPT":
                        await connection.execute(
                            "DO $do$ BEGIN "
                            f'PERFORM "{self.schema}".append_events('
                            f"ARRAY['{self.stream(words[0])}'], ARRAY[NULL]::bigint[], "
                            "ARRAY[1], NULL, NULL, NULL, ARRAY['E'], ARRAY['{}'::jsonb], NULL); "
                            "RAISE EXCEPTION 'undo'; "
                            "EXCEPTION WHEN raise_exception THEN NULL; END $do$"
                        )
                    else:
                        await connection.execute(statement.format(s=f'"{self.schema}"'))

        return Actor(name, body)

    # -- readers --------------------------------------------------------------------------

    def reader(self, rounds: int = 1, *, xmin_reads: int = 0) -> Actor:
        async def body(step: Step, session: Session) -> None:
            for _ in range(xmin_reads):
                await self.follower.read_below_xmin(step, session)
            for _ in range(rounds):
                await self.follower.read_round(step, session)

        return Actor("R", body)

    # -- the check ------------------------------------------------------------------------

    async def check(self, run: int, schedule: str) -> None:
        """Every committed event of the schedule returned exactly once, streams in order."""
        prefix = f"il{run}-"
        committed = await self.store.admin.fetch(
            f'SELECT stream_id, stream_version FROM "{self.schema}".events '
            "WHERE stream_id LIKE $1 || '%' ORDER BY stream_id, stream_version",
            prefix,
        )
        expected = [(row["stream_id"], row["stream_version"]) for row in committed]
        assert expected, "the schedule committed nothing"
        await self.follower.drain(len(expected))
        returned = [(stream, version) for stream, version, _ in self.follower.seen]
        self.follower.seen.clear()
        assert all(stream.startswith(prefix) for stream, _ in returned), returned
        assert sorted(returned) == expected, f"returned {returned}, committed {expected}"
        for stream in {s for s, _ in returned}:
            versions = [v for s, v in returned if s == stream]
            assert versions == sorted(versions), f"stream {stream} out of order: {versions}"


@pytest.fixture
async def scenario(store: PostgresStore) -> AsyncIterator[Scenario]:
    await store.admin.execute(f'CREATE TABLE "{store.schema}".scratch (n int)')
    async with AsyncExitStack() as stack:
        connections = [
            await stack.enter_async_context(store.admin.connection(f"interleavings {i}"))
            for i in range(5)
        ]
        yield Scenario(store, connections)


@pytest.fixture
async def prepared_transactions(store: PostgresStore) -> None:
    """The server allows PREPARE TRANSACTION (the suite's own servers do)."""
    allowed = int(await store.admin.fetchval("SHOW max_prepared_transactions"))
    if allowed == 0:
        message = "the server under test has max_prepared_transactions = 0"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
async def monitor(store: PostgresStore) -> AsyncIterator[Connection]:
    async with store.admin.connection("interleavings monitor") as connection:
        yield connection


async def run(
    scenario: Scenario,
    monitor: Connection,
    actors: Callable[[], Sequence[Actor]],
    expected_schedules: int,
    *,
    check: Callable[[int, str], Awaitable[None]] | None = None,
) -> None:
    """Explore every schedule of *actors*; assert the number explored. *check*: run after
    each schedule instead of the scenario's own."""
    await scenario.follower.drain(0)
    while page := await scenario.store.read_events(scenario.follower.cursor, limit=1000):
        scenario.follower.cursor = page[-1].position

    def make(run: int) -> Sequence[Actor]:
        scenario.run = run
        return actors()

    result = await explore(monitor, make, check or scenario.check)
    print(f"explored {result.schedules} schedules of up to {result.steps} steps")
    assert result.schedules == expected_schedules


async def test_a_transaction_ends_between_the_page_and_the_horizon(
    scenario: Scenario, monitor: Connection
) -> None:
    """The store's read (`read_page`: the page below its snapshot's xmin, then the horizon
    statement, then, if anything may follow, the read on to the horizon), a transaction
    that writes no event but holds the xmin, and two appends: in every order, a read during
    which no append is in flight returns every event committed before it began (none waits
    for the next wake-up), and the drain returns each event once. Ending the transaction
    between the page and the horizon statement is the order that a read which stopped at an
    empty page, not held back, got wrong."""
    s = scenario
    committed: list[tuple[str, int]] = []
    in_flight: set[str] = set()
    missed: list[str] = []

    def appender(name: str, at: int, stream: str, twin_of: int | None = None) -> Actor:
        plain = s.plain(name, at, stream)

        async def body(step: Step, session: Session) -> None:
            async def tracked(label: str) -> None:
                await step(label)
                if label == "append":
                    in_flight.add(name)

            await plain.body(tracked, session)
            in_flight.discard(name)
            committed.append((s.stream(stream), 1))

        return Actor(name, body, twin_of=twin_of)

    def holder() -> Actor:
        connection = s.connections[1]

        async def body(step: Step, session: Session) -> None:
            session.uses(connection)
            await step("begin")
            await connection.execute("BEGIN; SELECT pg_current_xact_id()")
            await step("end")
            await connection.execute("COMMIT")

        return Actor("T", body)

    def reader() -> Actor:
        async def body(step: Step, session: Session) -> None:
            before: list[tuple[str, int]] = []
            appending: set[str] = set()

            async def tracked(label: str) -> None:
                await step(label)
                if label == "page":
                    before.extend(committed)
                appending.update(in_flight)

            returned = await s.follower.read_page_round(tracked, session)
            if not appending and not set(before) <= set(returned):
                missed.append(f"read {returned}, committed before it {before}")

        return Actor("R", body)

    def actors() -> Sequence[Actor]:
        committed.clear()
        in_flight.clear()
        return [holder(), appender("A", 0, "a"), appender("B", 2, "b", twin_of=1), reader()]

    async def check(run: int, schedule: str) -> None:
        assert not missed, f"{schedule}: {missed}"
        await s.check(run, schedule)

    # 9! / (2! 2! 2! 3!) orders of the nine steps (a read of three), and fewer where the
    # read stops after two, halved by the appenders' symmetry.
    await run(s, monitor, actors, 1795, check=check)


async def test_two_late_writers_an_appender_and_a_reader(
    scenario: Scenario, monitor: Connection
) -> None:
    """Two transactions that wrote a row before appending (READ COMMITTED: the outbox, a
    reactor's batch), a plain appender, and the reader's horizon and page: every order."""
    s = scenario
    await run(
        s,
        monitor,
        lambda: [
            s.late("W1", 0, "a"),
            s.late("W2", 1, "b", twin_of=0),
            s.plain("P", 2, "c"),
            s.reader(),
        ],
        # 10! / (3! 3! 2! 2!) orders, halved by the twins' symmetry.
        12_600,
    )


async def test_a_group_commit_statement_a_late_writer_and_both_reads(
    scenario: Scenario, monitor: Connection
) -> None:
    """An ``append_many`` statement carrying two requests, a late writer, and a reader
    that reads below its snapshot's xmin, then through the horizon."""
    s = scenario
    await run(
        s,
        monitor,
        lambda: [s.late("W", 0, "a"), s.many("M", 1, "b", "c"), s.reader(xmin_reads=1)],
        # 8! / (3! 2! 3!)
        560,
    )


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
async def test_transactions_that_announce_themselves_at_begin(
    scenario: Scenario, monitor: Connection, isolation: str
) -> None:
    """A stricter-isolation outbox transaction (announced at BEGIN, as store.transaction()
    does, then a row of its own, then its append), a plain appender, and the reader."""
    s = scenario
    await run(
        s,
        monitor,
        lambda: [s.late("T", 0, "a", isolation=isolation), s.plain("P", 1, "b"), s.reader()],
        # 8! / (4! 2! 2!)
        420,
    )


async def test_a_prepared_transaction(
    scenario: Scenario, monitor: Connection, prepared_transactions: None
) -> None:
    """A late writer that commits in two phases (PREPARE, then COMMIT PREPARED), a plain
    appender, and the reader."""
    s = scenario
    await run(
        s,
        monitor,
        lambda: [s.late("X", 0, "a", end="prepared"), s.plain("P", 1, "b"), s.reader()],
        # 8! / (4! 2! 2!)
        420,
    )


async def test_an_append_in_a_savepoint(scenario: Scenario, monitor: Connection) -> None:
    """A late writer that appends in a savepoint and releases it, a plain appender, and
    the reader."""
    s = scenario
    await run(
        s,
        monitor,
        lambda: [s.late("S", 0, "a", end="savepoint"), s.plain("P", 1, "b"), s.reader()],
        # 8! / (4! 2! 2!)
        420,
    )


async def test_writers_of_one_stream(scenario: Scenario, monitor: Connection) -> None:
    """Two late writers of the same stream (the second waits for the stream's lock while
    the first holds it), and the reader: every order PostgreSQL allows, the stream's events
    read in version order."""
    s = scenario
    await run(
        s,
        monitor,
        lambda: [s.late("W1", 0, "a"), s.late("W2", 1, "a", twin_of=0), s.reader()],
        # Fewer than 8! / (3! 3! 2!) / 2 = 280: an append that waits for the stream's lock
        # cannot be scheduled until its holder ends.
        ONE_STREAM_LATE,
    )


async def test_a_late_writer_and_a_plain_appender_of_one_stream(
    scenario: Scenario, monitor: Connection
) -> None:
    """A late writer and a plain appender of the same stream, and the reader."""
    s = scenario
    await run(
        s,
        monitor,
        lambda: [s.late("W", 0, "a"), s.plain("P", 1, "a"), s.reader()],
        # Fewer than 7! / (3! 2! 2!) = 210, for the same reason.
        ONE_STREAM_MIXED,
    )


#: Counted by the explorer (blocked appends make these fewer than the plain orders).
ONE_STREAM_LATE = 196
ONE_STREAM_MIXED = 147


ROW = "INSERT INTO {s}.scratch VALUES (1)"


@pytest.mark.parametrize(
    ("script", "schedules"),
    [
        pytest.param(
            [
                ("row", ["BEGIN", ROW]),
                ("savepoint", ["SAVEPOINT s", "APPEND a"]),
                ("rollback to", ["ROLLBACK TO SAVEPOINT s"]),
                ("append", ["APPEND a"]),
                ("commit", ["COMMIT"]),
            ],
            756,
            id="a savepoint's append rolled back, then an append",
        ),
        pytest.param(
            [
                ("row", ["BEGIN", ROW]),
                ("append", ["APPEND a"]),
                ("savepoint", ["SAVEPOINT s", "APPEND b"]),
                ("rollback to", ["ROLLBACK TO SAVEPOINT s"]),
                ("append", ["APPEND c"]),
                ("commit", ["COMMIT"]),
            ],
            1_260,
            id="a kept floor, a savepoint's append rolled back, an append",
        ),
        pytest.param(
            [
                ("row", ["BEGIN", ROW]),
                ("except", ["EXCEPT a"]),
                ("append", ["APPEND b"]),
                ("commit", ["COMMIT"]),
            ],
            420,
            id="an append undone by a plpgsql exception block",
        ),
        pytest.param(
            [
                ("savepoint", ["BEGIN", "SAVEPOINT s", "APPEND a"]),
                ("rollback to", ["ROLLBACK TO SAVEPOINT s"]),
                ("append", ["APPEND b"]),
                ("commit", ["COMMIT"]),
            ],
            420,
            id="an id from an append a savepoint rolled back",
        ),
    ],
)
async def test_savepoints_rolled_back(
    scenario: Scenario, monitor: Connection, script: Script, schedules: int
) -> None:
    """Appends undone by a savepoint or an exception block (taking the writer lock, the
    kept floor and the claimed id with them), then appends: with a plain appender and the
    reader, every order."""
    s = scenario
    await run(
        s,
        monitor,
        lambda: [s.scripted("W", 0, script), s.plain("P", 1, "z"), s.reader()],
        schedules,
    )


async def test_append_write_append(scenario: Scenario, monitor: Connection) -> None:
    """A transaction that appends, then writes a row, then appends again (its second append
    is a late one), with a late writer and the reader."""
    s = scenario
    script: Script = [
        ("append", ["BEGIN", "APPEND a"]),
        ("row", [ROW]),
        ("append", ["APPEND b"]),
        ("commit", ["COMMIT"]),
    ]
    await run(
        s, monitor, lambda: [s.scripted("W", 0, script), s.late("L", 1, "c"), s.reader()], 1_260
    )


async def test_an_append_to_another_schema_first(
    scenario: Scenario, monitor: Connection, postgres_dsn: str
) -> None:
    """A transaction that appends to another store's schema, then to this one's (it holds an
    id, and this schema's writer lock only from its second append), with a late writer and
    the reader."""
    s = scenario
    other = f"{s.schema}_other"
    async with open_postgres_store(postgres_dsn, schema=other):
        pass
    script: Script = [
        ("other", ["BEGIN", "OTHER z"]),
        ("append", ["APPEND a"]),
        ("commit", ["COMMIT"]),
    ]
    await run(
        s,
        monitor,
        lambda: [s.scripted("W", 0, script, other_schema=other), s.late("L", 1, "b"), s.reader()],
        560,
    )
