"""The projection batch on PostgreSQL: known transaction state, fenced commits, server timeouts."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator

import pytest
import trio

from eventcore_trio import (
    BatchInterrupted,
    DatabaseError,
    LeadershipLost,
    NewEvent,
    RecordedEvent,
    open_postgres_store,
)
from eventcore_trio.postgres import PostgresLeadership, PostgresStore
from eventcore_trio.projection import (
    Failure,
    FailureStrategy,
    ProjectionConfig,
    ProjectionContext,
    projector,
    run_projection,
)
from eventcore_trio.testing import PostgresHarness

from ..conftest import oldest_server_param


async def _table(store: PostgresStore) -> str:
    table = f'"{store.schema}".rm_{uuid.uuid4().hex[:8]}'
    await store.admin.execute(f"CREATE TABLE {table} (position text PRIMARY KEY)")
    return table


async def _session_in_transaction(leadership: PostgresLeadership) -> bool:
    # The server reports the session's transaction status after every statement.
    async with leadership._use() as connection:
        await connection.execute("SELECT 1")
        return connection.in_transaction()


class TestInterruptedStatements:
    """A ctx.db statement cancelled mid-flight never leaves a transaction open or half-committed."""

    async def test_an_interrupted_statement_dooms_the_batch(self, store: PostgresStore) -> None:
        """After a cancelled statement the batch refuses statements and never commits."""
        table = await _table(store)
        appended = await store.append("s", [NewEvent("A", {})])
        assert appended.position is not None
        async with store.try_acquire("p") as leadership:
            assert isinstance(leadership, PostgresLeadership)

            async def interrupted_batch() -> None:
                async with leadership.open_batch() as batch:
                    with trio.CancelScope() as scope:
                        scope.cancel()
                        await batch.db.execute(f"INSERT INTO {table} VALUES ('first')")
                    assert isinstance(batch.failure, BatchInterrupted)
                    with pytest.raises(BatchInterrupted):
                        await batch.db.execute(f"INSERT INTO {table} VALUES ('second')")
                    assert appended.position is not None
                    await batch.save_checkpoint(None, appended.position)

            with pytest.raises(BatchInterrupted, match="interrupted mid-flight"):
                await interrupted_batch()
            assert not await _session_in_transaction(leadership)
            assert leadership.is_held
        assert await store.admin.fetchval(f"SELECT count(*) FROM {table}") == 0
        assert await store.load_checkpoint("p") is None

    async def test_a_cancelled_commit_is_all_or_nothing(self, store: PostgresStore) -> None:
        """Cancelled while committing: the session ends up outside any transaction, and the
        writes and the checkpoint are both there or both absent."""
        table = await _table(store)
        for attempt in range(20):
            appended = await store.append("s", [NewEvent("A", {})])
            assert appended.position is not None
            async with store.try_acquire("p") as leadership:
                assert isinstance(leadership, PostgresLeadership)
                before = await store.load_checkpoint("p")
                with trio.CancelScope() as scope:
                    async with leadership.open_batch() as batch:
                        await batch.db.execute(f"INSERT INTO {table} VALUES ($1)", str(attempt))
                        await batch.save_checkpoint(before, appended.position)
                        scope.cancel()
                if leadership.is_held:
                    assert not await _session_in_transaction(leadership)
            written = await store.admin.fetchval(
                f"SELECT count(*) FROM {table} WHERE position = $1", str(attempt)
            )
            saved = await store.load_checkpoint("p") == appended.position
            assert (written == 1) == saved

    async def test_timeouts_around_single_statements_never_lose_a_batch(
        self, store: PostgresStore
    ) -> None:
        """The issue's reproduction: random 0-2 ms timeouts around a handler's first ctx.db call.

        Before the fix a third of them left the lock session idle in a transaction that the
        runner counted as committed; now each interrupted batch is retried, and what the run
        reports as applied is exactly what the read model and the checkpoint hold.
        """
        table = await _table(store)
        await store.append("s", [NewEvent("A", {"n": n}) for n in range(40)])
        rng = random.Random(12)
        interrupted = 0

        class Timed:
            name = "timed"
            filter = None

            async def apply(self, event: RecordedEvent, ctx: ProjectionContext) -> None:
                with trio.move_on_after(rng.uniform(0, 0.002)):
                    await ctx.db.execute(f"INSERT INTO {table} VALUES ($1)", str(event.position))

            def on_error(self, failure: Failure) -> FailureStrategy:
                nonlocal interrupted
                assert isinstance(failure.error, BatchInterrupted)
                interrupted += 1
                return FailureStrategy.RETRY

        # A batch commits only when none of its four statements timed out, which may take
        # a dozen tries on a busy machine: the delay between them capped at 10 ms, not the
        # default 10 s, or the retries spent most of a minute asleep.
        config = ProjectionConfig(
            batch_size=4, max_retries=1000, retry_initial_backoff=0.001, retry_max_backoff=0.01
        )
        result = await run_projection(store, Timed(), config)
        rows = await store.admin.fetch(f"SELECT position FROM {table}")
        assert len(rows) == result.events_applied == 40
        events = await store.read_events(None, limit=100)
        assert await store.load_checkpoint("timed") == events[-1].position
        # Some statements did time out, or this test would prove nothing.
        assert interrupted > 0


class TestFencing:
    """A projector that releases the lock through ctx.db cannot commit."""

    async def test_unlock_all_through_ctx_db_fails_the_batch_and_loses_leadership(
        self, store: PostgresStore
    ) -> None:
        """pg_advisory_unlock_all() on the lock session: nothing commits, LeadershipLost."""
        table = await _table(store)
        await store.append("s", [NewEvent("A", {})])

        @projector("rogue")
        async def rogue(event: RecordedEvent, ctx: ProjectionContext) -> None:
            await ctx.db.execute(f"INSERT INTO {table} VALUES ($1)", str(event.position))
            await ctx.db.execute("SELECT pg_advisory_unlock_all()")

        with pytest.raises(LeadershipLost, match="pg_advisory_unlock_all"):
            await run_projection(store, rogue)
        assert await store.admin.fetchval(f"SELECT count(*) FROM {table}") == 0
        assert await store.load_checkpoint("rogue") is None

    async def test_the_keepalive_notices_a_released_lock(self, store: PostgresStore) -> None:
        """A lock released on its live session is noticed within about a second."""
        async with store.try_acquire("p") as leadership:
            assert isinstance(leadership, PostgresLeadership)
            async with leadership._use() as connection:
                await connection.execute("SELECT pg_advisory_unlock_all()")
            with trio.fail_after(5):
                await leadership.wait_lost()
            assert leadership.lost_reason is not None
            assert "no longer held by its session" in leadership.lost_reason


@pytest.fixture
async def timeouts_database(postgres_dsn: str) -> AsyncIterator[str]:
    """A database whose default statement and lock timeouts are 200 ms."""
    name = f"timeouts_{uuid.uuid4().hex[:8]}"
    async with open_postgres_store(postgres_dsn, schema="admin") as admin:
        await admin.admin.execute(f"CREATE DATABASE {name}")
        await admin.admin.execute(
            f"ALTER DATABASE {name} SET statement_timeout = '200ms'; "
            f"ALTER DATABASE {name} SET lock_timeout = '200ms'; "
            f"ALTER DATABASE {name} SET idle_in_transaction_session_timeout = '200ms'"
        )
        yield postgres_dsn.rsplit("/", 1)[0] + f"/{name}"
        await admin.admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


class TestServerTimeouts:
    """Database-level timeouts do not reach lock sessions, and 57014 is no lost connection."""

    async def test_a_standby_outwaits_statement_and_lock_timeouts(
        self, timeouts_database: str
    ) -> None:
        """A standby waits past statement_timeout and lock_timeout, then takes over."""
        harness = PostgresHarness(timeouts_database)
        async with harness.open_store() as store:
            standing_by = trio.Event()
            took_over = trio.Event()

            async def standby() -> None:
                async with store.wait_acquire("p", on_standby=standing_by.set):
                    took_over.set()

            async with trio.open_nursery() as nursery:
                async with store.try_acquire("p"):
                    nursery.start_soon(standby)
                    await standing_by.wait()
                    # Five statement timeouts' worth of waiting, in which a standby that
                    # fails makes the nursery cancel this wait and raise.
                    with trio.move_on_after(1.0):
                        await took_over.wait()
                    assert not took_over.is_set()
                with trio.fail_after(5):
                    await took_over.wait()

    async def test_a_slow_batch_outlives_the_idle_in_transaction_timeout(
        self, timeouts_database: str
    ) -> None:
        """A handler slower than idle_in_transaction_session_timeout still commits."""
        harness = PostgresHarness(timeouts_database)
        async with harness.open_store() as store:
            table = await _table(store)
            await store.append("s", [NewEvent("A", {})])

            @projector("slow")
            async def slow(event: RecordedEvent, ctx: ProjectionContext) -> None:
                await ctx.db.execute(f"INSERT INTO {table} VALUES ($1)", str(event.position))
                await trio.sleep(0.5)

            result = await run_projection(store, slow)
            assert result.events_applied == 1

    async def test_a_statement_timeout_on_the_pool_is_a_database_error(
        self, timeouts_database: str
    ) -> None:
        """57014 from statement_timeout is a DatabaseError naming it, not a lost connection."""
        async with PostgresHarness(timeouts_database).open_store() as store:
            with pytest.raises(DatabaseError, match="statement_timeout") as raised:
                await store.admin.fetchval("SELECT pg_sleep(1)")
            assert raised.value.sqlstate == "57014"
            assert await store.admin.fetchval("SELECT 1") == 1


class TestCommitErrors:
    """A commit the database refuses on a live session is the failing event's, for on_error."""

    async def test_a_deferred_constraint_at_commit_reaches_on_error(
        self, store: PostgresStore
    ) -> None:
        """The batch is applied one event at a time; only the culprit is dead-lettered."""
        table = f'"{store.schema}".deferred'
        await store.admin.execute(
            f"CREATE TABLE {table} (k int UNIQUE DEFERRABLE INITIALLY DEFERRED)"
        )
        await store.append("s", [NewEvent("A", {"k": k}) for k in (1, 2, 2, 3)])
        failures: list[Failure] = []

        class Unique:
            name = "unique"
            filter = None

            async def apply(self, event: RecordedEvent, ctx: ProjectionContext) -> None:
                await ctx.db.execute(f"INSERT INTO {table} VALUES ($1)", event.data["k"])

            def on_error(self, failure: Failure) -> FailureStrategy:
                failures.append(failure)
                return FailureStrategy.SKIP

        result = await run_projection(store, Unique(), ProjectionConfig(batch_size=10))
        assert (result.events_applied, result.dead_letters) == (3, 1)
        (failure,) = failures
        assert isinstance(failure.error, DatabaseError)
        assert failure.error.sqlstate == "23505"
        assert isinstance(failure.event, RecordedEvent)
        assert failure.event.stream_version == 3
        rows = await store.admin.fetch(f"SELECT k FROM {table} ORDER BY k")
        assert [r["k"] for r in rows] == [1, 2, 3]


class TestQueuedWrites:
    """ctx.db.queue: one write per event in the handler, sent once per batch."""

    async def test_queued_writes_commit_with_the_checkpoint_exactly_once(
        self, store: PostgresStore
    ) -> None:
        """Every event's queued upsert lands once; the read model matches the checkpoint."""
        table = f'"{store.schema}".totals'
        await store.admin.execute(f"CREATE TABLE {table} (stream text PRIMARY KEY, n bigint)")
        for i in range(250):
            await store.append(f"s{i % 7}", [NewEvent("E", {"i": i})])
        upsert = (
            f"INSERT INTO {table} AS t VALUES ($1, 1) "
            "ON CONFLICT (stream) DO UPDATE SET n = t.n + 1"
        )

        @projector("queued")
        async def queued(event: RecordedEvent, ctx: ProjectionContext) -> None:
            ctx.db.queue(upsert, event.stream_id)

        result = await run_projection(store, queued, ProjectionConfig(batch_size=40))
        assert result.events_applied == 250
        rows = await store.admin.fetch(f"SELECT stream, n FROM {table} ORDER BY stream")
        assert {r["stream"]: r["n"] for r in rows} == {
            f"s{k}": sum(1 for i in range(250) if i % 7 == k) for k in range(7)
        }

    async def test_a_read_sees_the_queued_writes_in_order(self, store: PostgresStore) -> None:
        """Read-your-writes inside the batch: a fetch sends what is queued first, in order."""
        table = await _table(store)
        await store.append("s", [NewEvent("E", {}) for _ in range(5)])
        seen: list[int] = []

        @projector("reader")
        async def reader(event: RecordedEvent, ctx: ProjectionContext) -> None:
            ctx.db.queue(f"INSERT INTO {table} VALUES ($1)", str(event.position))
            ctx.db.queue(f"DELETE FROM {table} WHERE position = $1", "none")
            seen.append(await ctx.db.fetchval(f"SELECT count(*) FROM {table}"))

        await run_projection(store, reader, ProjectionConfig(batch_size=5))
        assert seen == [1, 2, 3, 4, 5]

    async def test_a_failing_queued_write_lands_on_its_own_event(
        self, store: PostgresStore
    ) -> None:
        """The batch fails at the flush; applied one at a time, only the culprit is skipped."""
        table = await _table(store)
        await store.append("s", [NewEvent("E", {"n": n}) for n in range(12)])
        failures: list[Failure] = []

        def skip(failure: Failure) -> FailureStrategy:
            failures.append(failure)
            return FailureStrategy.SKIP

        @projector("picky-queue", on_error=skip)
        async def picky(event: RecordedEvent, ctx: ProjectionContext) -> None:
            # Event 7 writes a key that event 3 already wrote: a unique violation.
            key = "dup" if event.data["n"] in (3, 7) else str(event.position)
            ctx.db.queue(f"INSERT INTO {table} VALUES ($1)", key)

        result = await run_projection(store, picky, ProjectionConfig(batch_size=12))
        assert result.dead_letters == 1
        assert [getattr(f.event, "data", {}).get("n") for f in failures] == [7]
        assert isinstance(failures[0].error, DatabaseError)
        assert failures[0].error.sqlstate == "23505"
        assert await store.admin.fetchval(f"SELECT count(*) FROM {table}") == 11
        (letter,) = await store.dead_letters("picky-queue")
        assert isinstance(letter.event, RecordedEvent)
        assert letter.event.data["n"] == 7

    async def test_queue_refuses_what_is_not_sql(self, store: PostgresStore) -> None:
        """A non-string statement is refused at once, before anything is sent."""
        await store.append("s", [NewEvent("E", {})])
        errors: list[BaseException] = []

        def skip(failure: Failure) -> FailureStrategy:
            errors.append(failure.error)
            return FailureStrategy.SKIP

        @projector("bad-queue", on_error=skip)
        async def bad(event: RecordedEvent, ctx: ProjectionContext) -> None:
            ctx.db.queue(b"INSERT", 1)  # type: ignore[arg-type]

        await run_projection(store, bad)
        assert [type(e).__name__ for e in errors] == ["InvalidArgument"]


async def _exit_table(store: PostgresStore) -> str:
    name = f'"{store.schema}".exit_{uuid.uuid4().hex[:8]}'
    await store.admin.execute(f"CREATE TABLE {name} (n int)")
    return name


async def _session_state(store: PostgresStore, pid: int) -> str:
    return str(await store.admin.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pid))


@pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
class TestBatchExits:
    """The batch is its own async context manager: every way out of its block rolls back
    or commits exactly as when the leadership drove it (a review of issue 30)."""

    @pytest.mark.parametrize(
        "error",
        [
            KeyboardInterrupt(),
            ValueError("handler"),
            BaseExceptionGroup("g", [KeyboardInterrupt()]),
            ExceptionGroup("g", [ValueError("x")]),
        ],
        ids=["keyboard", "exception", "base-group", "group"],
    )
    async def test_an_error_in_the_block_rolls_back_and_keeps_the_lock(
        self, store: PostgresStore, error: BaseException
    ) -> None:
        """Whatever ends the block (KeyboardInterrupt, an error, a group of either), the
        batch rolls back, the lock stays held, the session is idle and the next batch
        commits."""
        table = await _exit_table(store)
        position = (await store.append("s", [NewEvent("E", {})])).position
        assert position is not None
        async with store.try_acquire("exits") as leadership:

            async def fail() -> None:
                async with leadership.open_batch() as batch:
                    await batch.db.execute(f"INSERT INTO {table} VALUES (1)")
                    await batch.save_checkpoint(None, position)
                    raise error

            with pytest.raises(type(error)):
                await fail()
            assert leadership.is_held
            assert await _session_state(store, leadership.backend_pid) == "idle"
            # The session is usable: a further batch commits.
            async with leadership.open_batch() as batch:
                await batch.db.execute(f"INSERT INTO {table} VALUES (2)")
                await batch.save_checkpoint(None, position)
        assert await store.admin.fetchval(f"SELECT array_agg(n) FROM {table}") == [2]
        assert await store.load_checkpoint("exits") == position

    async def test_cancelled_in_the_block_rolls_back(self, store: PostgresStore) -> None:
        """A cancelled block writes nothing and leaves the session idle, the lock held."""
        table = await _exit_table(store)
        async with store.try_acquire("exits-cancelled") as leadership:
            with trio.CancelScope() as scope:
                async with leadership.open_batch() as batch:
                    await batch.db.execute(f"INSERT INTO {table} VALUES (1)")
                    scope.cancel()
                    await trio.lowlevel.checkpoint()
            assert scope.cancelled_caught
            assert leadership.is_held
            assert await _session_state(store, leadership.backend_pid) == "idle"
        assert await store.admin.fetchval(f"SELECT count(*) FROM {table}") == 0
