"""The projection runtime on PostgreSQL: exactly-once through ctx.db, fencing, failover."""

from __future__ import annotations

import datetime as dt
import signal
import statistics
import sys
import uuid
from functools import partial
from pathlib import Path

import pytest
import trio

from eventcore_trio import (
    EventFilter,
    LeadershipLost,
    NewEvent,
    ProjectionFailed,
    ProjectionState,
    RecordedEvent,
    StreamAppend,
)
from eventcore_trio.postgres import PostgresStore, _bridge, projector_lock_key
from eventcore_trio.projection import (
    ProjectionConfig,
    ProjectionContext,
    projector,
    run_projection,
    run_projections,
)
from eventcore_trio.testing import (
    PostgresHarness,
    leader_pid,
    read_all,
    run_ready_process,
    wait_for_leader,
)

from ..helpers import eventually

HOST_SCRIPT = Path(__file__).with_name("host_process.py")


async def _create_app_schema(store: PostgresStore) -> str:
    app = f"app_{uuid.uuid4().hex[:10]}"
    await store.admin.execute(
        f'CREATE SCHEMA "{app}"; '
        f'CREATE TABLE "{app}".applied (id bigserial PRIMARY KEY, event_id uuid NOT NULL, '
        "tx bigint NOT NULL, seq bigint NOT NULL, applied_by int NOT NULL, "
        "applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
    return app


async def _record_applied(ctx: ProjectionContext, app: str, event: RecordedEvent) -> None:
    # The event's number stands in for its position: these tests check order by it.
    await ctx.db.execute(
        f'INSERT INTO "{app}".applied (event_id, tx, seq, applied_by) VALUES ($1, 0, $2, 0)',
        event.event_id,
        event.data["n"],
    )


async def _verify_exactly_once(store: PostgresStore, app: str) -> int:
    """Every Deposited event applied exactly once, in order; returns how many."""
    deposits = [e for e in await read_all(store, page_size=1000) if e.type == "Deposited"]
    rows = await store.admin.fetch(f'SELECT event_id, tx, seq FROM "{app}".applied ORDER BY id')
    applied = [r["event_id"] for r in rows]
    assert len(applied) == len(set(applied)), "an event was applied twice"
    assert applied == [e.event_id for e in deposits], "an event was lost or reordered"
    order = [(r["tx"], r["seq"]) for r in rows]
    assert order == sorted(order), "commits went backwards"
    return len(applied)


class TestTransactional:
    """What a projector writes through ctx.db commits with its checkpoint."""

    async def test_fatal_mid_run_leaves_read_model_matching_checkpoint(
        self, store: PostgresStore
    ) -> None:
        """After a fatal failure, the read model holds exactly the events up to the checkpoint."""
        app = await _create_app_schema(store)
        for n in range(120):
            await store.append(f"acc-{n % 5}", [NewEvent("Deposited", {"n": n})])

        @projector("ledger")
        async def ledger(event: RecordedEvent, ctx: ProjectionContext) -> None:
            await _record_applied(ctx, app, event)
            if event.data["n"] == 77:
                raise RuntimeError("disk full")

        with pytest.raises(ProjectionFailed):
            await run_projection(store, ledger, ProjectionConfig(batch_size=10))
        checkpoint = await store.load_checkpoint("ledger")
        applied = await store.admin.fetch(f'SELECT seq FROM "{app}".applied ORDER BY seq')
        assert [r["seq"] for r in applied] == list(range(77))
        events = await read_all(store)
        assert checkpoint == events[76].position

    async def test_status_reports_the_transaction_holding_readers_back(
        self, store: PostgresStore, postgres_dsn: str
    ) -> None:
        """An open event-writing transaction shows up in status as what holds progress
        back, once committed events wait behind it; one that writes no events does not."""
        await store.append("s", [NewEvent("Deposited", {})])

        @projector("noop")
        async def noop(event: RecordedEvent, ctx: ProjectionContext) -> None:
            pass

        await run_projection(store, noop)
        blocker = await _bridge.connect(
            postgres_dsn, application_name="blocker", connect_timeout=10
        )
        try:
            async with blocker.transaction():
                await blocker.execute("SELECT pg_current_xact_id()")
                await store.append("s", [NewEvent("Deposited", {})])
                status = {s.name: s for s in await store.projection_status()}["noop"]
                assert status.held_back_by is None  # not an event writer
                sql, args = store.admin.append_statement(
                    [StreamAppend("b", [NewEvent("Deposited", {})])]
                )
                await blocker.fetchrow(sql, *args)
                await store.append("s", [NewEvent("Deposited", {})])
                status = {s.name: s for s in await store.projection_status()}["noop"]
                assert status.lag_events == 2
                assert status.held_back_by is not None
                assert status.held_back_by.application_name == "blocker"
                assert status.held_back_by.pid == blocker.backend_pid
        finally:
            await blocker.close()


class TestNotifications:
    """Continuous runs are woken by NOTIFY and survive losing it."""

    async def test_progress_continues_when_the_listener_is_killed(
        self, store: PostgresStore
    ) -> None:
        """With the LISTEN session terminated, polling still delivers every event."""
        applied: list[int] = []
        changed = trio.Event()

        @projector("follower")
        async def follower(event: RecordedEvent, ctx: ProjectionContext) -> None:
            nonlocal changed
            applied.append(event.data["n"])
            changed.set()
            changed = trio.Event()

        async def wait_for(count: int) -> None:
            with trio.fail_after(10):
                while len(applied) < count:
                    await changed.wait()

        config = ProjectionConfig(continuous=True, poll_interval=0.3)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_projection, store, follower, config)
            await store.append("s", [NewEvent("E", {"n": 0})])
            await wait_for(1)

            async def listener_pids() -> list[int]:
                rows = await store.admin.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = "
                    "'eventcore-trio listener'"
                )
                return [r["pid"] for r in rows]

            killed = await listener_pids()
            assert len(killed) == 1
            await store.admin.execute("SELECT pg_terminate_backend($1)", killed[0])
            for n in range(1, 4):
                await store.append("s", [NewEvent("E", {"n": n})])
            await wait_for(4)

            async def listener_back() -> bool:
                pids = await listener_pids()
                return len(pids) == 1 and pids != killed

            await eventually(listener_back)
            nursery.cancel_scope.cancel()
        assert applied == [0, 1, 2, 3]


class TestHostShutdown:
    """Cancelling a host leaves nothing behind in the database."""

    async def test_cancel_releases_locks_and_closes_sessions(self, store: PostgresStore) -> None:
        """After cancellation, no advisory lock and no leader session remains."""

        def make(name: str) -> object:
            @projector(name)
            async def handler(event: RecordedEvent, ctx: ProjectionContext) -> None:
                pass

            return handler

        names = ["one", "two", "three"]
        async with trio.open_nursery() as nursery:
            await nursery.start(run_projections, store, [make(n) for n in names])
            sessions = await store.admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "
                "'eventcore-trio leader %'"
            )
            assert sessions == 3
            nursery.cancel_scope.cancel()
        keys = [projector_lock_key(store.schema, n) for n in names]
        locks = await store.admin.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 "
            "AND ((classid::bigint << 32) | objid::bigint) = ANY($1::bigint[])",
            keys,
        )
        sessions = await store.admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "
            "'eventcore-trio leader %'"
        )
        assert (locks, sessions) == (0, 0)


async def _run_host(
    harness: PostgresHarness,
    app: str,
    logfile: Path,
    slow: float = 0.0,
    *,
    task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
) -> None:
    argv = [sys.executable, str(HOST_SCRIPT), harness.schema, app, str(logfile), str(slow)]
    env = {"EVENTCORE_DSN": harness.dsn}
    await run_ready_process(argv, startup_limit=30, env=env, task_status=task_status)


async def _first_applied_after(
    store: PostgresStore, app: str, since: dt.datetime, not_by: int
) -> dt.datetime | None:
    first: dt.datetime | None = await store.admin.fetchval(
        f'SELECT min(applied_at) FROM "{app}".applied WHERE applied_at > $1 AND applied_by <> $2',
        since,
        not_by,
    )
    return first


async def _taken_over(store: PostgresStore, app: str, since: dt.datetime, not_by: int) -> bool:
    return await _first_applied_after(store, app, since, not_by) is not None


async def _caught_up(store: PostgresStore) -> bool:
    checkpoint = await store.load_checkpoint("ledger")
    last = await store.last_position(EventFilter(event_types=["Deposited"]))
    return checkpoint is not None and last is not None and checkpoint >= last


class TestFailover:
    """Leaders in real processes die; standbys take over; every event lands exactly once."""

    async def test_kill_9_leaders_repeatedly(
        self, store: PostgresStore, harness: PostgresHarness, tmp_path: Path
    ) -> None:
        """SIGKILL the leading host four times under load: exactly once, in order, fast."""
        app = await _create_app_schema(store)
        logfile = tmp_path / "hosts.log"
        takeovers: list[float] = []
        async with trio.open_nursery() as nursery:
            hosts = [await nursery.start(_run_host, harness, app, logfile) for _ in range(2)]
            writing = trio.CancelScope()

            async def writer() -> None:
                with writing:
                    n = 0
                    while True:
                        await store.append(
                            f"acc-{n % 10}",
                            [NewEvent("Deposited", {"n": n}), NewEvent("Noted", {"n": n})],
                        )
                        n += 1
                        await trio.sleep(0.005)

            nursery.start_soon(writer)
            for _ in range(4):
                with trio.fail_after(10):
                    leader = await wait_for_leader(store, "ledger")
                killed_at = await store.admin.fetchval("SELECT clock_timestamp()")
                victim = next(h for h in hosts if h.pid == leader)
                victim.send_signal(signal.SIGKILL)
                hosts.remove(victim)

                await eventually(partial(_taken_over, store, app, killed_at, leader))
                first_after = await _first_applied_after(store, app, killed_at, leader)
                assert first_after is not None
                takeovers.append((first_after - killed_at).total_seconds() * 1000)
                hosts.append(await nursery.start(_run_host, harness, app, logfile))
            writing.cancel()
            await eventually(lambda: _caught_up(store), within=30)
            nursery.cancel_scope.cancel()
        applied = await _verify_exactly_once(store, app)
        assert applied > 0
        print(
            f"\nfailover after kill -9: {len(takeovers)} takeovers, "
            f"p50 {statistics.median(takeovers):.0f} ms, max {max(takeovers):.0f} ms, "
            f"{applied} events applied exactly once"
        )

    async def test_terminated_lock_session_during_slow_batch(
        self, store: PostgresStore, harness: PostgresHarness, tmp_path: Path
    ) -> None:
        """pg_terminate_backend on the leader mid-batch: no commit, it stands by, exact result."""
        app = await _create_app_schema(store)
        logfile = tmp_path / "hosts.log"
        for n in range(40):
            await store.append(f"acc-{n % 4}", [NewEvent("Deposited", {"n": n})])
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                await nursery.start(_run_host, harness, app, logfile, 0.05)

            async def mid_batch() -> bool:
                count = await store.admin.fetchval(f'SELECT count(*) FROM "{app}".applied')
                return bool(count) and await leader_pid(store, "ledger") is not None

            await eventually(mid_batch, within=30)
            leader = await leader_pid(store, "ledger")
            before = await store.load_checkpoint("ledger")
            lock_pid = await store.admin.fetchval(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = $1",
                projector_lock_key(store.schema, "ledger"),
            )
            await store.admin.execute("SELECT pg_terminate_backend($1)", lock_pid)

            async def deposed_leader_stands_by() -> bool:
                text = logfile.read_text() if logfile.exists() else ""
                return any(
                    f" {leader} " in line and "standing by again" in line
                    for line in text.splitlines()
                )

            await eventually(deposed_leader_stands_by)
            await eventually(lambda: _caught_up(store), within=60)
            nursery.cancel_scope.cancel()
        after = await store.load_checkpoint("ledger")
        assert before is not None
        assert after is not None
        assert after > before
        assert await _verify_exactly_once(store, app) == 40


class TestCancellation:
    """Cancelling a run at any moment leaves the read model and the checkpoint in step."""

    async def test_cancel_at_many_moments(self, store: PostgresStore) -> None:
        """After each cancellation: lock released, session closed, model matches checkpoint."""
        app = await _create_app_schema(store)
        for n in range(150):
            await store.append(f"acc-{n % 3}", [NewEvent("Deposited", {"n": n})])
        events = await read_all(store)

        @projector("ledger")
        async def ledger(event: RecordedEvent, ctx: ProjectionContext) -> None:
            await _record_applied(ctx, app, event)

        config = ProjectionConfig(batch_size=7)
        for delay in (0.0, 0.001, 0.002, 0.004, 0.008, 0.016, 0.03, 0.05, 0.08):
            with trio.move_on_after(delay):
                await run_projection(store, ledger, config)
            checkpoint = await store.load_checkpoint("ledger")
            expected = sum(1 for e in events if checkpoint is not None and e.position <= checkpoint)
            assert await store.admin.fetchval(f'SELECT count(*) FROM "{app}".applied') == expected

            async def session_gone() -> bool:
                # The client has closed its end; the server's backend exits a moment later.
                count = await store.admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                    "'eventcore-trio leader ledger'"
                )
                return bool(count == 0)

            await eventually(session_gone)
            async with store.try_acquire("ledger") as leadership:
                assert leadership.is_held
        await run_projection(store, ledger, config)
        rows = await store.admin.fetch(f'SELECT seq FROM "{app}".applied ORDER BY id')
        assert [r["seq"] for r in rows] == list(range(150))


class TestFencing:
    """A session that ends under a statement is a lost lock, not a projector failure."""

    async def test_terminated_during_a_ctx_db_statement(self, store: PostgresStore) -> None:
        """Killing the lock session under a running ctx.db query raises LeadershipLost."""
        await store.append("s", [NewEvent("E", {})])
        in_query = trio.Event()

        @projector("sleepy")
        async def sleepy(event: RecordedEvent, ctx: ProjectionContext) -> None:
            in_query.set()
            # Shielded, so the error reaches the handler before the runtime's cancellation:
            # the runtime must still see a lost lock, not a failing projector.
            with trio.CancelScope(shield=True):
                await ctx.db.execute("SELECT pg_sleep(30)")

        async with trio.open_nursery() as nursery:
            lost = trio.Event()

            async def run() -> None:
                with pytest.raises(LeadershipLost):
                    await run_projection(store, sleepy)
                lost.set()

            nursery.start_soon(run)
            await in_query.wait()

            async def query_running() -> bool:
                return bool(
                    await store.admin.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' "
                        "AND state = 'active'"
                    )
                )

            await eventually(query_running)
            await store.admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'eventcore-trio leader sleepy'"
            )
            with trio.fail_after(5):
                await lost.wait()
        assert await store.load_checkpoint("sleepy") is None
        status = {s.name: s for s in await store.projection_status()}["sleepy"]
        assert status.state is not ProjectionState.FAILED
