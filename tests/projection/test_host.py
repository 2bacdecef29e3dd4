"""The host's restart policy and what it logs, in virtual time: backoff that grows and starts
over when healthy, one traceback per distinct failure, FATAL stops a unit, a line per dead
letter."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import trio
import trio.testing

from eventcore_trio import NewEvent, Position, ProjectionState, RecordedEvent
from eventcore_trio.memory import MemoryStore, open_memory_store
from eventcore_trio.projection import (
    Failure,
    FailureStrategy,
    ProjectionConfig,
    ProjectionContext,
    projector,
    run_projection,
    run_projections,
)

CONFIG = ProjectionConfig(
    restart_initial_backoff=1.0, restart_max_backoff=8.0, restart_reset_after=60.0
)


async def _attempts_within(store: MemoryStore, seconds: float, handler: object) -> int:
    attempts = 0

    @projector("unlucky")
    async def unlucky(event: RecordedEvent, ctx: ProjectionContext) -> None:
        nonlocal attempts
        attempts += 1
        assert callable(handler)
        handler()

    with trio.move_on_after(seconds):
        await run_projections(store, [unlucky], CONFIG)
    return attempts


@projector("unlucky")
async def unlucky(event: RecordedEvent, ctx: ProjectionContext) -> None:
    pass


def _failing_checkpoint_loads(
    store: MemoryStore, monkeypatch: pytest.MonkeyPatch, fail: Callable[[int], object]
) -> list[float]:
    """Make the store's checkpoint load (the first thing a unit does once it leads) call
    *fail* with the attempt number; return the attempts' times. An error there is not the
    projector's (no on_error): the host restarts the unit with backoff."""
    load = store.load_checkpoint
    times: list[float] = []

    async def failing(name: str) -> Position | None:
        times.append(trio.current_time())
        outcome = fail(len(times))
        if isinstance(outcome, float):
            await trio.sleep(outcome)
            raise RuntimeError("flaky")
        return await load(name)

    monkeypatch.setattr(store, "load_checkpoint", failing)
    return times


def _host_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "eventcore_trio.host"]


class TestRestartBackoff:
    """A projector that fails at once every time backs off up to the cap."""

    async def test_backoff_grows_for_a_projector_that_always_fails(
        self, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Failures at 0, 1, 3, 7, 15, 23, 31, 39 s: eight attempts in 40 s, not forty."""

        def fail(attempt: int) -> None:
            raise RuntimeError("always")

        async with open_memory_store() as store:
            attempts = _failing_checkpoint_loads(store, monkeypatch, fail)
            with trio.move_on_after(40.5):
                await run_projections(store, [unlucky], CONFIG)
        assert attempts == [0, 1, 3, 7, 15, 23, 31, 39]

    async def test_a_lock_lost_again_and_again_backs_off_too(
        self, autojump_clock: trio.testing.MockClock
    ) -> None:
        """Leadership lost during every batch: the first loss retries at once, then backoff."""
        async with open_memory_store() as store:
            await store.append("s", [NewEvent("A", {})])
            attempts = await _attempts_within(
                store, 40.5, lambda: store.admin.revoke_leadership("unlucky")
            )
        # 0, 0 (first loss: straight back), then 1, 2, 4, 8, 8, 8 s apart: 0,0,1,3,7,15,23,31,39.
        assert attempts == 9

    @pytest.mark.parametrize("healthy_for", [59.0, 61.0])
    async def test_backoff_starts_over_only_after_a_healthy_run(
        self,
        autojump_clock: trio.testing.MockClock,
        monkeypatch: pytest.MonkeyPatch,
        healthy_for: float,
    ) -> None:
        """A run that lasted restart_reset_after seconds resets the delay; a shorter one not."""

        def fail(attempt: int) -> float:
            # The fourth run lives a while before failing; the others fail at once.
            return healthy_for if attempt == 4 else 0.0

        async with open_memory_store() as store:
            failures = _failing_checkpoint_loads(store, monkeypatch, fail)
            with trio.move_on_after(200):
                await run_projections(store, [unlucky], CONFIG)
        gap = failures[4] - failures[3] - healthy_for
        # After three quick failures the delay is 8 s (capped); after a healthy run, 1 s.
        assert gap == pytest.approx(1.0 if healthy_for >= 60 else 8.0)


class TestHostLogs:
    """What an operator reads: one traceback per distinct failure, the unit named once."""

    async def test_one_traceback_per_distinct_failure_then_a_line_per_retry(
        self,
        autojump_clock: trio.testing.MockClock,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Three of one failure, one of another, then a healthy run: two tracebacks, two
        "failed again" lines, one recovery line."""

        def fail(attempt: int) -> None:
            if attempt <= 3:
                raise RuntimeError("database says no")
            if attempt == 4:
                raise ValueError("something else")

        caplog.set_level(logging.INFO, logger="eventcore_trio")
        async with open_memory_store() as store:
            _failing_checkpoint_loads(store, monkeypatch, fail)
            with trio.move_on_after(200):
                await run_projections(store, [unlucky], CONFIG)
        lines = [
            (r.levelname, r.getMessage(), r.exc_info is not None)
            for r in _host_lines(caplog)
            if r.getMessage().startswith("unit unlucky")
        ]
        assert lines == [
            ("ERROR", "unit unlucky failed: RuntimeError: database says no; retry 1 in 1.0s", True),
            (
                "WARNING",
                "unit unlucky failed again: RuntimeError: database says no; retry 2 in 2.0s",
                False,
            ),
            (
                "WARNING",
                "unit unlucky failed again: RuntimeError: database says no; retry 3 in 4.0s",
                False,
            ),
            ("ERROR", "unit unlucky failed: ValueError: something else; retry 4 in 8.0s", True),
            ("INFO", "unit unlucky recovered: running for 60s after 4 failed attempts", False),
        ]

    async def test_messages_name_the_unit_once(
        self, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A lost lock and a FATAL stop: the host's lines name the unit exactly once."""
        caplog.set_level(logging.INFO, logger="eventcore_trio")
        async with open_memory_store() as store:
            await store.append("s", [NewEvent("A", {})])
            await _attempts_within(store, 2.5, lambda: store.admin.revoke_leadership("unlucky"))
        lines = [r.getMessage() for r in _host_lines(caplog) if "unlucky" in r.getMessage()]
        assert lines
        for line in lines:
            assert line.count("unlucky") == 1, line


def _never_ok(failure: Failure) -> FailureStrategy:
    return FailureStrategy.FATAL


class TestFatalUnderAHost:
    """FATAL means "do not retry": the host stops the unit, says so once, runs the others."""

    @pytest.mark.parametrize("balance", [True, False])
    async def test_the_unit_stops_for_good_and_the_others_run(
        self,
        autojump_clock: trio.testing.MockClock,
        caplog: pytest.LogCaptureFixture,
        balance: bool,
    ) -> None:
        """Two hosts, one standing by: each tries the unit at most once, then it is failed
        with nobody waiting for it, while the healthy projector keeps following events."""
        attempts = 0
        applied: list[str] = []

        @projector("doomed", on_error=_never_ok)
        async def doomed(event: RecordedEvent, ctx: ProjectionContext) -> None:
            nonlocal attempts
            attempts += 1
            raise RuntimeError("cannot apply this")

        @projector("healthy")
        async def healthy(event: RecordedEvent, ctx: ProjectionContext) -> None:
            applied.append(event.type)

        caplog.set_level(logging.INFO, logger="eventcore_trio")
        config = ProjectionConfig(
            restart_initial_backoff=1.0, restart_max_backoff=8.0, balance=balance
        )
        async with open_memory_store() as store, trio.open_nursery() as nursery:
            await store.append("s", [NewEvent("A", {})])
            for _ in range(2):
                await nursery.start(run_projections, store, [doomed, healthy], config)
            await trio.sleep(120)
            await store.append("s", [NewEvent("B", {})])
            await trio.sleep(1)
            status = {s.name: s for s in await store.projection_status()}
            nursery.cancel_scope.cancel()
        assert 1 <= attempts <= 2
        assert applied == ["A", "B"]
        assert status["doomed"].state is ProjectionState.FAILED
        assert (status["doomed"].leader, status["doomed"].standbys) == (None, 0)
        assert "cannot apply this" in (status["doomed"].last_error or "")
        stopped = [r for r in _host_lines(caplog) if "stopped: FATAL" in r.getMessage()]
        assert len(stopped) == attempts
        assert all(r.levelname == "ERROR" and r.exc_info is not None for r in stopped)
        assert stopped[0].getMessage().startswith("unit doomed stopped: FATAL failure: event at ")
        assert "RuntimeError: cannot apply this" in stopped[0].getMessage()
        assert not [r for r in _host_lines(caplog) if "retry" in r.getMessage()]


class TestDeadLetterLine:
    async def test_a_skipped_event_logs_one_warning(self, caplog: pytest.LogCaptureFixture) -> None:
        """The unit, the position, the event's type and id, and the error: once, at WARNING."""

        def skip(failure: Failure) -> FailureStrategy:
            return FailureStrategy.SKIP

        @projector("picky", on_error=skip)
        async def picky(event: RecordedEvent, ctx: ProjectionContext) -> None:
            if event.type == "Bad":
                raise ValueError("no bad events")

        async with open_memory_store() as store:
            await store.append("s", [NewEvent("Good", {}), NewEvent("Bad", {})])
            await run_projection(store, picky)
            bad = (await store.read_events(None, limit=10))[1]
        lines = [r for r in caplog.records if "dead letter" in r.getMessage()]
        assert [(r.levelname, r.getMessage()) for r in lines] == [
            (
                "WARNING",
                f"unit picky: skipped event {bad.position} (Bad, id {bad.event_id}, stream s) "
                "into a dead letter: ValueError: no bad events",
            )
        ]
