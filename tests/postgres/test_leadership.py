"""Leadership on PostgreSQL: dedicated sessions, keepalives, crashes and cancellation."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from eventcore_trio import (
    LeadershipLost,
    LeadershipUnavailable,
    NewEvent,
    Position,
    ProjectionState,
    RecordedEvent,
)
from eventcore_trio.postgres import PostgresLeadership, PostgresStore, projector_lock_key
from eventcore_trio.postgres._lock_session import KEEPALIVE_SETTINGS
from eventcore_trio.projection import (
    FailureStrategy,
    ProjectionContext,
    projector,
    replay_dead_letters,
    run_projection,
)
from eventcore_trio.testing import PostgresHarness

from ..helpers import eventually, leader_process


async def _lock_holders(store: PostgresStore, name: str) -> list[int]:
    key = projector_lock_key(store.schema, name)
    rows = await store.admin.fetch(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
        "AND ((classid::bigint << 32) | objid::bigint) = $1::bigint",
        key,
    )
    return [r["pid"] for r in rows]


async def _sessions_named(store: PostgresStore, application_name: str) -> int:
    return int(
        await store.admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            application_name,
        )
    )


class TestLockKey:
    """The lock key derivation."""

    def test_key_is_stable(self) -> None:
        """The documented derivation gives the same key in every process and version."""
        assert projector_lock_key("eventcore", "balances") == projector_lock_key(
            "eventcore", "balances"
        )
        # Golden value: changing the derivation would split leadership across versions.
        assert projector_lock_key("eventcore", "balances") == -972409962845981126

    def test_keys_are_namespaced(self) -> None:
        """Schemas and names give different keys."""
        keys = {
            projector_lock_key("eventcore", "a"),
            projector_lock_key("eventcore", "b"),
            projector_lock_key("other", "a"),
        }
        assert len(keys) == 3


class TestDedicatedSession:
    """The lock lives on a connection of its own."""

    async def test_lock_is_held_by_a_session_outside_the_pool(self, store: PostgresStore) -> None:
        """The advisory lock's holder is the dedicated session, not any pooled one."""
        pool_pids = {
            r["pid"]
            for r in await store.admin.fetch(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'eventcore-trio'"
            )
        }
        async with store.try_acquire("proj") as leadership:
            assert isinstance(leadership, PostgresLeadership)
            holders = await _lock_holders(store, "proj")
            assert holders == [leadership.backend_pid]
            assert leadership.backend_pid not in pool_pids
            # Pool traffic does not disturb the lock.
            for _ in range(10):
                await store.read_events(None, limit=1)
            assert await _lock_holders(store, "proj") == [leadership.backend_pid]
        assert await _lock_holders(store, "proj") == []

    async def test_keepalives_are_set_on_the_lock_session(self, store: PostgresStore) -> None:
        """Server-side TCP keepalives, user timeout and connection checks on the lock session."""
        async with store.try_acquire("proj") as leadership:
            assert isinstance(leadership, PostgresLeadership)
            async with leadership._use() as connection:
                expected = {**KEEPALIVE_SETTINGS, "client_connection_check_interval": "2000"}
                for setting, value in expected.items():
                    shown = await connection.fetchval(
                        "SELECT setting FROM pg_settings WHERE name = $1", setting
                    )
                    assert shown == value, setting

    async def test_exit_closes_the_connection(self, store: PostgresStore) -> None:
        """Leaving the block closes the dedicated session."""
        async with store.try_acquire("proj"):
            assert await _sessions_named(store, "eventcore-trio leader proj") == 1
        assert await _sessions_named(store, "eventcore-trio leader proj") == 0

    async def test_refused_attempt_closes_its_connection(self, store: PostgresStore) -> None:
        """A try that finds the name taken does not leave a session behind."""
        async with store.try_acquire("proj"):
            for _ in range(3):
                with pytest.raises(LeadershipUnavailable):
                    async with store.try_acquire("proj"):
                        pytest.fail("two leaders")
            assert await _sessions_named(store, "eventcore-trio leader proj") == 1

    async def test_cancellation_closes_the_connection(self, store: PostgresStore) -> None:
        """Cancelling the leading task releases the lock and closes the session."""
        with trio.CancelScope() as scope:
            async with store.try_acquire("proj"):
                scope.cancel()
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert await _lock_holders(store, "proj") == []
        assert await _sessions_named(store, "eventcore-trio leader proj") == 0

    async def test_work_after_loss_is_fenced(
        self, store: PostgresStore, harness: PostgresHarness
    ) -> None:
        """Once the session is gone, work on the lock connection raises LeadershipLost."""
        async with store.try_acquire("proj") as leadership:
            assert isinstance(leadership, PostgresLeadership)
            await harness.end_leadership_session(store, leadership)
            with trio.fail_after(5):
                await leadership.wait_lost()
            with pytest.raises(LeadershipLost, match="proj"):
                async with leadership._use():
                    pytest.fail("ran work without the lock")


class TestStandbyWaits:
    """A standby waits in slices, so it holds no snapshot for long."""

    async def test_create_index_concurrently_completes_while_a_standby_waits(
        self, store: PostgresStore
    ) -> None:
        """CIC waits for every older snapshot; a standby's wait must not be one for long."""
        table = f'"{store.schema}".cic_probe'
        await store.admin.execute(f"CREATE TABLE {table} (n int)")
        async with store.try_acquire("busy"), trio.open_nursery() as nursery:
            waiting = trio.Event()

            async def standby() -> None:
                async with store.wait_acquire("busy", on_standby=waiting.set):
                    raise AssertionError("the leader never let go")

            nursery.start_soon(standby)
            await waiting.wait()
            await eventually(lambda: _waits_for_a_lock(store))
            with trio.fail_after(20):
                await store.admin.execute(f"CREATE INDEX CONCURRENTLY cic_probe_n ON {table} (n)")
            # Still standing by (between two slices it may briefly not be waiting).
            await eventually(lambda: _waits_for_a_lock(store))
            nursery.cancel_scope.cancel()

    async def test_a_waiting_standby_takes_over_at_once(self, store: PostgresStore) -> None:
        """Slices do not slow a takeover: the lock goes to the waiting standby."""
        took_over = trio.Event()
        async with trio.open_nursery() as nursery:
            waiting = trio.Event()

            async def standby() -> None:
                async with store.wait_acquire("quick", on_standby=waiting.set):
                    took_over.set()

            async with store.try_acquire("quick"):
                nursery.start_soon(standby)
                await waiting.wait()
                await eventually(lambda: _waits_for_a_lock(store))
                # Across at least one slice boundary (2 s).
                await trio.sleep(2.5)
                released = trio.current_time()
            with trio.fail_after(5):
                await took_over.wait()
            assert trio.current_time() - released < 1

    async def test_a_standby_takes_over_at_lock_timeout_zero(self, store: PostgresStore) -> None:
        """The statement granted the lock also ends the standby's wait slices: the new
        leader's session has no lock_timeout (its batches may wait for row locks)."""
        async with trio.open_nursery() as nursery:
            waiting = trio.Event()
            setting: list[str] = []

            async def standby() -> None:
                async with store.wait_acquire("slices", on_standby=waiting.set) as leadership:
                    assert isinstance(leadership, PostgresLeadership)
                    async with leadership._use() as connection:
                        setting.append(
                            await connection.fetchval("SELECT current_setting('lock_timeout')")
                        )

            async with store.try_acquire("slices"):
                nursery.start_soon(standby)
                await waiting.wait()
                await eventually(lambda: _waits_for_a_lock(store))
        assert setting == ["0"]

    async def test_a_stopping_leader_lets_go_before_it_has_unwound(
        self, store: PostgresStore
    ) -> None:
        """Cancelling the holder ends the lock session at once, while the holder is still
        unwinding (its batch's rollback, its close), so a standby takes over as after a
        crash; nothing the holder runs afterwards on that session can commit."""
        unwound = trio.Event()
        took_over = trio.Event()
        holding = trio.Event()
        rolled_back: list[BaseException] = []

        async def holder(scope: trio.CancelScope) -> None:
            with scope:
                async with store.try_acquire("stopping") as leadership:
                    holding.set()
                    try:
                        await trio.sleep_forever()
                    finally:
                        # A slow unwinding, shielded: the lock must not wait for it.
                        with trio.CancelScope(shield=True):
                            await unwound.wait()
                            try:
                                async with leadership.open_batch() as batch:
                                    await batch.save_checkpoint(None, Position(1, 1))
                            except LeadershipLost as exc:
                                rolled_back.append(exc)

        async def standby() -> None:
            async with store.wait_acquire("stopping"):
                took_over.set()
                await unwound.wait()

        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()
            nursery.start_soon(holder, scope)
            await holding.wait()
            nursery.start_soon(standby)
            await eventually(lambda: _waits_for_a_lock(store))
            scope.cancel()
            try:
                with trio.fail_after(5):
                    await took_over.wait()
            finally:
                unwound.set()
        assert len(rolled_back) == 1
        assert await store.load_checkpoint("stopping") is None


async def _waits_for_a_lock(store: PostgresStore) -> bool:
    waiting = await store.admin.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    )
    return bool(waiting)


class TestCrashedLeader:
    """A leader process that dies frees its lock."""

    @pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
    async def test_killed_process_releases_the_lock(
        self, store: PostgresStore, harness: PostgresHarness, sig: signal.Signals
    ) -> None:
        """After the leading process is killed, another process can take the lock."""
        async with leader_process(harness.dsn, harness.schema, "proj") as (process, leader_pid):
            assert await _lock_holders(store, "proj") == [leader_pid]
            with pytest.raises(LeadershipUnavailable):
                async with store.try_acquire("proj"):
                    pytest.fail("two leaders")
            process.send_signal(sig)
            await process.wait()
            # No event tells us when the server has reaped the session: poll pg_locks.
            with trio.fail_after(10):
                while await _lock_holders(store, "proj"):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            async with store.try_acquire("proj") as leadership:
                assert leadership.is_held


class TestStatusOfLockHolders:
    """Status says who holds a projection's lock: a leader, a reset, a replay, or nobody."""

    @staticmethod
    @asynccontextmanager
    async def _lock_held_by(store: PostgresStore, app: str) -> AsyncIterator[None]:
        # A session that takes the projection's lock without reporting anything.
        async with store.admin.connection(app) as connection:
            await connection.execute(
                "SELECT pg_advisory_lock($1)", projector_lock_key(store.schema, "p")
            )
            yield

    async def _status(self, store: PostgresStore) -> tuple[ProjectionState, object]:
        (status,) = await store.projection_status()
        return status.state, status.leader

    async def test_a_leader_is_named_only_while_its_session_holds_the_lock(
        self, store: PostgresStore
    ) -> None:
        """After the leader goes, a session that took the lock is not shown as that leader."""
        await store.save_checkpoint("p", (await _position(store)))
        async with store.try_acquire("p") as leadership:
            await leadership.report(ProjectionState.RUNNING)
            state, leader = await self._status(store)
            assert state is ProjectionState.RUNNING
            assert leader is not None
        async with self._lock_held_by(store, "eventcore-trio leader p"):
            assert await self._status(store) == (ProjectionState.RUNNING, None)
        assert await self._status(store) == (ProjectionState.STOPPED, None)

    async def test_a_reset_holding_the_lock_shows_as_resetting(self, store: PostgresStore) -> None:
        """The lock held by a reset's session is RESETTING, not RUNNING."""
        await store.save_checkpoint("p", (await _position(store)))
        async with self._lock_held_by(store, "eventcore-trio reset p"):
            assert await self._status(store) == (ProjectionState.RESETTING, None)

    async def test_a_replay_shows_as_replaying(self, store: PostgresStore) -> None:
        """While replay_dead_letters holds the lock, status says REPLAYING, with no leader."""
        await store.append("s", [NewEvent("A", {})])
        replaying = trio.Event()
        release = trio.Event()
        rejecting = True

        @projector("p", on_error=lambda failure: FailureStrategy.SKIP)
        async def p(event: RecordedEvent, ctx: ProjectionContext) -> None:
            if rejecting:
                raise ValueError("not yet")
            replaying.set()
            await release.wait()

        await run_projection(store, p)
        rejecting = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replay_dead_letters, store, p)
            await replaying.wait()
            (status,) = await store.projection_status()
            assert status.state is ProjectionState.REPLAYING
            assert status.leader is None
            release.set()
        (status,) = await store.projection_status()
        assert status.state is ProjectionState.STOPPED
        assert status.dead_letters == 0


async def _position(store: PostgresStore) -> Position:
    appended = await store.append("s", [NewEvent("A", {})])
    assert appended.position is not None
    return appended.position
