"""Behind a real PgBouncer: leadership is never shared, and the documented setup works.

PgBouncer runs with the configuration printed in docs/operations.md (pools ``app``, transaction
pooling, and ``app_sessions``, session pooling) in front of each server under test.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator

import pytest
import trio
import trio.lowlevel

from eventcore_trio import (
    LeadershipLost,
    LeadershipUnavailable,
    NewEvent,
    ProjectionState,
    StoreConnectionError,
    UnsupportedPooling,
    open_postgres_store,
)
from eventcore_trio.postgres import PostgresLeadership, PostgresStore, projector_lock_key
from eventcore_trio.projection import ProjectionContext, projector, run_projection
from eventcore_trio.testing import BackendHarness, PostgresHarness, StoreContract

from .. import pgbouncer
from ..helpers import eventually, leader_process
from ..test_docs import examples_run_by

if pgbouncer.binary() is None:
    # CI installs it (.ci/run); a developer without it skips, CI must not.
    if os.environ.get("CI"):
        raise RuntimeError("pgbouncer is not installed; .ci/run installs it with apt-get")
    pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)", allow_module_level=True)


@pytest.fixture(scope="module")
def bouncer(postgres_dsn_for_module: str) -> Iterator[pgbouncer.PgBouncer]:
    """A PgBouncer with the documented pools in front of the server under test."""
    proxy = pgbouncer.PgBouncer(postgres_dsn_for_module)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def postgres_dsn_for_module(postgres_server: object) -> str:
    """The server's DSN, for module-scoped fixtures."""
    return postgres_server if isinstance(postgres_server, str) else postgres_server.dsn  # type: ignore[attr-defined]


@pytest.fixture
async def direct(postgres_dsn: str, bouncer: pgbouncer.PgBouncer) -> AsyncIterator[PostgresStore]:
    """A store connected straight to the server, to watch locks from outside PgBouncer."""
    async with open_postgres_store(postgres_dsn, schema="bouncer_observer") as store:
        yield store


async def _advisory_locks(store: PostgresStore, key: int) -> list[int]:
    rows = await store.admin.fetch(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND granted "
        "AND ((classid::bigint << 32) | objid::bigint) = $1",
        key,
    )
    return [row["pid"] for row in rows]


def _through_transaction_pooling(bouncer: pgbouncer.PgBouncer, schema: str) -> PostgresHarness:
    return PostgresHarness(bouncer.dsn("app"), schema, statement_cache_size=0)


class TestTransactionPooling:
    """Lock sessions through transaction pooling are refused or lost, loudly, never shared."""

    async def test_leadership_is_refused_and_no_lock_is_left(
        self, bouncer: pgbouncer.PgBouncer, direct: PostgresStore
    ) -> None:
        """try_acquire through transaction pooling raises UnsupportedPooling, leaving no lock."""
        harness = _through_transaction_pooling(bouncer, "bouncer_refused")
        key = projector_lock_key(harness.schema, "dbl")
        async with harness.open_store() as store:
            for _ in range(5):
                with pytest.raises(UnsupportedPooling, match="transaction-pooling proxy"):
                    async with store.try_acquire("dbl"):
                        pytest.fail("led through transaction pooling")
                assert await _advisory_locks(direct, key) == []

    async def test_nested_acquisitions_never_both_succeed(
        self, bouncer: pgbouncer.PgBouncer, direct: PostgresStore
    ) -> None:
        """The issue's reproduction: two nested try_acquire on one store never both hold."""
        harness = _through_transaction_pooling(bouncer, "bouncer_nested")
        async with harness.open_store() as store:
            for _ in range(5):
                with pytest.raises((UnsupportedPooling, LeadershipUnavailable)):
                    async with store.try_acquire("dbl"), store.try_acquire("dbl"):
                        pytest.fail("two leaders")
        key = projector_lock_key(harness.schema, "dbl")
        assert await _advisory_locks(direct, key) == []

    async def test_concurrent_clients_never_lead_together_and_leave_no_orphan(
        self, bouncer: pgbouncer.PgBouncer, direct: PostgresStore
    ) -> None:
        """Many clients racing for one name through transaction pooling: at most one leads.

        Whatever gets past the first checks loses leadership loudly; once every client has
        exited, no server session holds the lock.
        """
        harness = _through_transaction_pooling(bouncer, "bouncer_race")
        leaders: set[int] = set()
        most = 0
        outcomes: list[str] = []

        async def client(number: int) -> None:
            nonlocal most
            async with harness.open_store() as store:
                for _ in range(10):
                    try:
                        async with store.try_acquire("race") as leadership:
                            leaders.add(number)
                            most = max(most, len(leaders))
                            try:
                                # Give the keepalive a chance to run on a moved session.
                                with trio.move_on_after(0.6):
                                    await leadership.wait_lost()
                            finally:
                                leaders.discard(number)
                            outcomes.append("led")
                    except (UnsupportedPooling, LeadershipUnavailable, LeadershipLost) as exc:
                        outcomes.append(type(exc).__name__)
                    except StoreConnectionError:
                        # Another client's clean-up may end the pooled session this client's
                        # statement shared with a wrongly held lock (documented): a refusal too.
                        outcomes.append("StoreConnectionError")

        async with trio.open_nursery() as nursery:
            for number in range(4):
                nursery.start_soon(client, number)
        assert most <= 1
        assert "UnsupportedPooling" in outcomes
        key = projector_lock_key(harness.schema, "race")

        async def no_lock_left() -> bool:
            # A pooled session ended as a last resort leaves pg_locks a moment later.
            return await _advisory_locks(direct, key) == []

        await eventually(no_lock_left, within=5)

    async def test_status_names_no_leader_from_transaction_pooling(
        self, bouncer: pgbouncer.PgBouncer, direct: PostgresStore
    ) -> None:
        """After refused attempts, status shows the projection stopped, with no leader."""
        harness = _through_transaction_pooling(bouncer, "bouncer_status")

        @projector("counted")
        async def counted(event: object, ctx: ProjectionContext) -> None:
            pass

        async with harness.open_store() as store:
            await store.append("s", [NewEvent("A", {})])
            with pytest.raises(UnsupportedPooling):
                await run_projection(counted, store)
            await store.save_checkpoint(
                "counted", (await store.read_events(None, limit=1))[0].position
            )
            (status,) = await store.projection_status()
            assert status.state is ProjectionState.STOPPED
            assert status.leader is None


class TestDocumentedSetup:
    """The pool through transaction pooling, lock and LISTEN sessions through session pooling."""

    async def test_the_guide_example_runs(
        self, bouncer: pgbouncer.PgBouncer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The PgBouncer example of docs/operations.md runs through this PgBouncer."""
        (example,) = examples_run_by("tests/postgres/test_pgbouncer.py")
        monkeypatch.setenv("APP_DSN", bouncer.dsn("app"))
        monkeypatch.setenv("APP_SESSION_DSN", bouncer.dsn("app_sessions"))
        await trio.to_thread.run_sync(
            exec, compile(example, "docs/operations.md", "exec"), {"__name__": "__docs__"}
        )

    async def test_a_projection_with_ctx_db_runs_and_new_processes_start(
        self, bouncer: pgbouncer.PgBouncer
    ) -> None:
        """Appends, reads, notifications and a transactional projection work; reopening works.

        Reopening is what failed with 42P05 "prepared statement already exists" when the
        pool kept asyncpg's statement cache behind transaction pooling.
        """
        harness = PostgresHarness(
            bouncer.dsn("app"), statement_cache_size=0, session_dsn=bouncer.dsn("app_sessions")
        )

        @projector("totals")
        async def totals(event: object, ctx: ProjectionContext) -> None:
            await ctx.db.execute(f'CREATE TABLE IF NOT EXISTS "{harness.schema}".seen (n int)')
            await ctx.db.execute(f'INSERT INTO "{harness.schema}".seen VALUES (1)')

        for round_ in range(3):
            async with harness.open_store() as store:
                await store.append("s", [NewEvent("A", {}), NewEvent("B", {})])
                result = await run_projection(totals, store)
                assert result.events_applied == 2
                seen = await store.admin.fetchval(f'SELECT count(*) FROM "{harness.schema}".seen')
                assert seen == 3 * round_ + 2
                with trio.fail_after(10):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(store.wait_for_events)
                        await trio.lowlevel.checkpoint()
                        await store.append("s", [NewEvent("C", {})])
                await run_projection(totals, store)


class TestSessionPoolingFailover:
    """Session pooling: a killed leader's lock is freed by PgBouncer and a standby takes over."""

    @pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
    async def test_standby_takes_over_from_a_killed_leader(
        self, bouncer: pgbouncer.PgBouncer, direct: PostgresStore, sig: signal.Signals
    ) -> None:
        """A leader process killed behind PgBouncer: the standby leads within seconds."""
        dsn = bouncer.dsn("app_sessions")
        schema = f"bouncer_failover_{sig.name.lower()}"
        async with (
            leader_process(dsn, schema, "proj") as (process, leader_pid),
            open_postgres_store(dsn, schema=schema) as store,
        ):
            key = projector_lock_key(schema, "proj")
            assert await _advisory_locks(direct, key) == [leader_pid]
            standing_by = trio.Event()
            took_over = trio.Event()

            async def standby() -> None:
                async with store.wait_acquire("proj", on_standby=standing_by.set) as lead:
                    assert isinstance(lead, PostgresLeadership)
                    assert await _advisory_locks(direct, key) == [lead.backend_pid]
                    took_over.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(standby)
                await standing_by.wait()
                process.send_signal(sig)
                with trio.fail_after(10):
                    await took_over.wait()


class TestSessionPoolingContract(StoreContract):
    """The whole backend contract through session pooling, one DSN for everything."""

    @pytest.fixture
    def harness(self, bouncer: pgbouncer.PgBouncer) -> BackendHarness:
        return PostgresHarness(bouncer.dsn("app_sessions"))


class TestSplitDsnContract(StoreContract):
    """The whole contract: the pool in transaction pooling, sessions in session pooling."""

    @pytest.fixture
    def harness(self, bouncer: pgbouncer.PgBouncer) -> BackendHarness:
        return PostgresHarness(
            bouncer.dsn("app"),
            statement_cache_size=0,
            session_dsn=bouncer.dsn("app_sessions"),
        )


async def test_lock_session_waits_are_watched_by_status(
    bouncer: pgbouncer.PgBouncer, direct: PostgresStore
) -> None:
    """Through session pooling, status names the leader and counts the standby."""
    async with open_postgres_store(bouncer.dsn("app_sessions"), schema="bouncer_st") as store:
        appended = await store.append("s", [NewEvent("A", {})])
        assert appended.position is not None
        await store.save_checkpoint("p", appended.position)
        async with store.try_acquire("p") as leadership, trio.open_nursery() as nursery:
            await leadership.report(ProjectionState.RUNNING)
            standing_by = trio.Event()

            async def standby() -> None:
                async with store.wait_acquire("p", on_standby=standing_by.set):
                    pass

            nursery.start_soon(standby)
            await standing_by.wait()

            async def counted() -> bool:
                (status,) = await store.projection_status()
                return status.standbys == 1

            await eventually(counted)
            (status,) = await store.projection_status()
            assert status.state is ProjectionState.RUNNING
            assert status.leader is not None
            assert status.leader.pid == os.getpid()
            nursery.cancel_scope.cancel()
