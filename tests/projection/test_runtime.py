"""The projection runtime on every backend: run_projection, failures, the host, status."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial

import pytest
import trio

from eventcore_trio import (
    CheckpointAhead,
    DatabaseNotAvailable,
    EventDecodeError,
    EventFilter,
    InvalidArgument,
    LeadershipLost,
    LeadershipUnavailable,
    NewEvent,
    Position,
    ProjectionFailed,
    ProjectionRunning,
    ProjectionState,
    RecordedEvent,
    Store,
    UndecodableEvent,
)
from eventcore_trio._positions import position_parts
from eventcore_trio.memory import MemoryStore
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.projection import (
    Failure,
    FailureStrategy,
    ProjectionConfig,
    ProjectionContext,
    projector,
    replay_dead_letters,
    run_projection,
    run_projections,
)
from eventcore_trio.testing import BackendHarness, MemoryHarness, PostgresHarness, read_all

from ..helpers import eventually


def numbered(n: int, *, kind: str = "E") -> list[NewEvent]:
    return [NewEvent(kind, {"n": i}) for i in range(n)]


class Recorder:
    """A projector that records what it applied; it can fail on chosen values.

    Its memory is not transactional: a batch that rolls back (and is applied again) leaves
    its events behind, the at-least-once behaviour of effects outside ``ctx.db``. So
    `applied` keeps one entry per position, in first-applied order; exactly-once is checked
    with ``ctx.db`` in tests/postgres/test_projection.py.
    """

    def __init__(
        self,
        name: str = "recorder",
        *,
        event_types: Sequence[str] | None = None,
        fail_on: set[int] | None = None,
        failures_before_success: int = 0,
        strategy: FailureStrategy = FailureStrategy.FATAL,
    ) -> None:
        self.name = name
        self.filter = EventFilter(event_types=event_types)
        self.seen: dict[object, int] = {}
        self.failures: list[Failure] = []
        self.fail_on = fail_on or set()
        self.remaining_failures = failures_before_success
        self.strategy = strategy
        # Replaced after every change, so waiters can await the next one.
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[Recorder], bool], within: float = 10) -> None:
        """Wait until *predicate(self)* holds (it is checked after every applied event)."""
        with trio.fail_after(within):
            while not predicate(self):
                await self._changed.wait()

    async def apply(self, event: RecordedEvent, ctx: ProjectionContext) -> None:
        n = event.data["n"]
        if n in self.fail_on and self.remaining_failures > 0:
            self.remaining_failures -= 1
            raise ValueError(f"cannot apply {n}")
        self.seen.setdefault(event.position, n)
        self._changed.set()
        self._changed = trio.Event()

    @property
    def applied(self) -> list[int]:
        return list(self.seen.values())

    def on_error(self, failure: Failure) -> FailureStrategy:
        self.failures.append(failure)
        return self.strategy


FAST = ProjectionConfig(retry_initial_backoff=0.01, retry_max_backoff=0.02)


class RuntimeContract:
    """What run_projection and run_projections promise, whatever the backend."""

    async def test_catch_up_across_many_pages_exactly_once(self, store: Store) -> None:
        """Thousands of events, a small batch size: every match applied once, in order."""
        for chunk in range(20):
            await store.append(f"s{chunk % 7}", numbered(100) + [NewEvent("Other", {"n": -1})] * 3)
        recorder = Recorder(event_types=["E"])
        result = await run_projection(store, recorder, ProjectionConfig(batch_size=37))
        assert recorder.applied == list(range(100)) * 20
        assert result.events_applied == 2000
        again = await run_projection(store, recorder, ProjectionConfig(batch_size=37))
        assert again.events_applied == 0
        await store.append("s1", numbered(5))
        third = await run_projection(store, recorder, ProjectionConfig(batch_size=37))
        assert third.events_applied == 5
        assert recorder.applied[-5:] == list(range(5))
        assert await store.load_checkpoint("recorder") == third.checkpoint

    async def test_fatal_stops_before_the_failing_event(self, store: Store) -> None:
        """FATAL raises ProjectionFailed; the checkpoint stays just before the failing event."""
        await store.append("s", numbered(50))
        recorder = Recorder(fail_on={30}, failures_before_success=100)
        with pytest.raises(ProjectionFailed) as info:
            await run_projection(store, recorder, ProjectionConfig(batch_size=8))
        assert isinstance(info.value.__cause__, ValueError)
        assert info.value.projector == "recorder"
        events = await store.read_stream("s")
        assert info.value.position == events[30].position
        assert await store.load_checkpoint("recorder") == events[29].position
        assert recorder.applied[-1] == 29
        status = {s.name: s for s in await store.projection_status()}["recorder"]
        assert status.state is ProjectionState.FAILED
        assert status.last_error is not None
        assert "cannot apply 30" in status.last_error

    async def test_skip_records_dead_letter_and_replay_resolves_it(self, store: Store) -> None:
        """SKIP continues past a dead letter, which can be listed and replayed."""
        await store.append("s", numbered(10))
        recorder = Recorder(fail_on={4}, failures_before_success=1, strategy=FailureStrategy.SKIP)
        result = await run_projection(store, recorder)
        assert recorder.applied == [0, 1, 2, 3, 5, 6, 7, 8, 9]
        assert result.dead_letters == 1
        letters = await store.dead_letters("recorder")
        assert len(letters) == 1
        assert letters[0].event.position == (await store.read_stream("s"))[4].position
        assert letters[0].error_message == "cannot apply 4"
        assert letters[0].error_type.endswith("ValueError")
        replay = await replay_dead_letters(store, recorder)
        assert (replay.replayed, replay.failed) == (1, 0)
        assert recorder.applied[-1] == 4
        assert await store.dead_letters("recorder") == []

    async def test_retry_backs_off_then_succeeds(self, store: Store) -> None:
        """RETRY rolls back, waits, and applies the event once it succeeds."""
        await store.append("s", numbered(6))
        recorder = Recorder(fail_on={3}, failures_before_success=2, strategy=FailureStrategy.RETRY)
        await run_projection(store, recorder, FAST)
        assert recorder.applied == [0, 1, 2, 3, 4, 5]
        assert [f.retries for f in recorder.failures] == [0, 1]

    async def test_retry_becomes_fatal_after_max_retries(self, store: Store) -> None:
        """A RETRY that never succeeds fails after max_retries."""
        await store.append("s", numbered(3))
        recorder = Recorder(fail_on={1}, failures_before_success=99, strategy=FailureStrategy.RETRY)
        config = ProjectionConfig(max_retries=3, retry_initial_backoff=0.01)
        with pytest.raises(ProjectionFailed) as info:
            await run_projection(store, recorder, config)
        assert info.value.retries == 3
        assert recorder.applied == [0]

    async def test_undecodable_event_reaches_on_error(
        self, store: Store, harness: BackendHarness
    ) -> None:
        """A stored event that does not decode goes to on_error, and SKIP dead-letters it."""
        await store.append("a", numbered(2))
        await harness.store_undecodable(store, "broken")
        await store.append("b", numbered(2))
        recorder = Recorder(strategy=FailureStrategy.SKIP)
        await run_projection(store, recorder)
        assert recorder.applied == [0, 1, 0, 1]
        assert len(recorder.failures) == 1
        assert isinstance(recorder.failures[0].error, EventDecodeError)
        assert isinstance(recorder.failures[0].event, UndecodableEvent)
        letters = await store.dead_letters("recorder")
        assert isinstance(letters[0].event, UndecodableEvent)
        assert letters[0].event.raw_data.replace(" ", "") == "[1,2,3]"

    async def test_undecodable_event_is_fatal_by_default(
        self, store: Store, harness: BackendHarness
    ) -> None:
        """Without an on_error, an undecodable event stops the run: never a silent drop."""
        await harness.store_undecodable(store, "broken")

        @projector("plain")
        async def plain(event: RecordedEvent, ctx: ProjectionContext) -> None:
            pass

        with pytest.raises(ProjectionFailed) as info:
            await run_projection(store, plain)
        assert isinstance(info.value.__cause__, EventDecodeError)

    async def test_leadership_unavailable_or_waited_for(self, store: Store) -> None:
        """Another leader makes a run fail fast, or wait with wait_for_leadership=True."""
        await store.append("s", numbered(3))
        recorder = Recorder()
        async with store.try_acquire("recorder"):
            with pytest.raises(LeadershipUnavailable, match="wait_for_leadership"):
                await run_projection(store, recorder)
        async with trio.open_nursery() as nursery, store.try_acquire("recorder"):
            await nursery.start(
                run_projection, store, recorder, ProjectionConfig(wait_for_leadership=True)
            )
            assert recorder.applied == []
        assert recorder.applied == [0, 1, 2]

    async def test_lost_leadership_cancels_the_batch(
        self, store: Store, harness: BackendHarness
    ) -> None:
        """When the lock session ends mid-batch, that batch never commits and the run raises."""
        await store.append("s", numbered(10))
        entered = trio.Event()

        class Stuck:
            name = "stuck"
            filter = EventFilter()

            async def apply(self, event: RecordedEvent, ctx: ProjectionContext) -> None:
                if event.data["n"] == 5:
                    entered.set()
                    await trio.sleep_forever()

        leaderships: list[object] = []
        original = store.try_acquire

        def spy(name: str) -> object:
            manager = original(name)

            class Wrapper:
                async def __aenter__(self) -> object:
                    leadership = await manager.__aenter__()
                    leaderships.append(leadership)
                    return leadership

                async def __aexit__(self, *exc: object) -> object:
                    return await manager.__aexit__(*exc)  # type: ignore[arg-type]

            return Wrapper()

        store.try_acquire = spy  # type: ignore[assignment, method-assign]
        async with trio.open_nursery() as nursery:
            lost = trio.Event()

            async def run() -> None:
                with pytest.raises(LeadershipLost):
                    await run_projection(store, Stuck(), ProjectionConfig(batch_size=10))
                lost.set()

            nursery.start_soon(run)
            await entered.wait()
            await harness.end_leadership_session(store, leaderships[0])  # type: ignore[arg-type]
            with trio.fail_after(5):
                await lost.wait()
        assert await store.load_checkpoint("stuck") is None

    async def test_continuous_wakes_on_new_events(self, store: Store) -> None:
        """A continuous run applies a new event long before its poll interval."""
        recorder = Recorder()
        config = ProjectionConfig(continuous=True, poll_interval=60)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_projection, store, recorder, config)
            await store.append("s", numbered(1))
            await recorder.wait_until(lambda r: r.applied == [0])
            nursery.cancel_scope.cancel()

    async def test_host_runs_projectors_and_releases_on_cancel(self, store: Store) -> None:
        """The host runs every projector; cancelling it releases every leadership."""
        first, second = Recorder("first"), Recorder("second", event_types=["X"])
        await store.append("s", numbered(3) + numbered(2, kind="X"))
        async with trio.open_nursery() as nursery:
            await nursery.start(run_projections, store, [first, second])
            await first.wait_until(lambda r: len(r.applied) == 5)
            await second.wait_until(lambda r: len(r.applied) == 2)
            running = {s.name: s.state for s in await store.projection_status()}
            assert running == {"first": ProjectionState.RUNNING, "second": ProjectionState.RUNNING}
            nursery.cancel_scope.cancel()
        for name in ("first", "second"):
            async with store.try_acquire(name) as leadership:
                assert leadership.is_held

    async def test_standby_host_takes_over(self, harness: BackendHarness) -> None:
        """A second host stands by and takes over when the leading host stops."""
        leader, standby = Recorder("p"), Recorder("p")
        async with harness.open_store() as one, harness.open_store() as two:
            await one.append("s", numbered(2))
            async with trio.open_nursery() as outer:
                async with trio.open_nursery() as leading:
                    await leading.start(run_projections, one, [leader])
                    await leader.wait_until(lambda r: len(r.applied) == 2)
                    await outer.start(run_projections, two, [standby])

                    # start() returns as the standby begins to wait; on PostgreSQL its lock
                    # request reaches the server a moment later.
                    async def standing_by() -> bool:
                        status = {s.name: s for s in await one.projection_status()}["p"]
                        return status.standbys == 1

                    await eventually(standing_by)
                    status = {s.name: s for s in await one.projection_status()}["p"]
                    assert status.state is ProjectionState.RUNNING
                    assert status.standbys == 1
                    assert status.leader is not None
                    assert status.leader.pid == os.getpid()
                    leading.cancel_scope.cancel()
                await one.append("s", numbered(1, kind="E"))
                await standby.wait_until(lambda r: r.applied == [0])
                outer.cancel_scope.cancel()
        assert leader.applied == [0, 1]

    async def test_host_stops_a_fatal_projector_without_disturbing_others(
        self, store: Store
    ) -> None:
        """A projector that fails FATAL stops (not retried: status shows it failed, with
        nobody waiting for it) while the others keep going; restarts with backoff, for
        failures that are not the projector's, are in tests/projection/test_host.py."""
        flaky = Recorder("flaky", fail_on={1}, failures_before_success=2)
        steady = Recorder("steady")
        config = ProjectionConfig(restart_initial_backoff=0.05, restart_max_backoff=0.1)
        await store.append("s", numbered(3))
        async with trio.open_nursery() as nursery:
            await nursery.start(run_projections, store, [flaky, steady], config)
            await steady.wait_until(lambda r: r.applied == [0, 1, 2])

            async def failed() -> bool:
                status = {s.name: s for s in await store.projection_status()}["flaky"]
                return status.state is ProjectionState.FAILED

            await eventually(failed)
            await store.append("s", numbered(1, kind="E"))
            await steady.wait_until(lambda r: len(r.applied) == 4)
            status = {s.name: s for s in await store.projection_status()}["flaky"]
            assert (status.state, status.leader, status.standbys) == (
                ProjectionState.FAILED,
                None,
                0,
            )
            nursery.cancel_scope.cancel()
        assert flaky.applied == [0]
        assert len(flaky.failures) == 1

    async def test_reset_refused_while_running_then_rebuilds(self, store: Store) -> None:
        """reset_projection refuses a running projection; afterwards the next run rebuilds."""
        recorder = Recorder()
        await store.append("s", numbered(4))
        async with trio.open_nursery() as nursery:
            await nursery.start(run_projections, store, [recorder])
            with pytest.raises(ProjectionRunning):
                await store.reset_projection("recorder")
            nursery.cancel_scope.cancel()
        await store.reset_projection("recorder")
        assert await store.load_checkpoint("recorder") is None
        rebuilt = Recorder()
        result = await run_projection(store, rebuilt)
        assert rebuilt.applied == [0, 1, 2, 3]
        assert result.events_applied == 4

    async def test_reset_waits_when_asked(self, store: Store) -> None:
        """reset_projection(wait=True) waits for the running instance to stop."""
        recorder = Recorder()
        await store.append("s", numbered(2))
        await run_projection(store, recorder)
        reset_done = trio.Event()
        async with trio.open_nursery() as nursery:
            async with store.try_acquire("recorder"):

                async def reset() -> None:
                    await store.reset_projection("recorder", wait=True)
                    reset_done.set()

                nursery.start_soon(reset)

                await eventually(partial(_reset_waits, store, "recorder"))
                assert not reset_done.is_set()
                # A waiting reset is an operator's command, not a standby.
                status = {s.name: s for s in await store.projection_status()}
                assert status["recorder"].standbys == 0
                assert status["recorder"].state is ProjectionState.RUNNING
            with trio.fail_after(10):
                await reset_done.wait()
        assert await store.load_checkpoint("recorder") is None

    async def test_status_reports_lag(self, store: Store) -> None:
        """Lag counts only matching events after the checkpoint."""
        recorder = Recorder(event_types=["E"])
        await store.append("s", numbered(2))
        await run_projection(store, recorder)
        await store.append("s", numbered(3) + numbered(4, kind="Other"))
        status = {s.name: s for s in await store.projection_status()}["recorder"]
        assert status.lag_events == 3
        assert status.lag_seconds >= 0
        assert status.state is ProjectionState.STOPPED
        assert status.leader is None
        await run_projection(store, recorder)
        status = {s.name: s for s in await store.projection_status()}["recorder"]
        assert (status.lag_events, status.lag_seconds) == (0, 0.0)

    async def test_a_stored_checkpoint_ahead_of_the_store_is_shown_and_never_run_from(
        self, store: Store
    ) -> None:
        """A checkpoint beyond every position the store can have produced, stored before
        such saves were refused (or by hand): status flags it, says to reset, and counts
        every matching event as lag; the projection refuses to run from it (CheckpointAhead)
        instead of applying nothing; after a reset it rebuilds everything."""
        recorder = Recorder(event_types=["E"])
        await store.append("s", numbered(3) + numbered(2, kind="Other"))
        await run_projection(store, recorder)
        await store.append("s", numbered(2))
        last = (await read_all(store))[-1].position
        tx, seq = position_parts(last)
        for ahead in (Position(2**62, 5), Position(tx, seq + 10**6)):
            await _store_checkpoint(store, "recorder", ahead)
            status = {s.name: s for s in await store.projection_status()}["recorder"]
            assert (status.checkpoint, status.checkpoint_ahead) == (ahead, True)
            assert status.lag_events == 5  # every matching event: what a reset rebuilds
            assert status.last_error is not None
            assert "ahead of every position" in status.last_error
            assert "store.reset_projection('recorder')" in status.last_error
            with pytest.raises(CheckpointAhead) as info:
                await store.load_checkpoint("recorder")
            assert (info.value.position, info.value.stored) == (ahead, True)
            with pytest.raises(CheckpointAhead):
                await run_projection(store, recorder)
        assert recorder.applied == [0, 1, 2]
        await store.reset_projection("recorder")
        rebuilt = Recorder(event_types=["E"])
        await run_projection(store, rebuilt)
        assert rebuilt.applied == [0, 1, 2, 0, 1]
        status = {s.name: s for s in await store.projection_status()}["recorder"]
        assert (status.checkpoint_ahead, status.lag_events, status.last_error) == (False, 0, None)

    async def test_batch_hook_gets_whole_batches(self, store: Store) -> None:
        """A projector with apply_batch receives each batch at once."""
        await store.append("s", numbered(10))
        batches: list[list[int]] = []

        class Batching:
            name = "batching"
            filter = EventFilter()

            async def apply(self, event: RecordedEvent, ctx: ProjectionContext) -> None:
                raise AssertionError("apply_batch is used instead")

            async def apply_batch(
                self, events: Sequence[RecordedEvent], ctx: ProjectionContext
            ) -> None:
                batches.append([e.data["n"] for e in events])

        await run_projection(store, Batching(), ProjectionConfig(batch_size=4))
        assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]

    async def test_invalid_projectors_and_configs(self, store: Store) -> None:
        """Bad projectors, names and configs are refused before anything runs."""
        with pytest.raises(InvalidArgument, match="async"):
            projector("sync")(lambda event, ctx: None)  # type: ignore[arg-type, return-value]
        with pytest.raises(InvalidArgument):
            projector("bad\nname")
        with pytest.raises(InvalidArgument, match="not a projector"):
            await run_projection(store, object())
        with pytest.raises(InvalidArgument, match="ProjectionConfig"):
            await run_projection(store, Recorder(), {"batch_size": 5})  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="distinct"):
            await run_projections(store, [Recorder("same"), Recorder("same")])
        # One projector where a list is expected: said, not a TypeError from iterating it.
        with pytest.raises(InvalidArgument, match=r"run_projections\(store, \[projector\]\)"):
            await run_projections(store, Recorder())  # type: ignore[arg-type]


class TestMemoryRuntime(RuntimeContract):
    """The runtime on the in-memory store."""

    @pytest.fixture
    def harness(self) -> BackendHarness:
        return MemoryHarness()

    async def test_ctx_db_is_not_available(self, store: Store) -> None:
        """ctx.db on the memory store fails the projection with a clear error."""
        await store.append("s", numbered(1))

        @projector("needs-db")
        async def needs_db(event: RecordedEvent, ctx: ProjectionContext) -> None:
            await ctx.db.execute("SELECT 1")

        with pytest.raises(ProjectionFailed) as info:
            await run_projection(store, needs_db)
        assert isinstance(info.value.__cause__, DatabaseNotAvailable)
        assert "open_postgres_store" in str(info.value.__cause__)


class TestPostgresRuntime(RuntimeContract):
    """The runtime on PostgreSQL."""

    @pytest.fixture
    def harness(self, postgres_dsn: str) -> BackendHarness:
        return PostgresHarness(postgres_dsn)


async def _store_checkpoint(store: Store, name: str, position: Position) -> None:
    # Store *position* as *name*'s checkpoint by hand, past the store's checks, as a version
    # before them or an operator's UPDATE could.
    if isinstance(store, MemoryStore):
        store.admin.state.checkpoints[name] = position
        return
    assert isinstance(store, PostgresStore)
    tx, seq = position_parts(position)
    await store.admin.execute(
        f'UPDATE "{store.schema}".subscriptions SET tx = $2, position = $3 '
        "WHERE subscription_name = $1",
        name,
        tx,
        seq,
    )


async def _reset_waits(store: Store, name: str) -> bool:
    # Whether a reset_projection(wait=True) of *name* is blocked behind the leader.
    if isinstance(store, MemoryStore):
        return store.admin.state.reset_waiting[name] == 1
    assert isinstance(store, PostgresStore)
    waiting = await store.admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND application_name LIKE $1",
        f"% reset {name}",
    )
    return bool(waiting == 1)
