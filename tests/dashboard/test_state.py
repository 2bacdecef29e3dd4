"""The dashboard's snapshot and /metrics while the store cannot be read: the outage is
reported, the last values are not served as current."""

from __future__ import annotations

import datetime as dt

import httpx
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from eventcore_trio import (
    DatabaseError,
    ProjectionState,
    ProjectionStatus,
)
from eventcore_trio.dashboard import DashboardState, dashboard_app, poll_status, prometheus_metrics
from eventcore_trio.dashboard._state import READ_TIMEOUT, STALE_AFTER
from eventcore_trio.memory import MemoryStore, open_memory_store


def _running(unit: str) -> ProjectionStatus:
    return ProjectionStatus(
        name=unit,
        checkpoint=None,
        lag_events=7,
        lag_seconds=0.25,
        leader=None,
        standbys=0,
        state=ProjectionState.RUNNING,
        last_error=None,
        updated_at=dt.datetime.now(dt.UTC),
        dead_letters=0,
    )


def _samples(text: bytes) -> dict[str, list[float]]:
    return {
        family.name: [sample.value for sample in family.samples]
        for family in text_string_to_metric_families(text.decode())
    }


def up(state: DashboardState) -> bool:
    """``state.store_up``, read afresh (a property mypy would otherwise take as constant)."""
    return state.store_up


def snapshot_error(state: DashboardState) -> str | None:
    """``state.error``, read afresh."""
    return state.error


class FakeClock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestStaleness:
    """When the snapshot stops being current, and what /metrics serves then."""

    def test_up_after_a_read_down_after_a_failure_or_when_too_old(self) -> None:
        """Not up before the first read; up after one; down after a failed read, and after
        `STALE_AFTER` seconds without a read even though none failed."""
        clock = FakeClock()
        state = DashboardState(clock=clock)
        clock.now += 3
        assert not up(state)
        assert state.status_age() == 3
        state.update([_running("ledger")])
        assert up(state)
        assert state.status_age() == 0
        state.fail(DatabaseError("connection refused"))
        assert not up(state)
        clock.now += 2
        assert state.status_age() == 2
        state.update([_running("ledger")])
        assert up(state)
        clock.now += STALE_AFTER
        assert not up(state)
        assert state.status_age() == STALE_AFTER

    async def test_metrics_leave_the_last_values_out_while_down(self) -> None:
        """Up: the units with their values, ``eventcore_store_up 1`` and the age. Down:
        ``eventcore_store_up 0``, the growing age, and no per-unit series at all."""
        clock = FakeClock()
        state = DashboardState(clock=clock)
        state.update([_running("ledger")])
        async with open_memory_store() as store:
            app = dashboard_app(store, state)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
                when_up = _samples((await http.get("/metrics")).content)
                state.fail(DatabaseError("connection refused"))
                clock.now += 30
                when_down = _samples((await http.get("/metrics")).content)
        assert when_up["eventcore_store_up"] == [1]
        assert when_up["eventcore_status_age_seconds"] == [0]
        assert when_up["eventcore_projection_running"] == [1]
        assert when_up["eventcore_projection_lag_events"] == [7]
        assert when_down["eventcore_store_up"] == [0]
        assert when_down["eventcore_status_age_seconds"] == [30]
        unit_series = [name for name in when_down if name.startswith("eventcore_projection_")]
        assert unit_series
        assert all(when_down[name] == [] for name in unit_series)

    async def test_a_read_that_never_answers_is_a_failure(
        self, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A status read that hangs (a silent network partition) is cancelled after
        `READ_TIMEOUT` seconds and marks the snapshot stale; the poller carries on and
        recovers when reads answer again."""
        async with open_memory_store() as store, trio.open_nursery() as nursery:
            state = DashboardState()
            await nursery.start(poll_status, store, state)
            assert up(state)
            hang = trio.Event()
            real = store.projection_status

            async def projection_status() -> list[ProjectionStatus]:
                await hang.wait()
                return await real()

            monkeypatch.setattr(store, "projection_status", projection_status)
            await trio.sleep(READ_TIMEOUT + 2)
            assert not up(state)
            assert state.error is not None
            assert f"within {READ_TIMEOUT:g} s" in state.error
            hang.set()
            await trio.sleep(2)
            assert up(state)
            assert snapshot_error(state) is None
            nursery.cancel_scope.cancel()


async def test_prometheus_metrics_reports_a_store_it_cannot_read(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``prometheus_metrics(store)`` in your own server: a failed or hung read gives
    ``eventcore_store_up 0`` and no units instead of an exception."""

    async def fails() -> list[ProjectionStatus]:
        raise DatabaseError("connection refused")

    async def hangs() -> list[ProjectionStatus]:
        await trio.sleep_forever()
        raise AssertionError

    store: MemoryStore
    async with open_memory_store() as store:
        assert _samples(await prometheus_metrics(store))["eventcore_store_up"] == [1]
        for broken in (fails, hangs):
            monkeypatch.setattr(store, "projection_status", broken)
            samples = _samples(await prometheus_metrics(store))
            assert samples["eventcore_store_up"] == [0]
            assert samples["eventcore_projection_running"] == []
