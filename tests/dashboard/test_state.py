"""The dashboard's snapshot and /metrics while the store cannot be read: the outage is
reported (and logged, rate-limited), the last values are not served as current; failovers
apart from hand-offs; every live host; which store; times to the second."""

from __future__ import annotations

import datetime as dt
import logging

import httpx
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from eventcore_trio import (
    DatabaseError,
    HostState,
    LeaderInfo,
    LiveHost,
    Position,
    ProjectionState,
    ProjectionStatus,
)
from eventcore_trio.dashboard import (
    DashboardState,
    dashboard_app,
    poll_status,
    prometheus_metrics,
    prometheus_text,
)
from eventcore_trio.dashboard._state import OUTAGE_LOG_INTERVAL, READ_TIMEOUT, STALE_AFTER
from eventcore_trio.memory import MemoryStore, open_memory_store

from .promtool import check_metrics


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


def _led(
    unit: str,
    pid: int | None,
    *,
    host: str = "h",
    runnable_by: int | None = None,
    lacking: tuple[int, ...] = (),
) -> ProjectionStatus:
    """*unit* led by process *pid* on *host* (None: nobody), with balancing hosts' coverage."""
    return ProjectionStatus(
        name=unit,
        checkpoint=None,
        lag_events=0,
        lag_seconds=0.0,
        leader=None if pid is None else LeaderInfo(pid=pid, host=host, application_name="a"),
        standbys=1,
        state=ProjectionState.RUNNING if pid else ProjectionState.STANDBY,
        last_error=None,
        updated_at=dt.datetime.now(dt.UTC),
        dead_letters=0,
        runnable_by=runnable_by,
        lacking_hosts=tuple(LeaderInfo(pid=p, host="h", application_name="a") for p in lacking),
    )


def _moves(state: DashboardState, kind: str) -> list[tuple[str, int, int]]:
    return [(m["unit"], m["from"]["pid"], m["to"]["pid"]) for m in state.snapshot()[kind]]


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


class TestMoves:
    """Which leader changes are failovers and which are hand-offs."""

    def test_two_hosts_starting_together_make_no_failover(self) -> None:
        """Host 10 leads both units at first, then balancing hands one to host 11 while 10
        keeps the other: a hand-off, and no failover; first leaders are neither."""
        state = DashboardState()
        state.update([_led("a", None), _led("b", None)])
        state.update([_led("a", 10), _led("b", None)])
        state.update([_led("a", 10), _led("b", 10)])
        state.update([_led("a", 10), _led("b", None)])  # released, the new leader not shown yet
        state.update([_led("a", 10), _led("b", 11)])
        assert _moves(state, "failovers") == []
        assert _moves(state, "handoffs") == [("b", 10, 11)]

    def test_a_leader_that_is_gone_fails_over(self) -> None:
        """The unit's last leader is in no record of the read that shows the new one (it
        died): a failover, also across a read without a leader."""
        state = DashboardState()
        for pid in (10, 10, None, 11, 11):
            state.update([_led("ledger", pid)])
        assert _moves(state, "failovers") == [("ledger", 10, 11)]
        assert _moves(state, "handoffs") == []

    def test_an_old_leader_still_listed_as_a_live_host_hands_off(self) -> None:
        """The old leader leads nothing now but is a live host that lacks some unit: it
        lives, so the move was planned."""
        state = DashboardState()
        state.update([_led("a", 10), _led("b", None, runnable_by=2)])
        state.update([_led("a", 11), _led("b", None, runnable_by=1, lacking=(10,))])
        assert _moves(state, "handoffs") == [("a", 10, 11)]
        assert _moves(state, "failovers") == []

    def test_the_same_pid_on_another_machine_is_another_process(self) -> None:
        """Processes are told apart by machine and pid."""
        state = DashboardState()
        state.update([_led("a", 10, host="m1")])
        state.update([_led("a", 10, host="m2")])
        [move] = state.snapshot()["failovers"]
        assert (move["from"]["host"], move["to"]["host"]) == ("m1", "m2")


def _host(pid: int, leading: str = "", standing_by: str = "", runs: str | None = None) -> LiveHost:
    """A live host process *pid* on machine "h" (units named by single letters)."""
    return LiveHost(
        host_id=f"id{pid}",
        process=LeaderInfo(pid=pid, host="h", application_name="a"),
        joined_at=dt.datetime(2024, 5, 1, 12, 0, 0, 250_000, tzinfo=dt.UTC),
        state=HostState(
            frozenset(leading), frozenset(standing_by), None if runs is None else frozenset(runs)
        ),
    )


class TestHosts:
    """Every live host, idle ones too, and every other process leading units."""

    def test_every_live_host_is_listed_idle_ones_too(self) -> None:
        """Four live balancing hosts: two lead, one leads nothing and lacks units, one leads
        nothing and can run everything (idle): all four listed, in the order read."""
        state = DashboardState()
        state.update(
            [_led("a", 10), _led("b", 11), _led("c", 10)],
            [
                _host(10, "ac", runs="abc"),
                _host(11, "b", standing_by="a", runs="abc"),
                _host(12, runs="c"),
                _host(13, standing_by="c", runs="abc"),
            ],
        )
        body = state.snapshot()
        assert [(h["pid"], h["units"], h["standing_by"], h["lacks"]) for h in body["hosts"]] == [
            (10, 2, 0, []),
            (11, 1, 1, []),
            (12, 0, 0, ["a", "b"]),
            (13, 0, 1, []),
        ]
        assert body["hosts"][3] == {
            "host_id": "id13",
            "host": "h",
            "pid": 13,
            "application_name": "a",
            "joined_at": "2024-05-01T12:00:00+00:00",
            "units": 0,
            "standing_by": 1,
            "lacks": [],
        }
        assert body["live_hosts"] == 4

    def test_leaders_that_do_not_balance_are_listed_after_the_hosts(self) -> None:
        """A process leading units without registering (`run_projection`) is listed with
        the units it leads and no host id; with no balancing host, it is all there is."""
        state = DashboardState()
        state.update([_led("a", 10), _led("b", 20), _led("c", 20)], [_host(10, "a", runs="a")])
        body = state.snapshot()
        assert [(h["pid"], h["host_id"], h["units"]) for h in body["hosts"]] == [
            (10, "id10", 1),
            (20, None, 2),
        ]
        assert body["live_hosts"] == 1
        state.update([_led("a", 10)])
        body = state.snapshot()
        assert [(h["pid"], h["host_id"], h["units"]) for h in body["hosts"]] == [(10, None, 1)]
        assert body["live_hosts"] == 0

    def test_a_move_from_a_live_idle_host_is_a_hand_off(self) -> None:
        """A unit whose old leader is still a live host, though it now leads nothing, was
        handed off; once that host is gone too, a move is a failover."""
        state = DashboardState()
        state.update([_led("a", 10)], [_host(10, "a"), _host(11)])
        state.update([_led("a", 11)], [_host(10), _host(11, "a")])
        assert _moves(state, "handoffs") == [("a", 10, 11)]
        state.update([_led("a", 12)], [_host(12, "a")])
        assert _moves(state, "failovers") == [("a", 11, 12)]

    async def test_the_poller_reads_the_live_hosts(self) -> None:
        """`poll_status` lists a registered host that leads nothing."""
        async with open_memory_store() as store, trio.open_nursery() as nursery:
            async with store.register_host(runs=["a"]) as membership:
                state = DashboardState()
                await nursery.start(poll_status, store, state)
                [host] = state.snapshot()["hosts"]
                assert (host["host_id"], host["units"], host["lacks"]) == (
                    membership.host_id,
                    0,
                    [],
                )
            nursery.cancel_scope.cancel()


class TestTimesAndSource:
    """What the page says about when and what it reads."""

    def test_times_are_utc_to_the_second(self) -> None:
        """``generated_at``, the lag history's and the moves' times have no fraction of a
        second and say their zone."""
        state = DashboardState()
        state.update([_led("a", 10)])
        state.update([_led("a", 11)])
        body = state.snapshot()
        for text in (
            body["generated_at"],
            body["lag_history"][0]["at"],
            body["failovers"][0]["at"],
        ):
            assert text.endswith("+00:00")
            assert "." not in text
            assert dt.datetime.fromisoformat(text).microsecond == 0

    async def test_the_memory_store_says_so(self) -> None:
        """Over the memory store ``source`` names the backend (there is no database)."""
        async with open_memory_store() as store, trio.open_nursery() as nursery:
            state = DashboardState()
            assert state.snapshot()["source"] is None
            await nursery.start(poll_status, store, state)
            assert state.snapshot()["source"] == {"backend": "memory"}
            nursery.cancel_scope.cancel()


async def test_an_outage_is_logged_when_it_starts_every_minute_and_when_it_ends(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """151 s of failed reads (one a second): one line when it starts, one after each
    `OUTAGE_LOG_INTERVAL` with the count of failed reads since the last, one when reads
    answer again; not 150."""
    caplog.set_level(logging.WARNING, logger="eventcore_trio.dashboard")
    down = True

    async with open_memory_store() as store, trio.open_nursery() as nursery:
        real = store.projection_status

        async def projection_status() -> list[ProjectionStatus]:
            if down:
                raise DatabaseError("connection refused")
            return await real()

        monkeypatch.setattr(store, "projection_status", projection_status)
        state = DashboardState()
        await nursery.start(poll_status, store, state)
        # Half a second off the reads' ticks, so that no read races the change.
        await trio.sleep(150.5)
        down = False
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if r.name == "eventcore_trio.dashboard"]
    assert len(lines) == 4, lines
    assert lines[0] == "dashboard: status unavailable: connection refused"
    assert lines[1].startswith(
        f"dashboard: status still unavailable after {OUTAGE_LOG_INTERVAL:.0f} s (60 more failed"
    )
    assert lines[1].endswith("): connection refused")
    assert lines[2].startswith("dashboard: status still unavailable after 120 s (60 more failed")
    # Reads at 0, 1, ..., 150 s failed; the one at 151 s answered.
    assert lines[3] == "dashboard: status available again after 151 s (151 failed reads)"


def _version_unit(
    name: str,
    version: int,
    *,
    state: ProjectionState,
    serving: bool,
    lag: int = 0,
    checkpoint: Position | None = None,
    estimated: bool = False,
    runnable_by: int | None = None,
) -> ProjectionStatus:
    return ProjectionStatus(
        name=name,
        version=version,
        serving=serving,
        checkpoint=checkpoint,
        lag_events=lag,
        lag_estimated=estimated,
        lag_seconds=0.0,
        leader=None,
        standbys=0,
        state=state,
        last_error=None,
        updated_at=dt.datetime.now(dt.UTC),
        dead_letters=0,
        runnable_by=runnable_by,
    )


class TestVersions:
    """Both versions of a projection: which serves, how far the building one is, its rate
    and ETA from successive reads; a superseded unit is not an unrunnable one."""

    @staticmethod
    def _read(lag: int, read: int) -> list[ProjectionStatus]:
        # Version 1 superseded (and no live host runs it), 2 serving, 3 building: it has
        # read up to position *read* of 1,000 and has *lag* events to go.
        return [
            _version_unit(
                "ledger", 1, state=ProjectionState.SUPERSEDED, serving=False, runnable_by=0
            ),
            _version_unit("ledger", 2, state=ProjectionState.RUNNING, serving=True, runnable_by=1),
            _version_unit(
                "ledger",
                3,
                state=ProjectionState.RUNNING,
                serving=False,
                lag=lag,
                estimated=lag > 10_000,
                checkpoint=Position.parse(f"5:{read}"),
                runnable_by=1,
            ),
        ]

    def test_progress_rate_and_eta_of_a_building_version(self) -> None:
        """The building version's progress is its checkpoint against the head; its rate is
        how fast its lag shrank between reads, and the ETA its lag at that rate."""
        clock = FakeClock()
        state = DashboardState(clock=clock)
        head = Position.parse("9:1000")
        state.update(self._read(90_000, 100), head=head)
        first = {v["version"]: v for v in state.snapshot()["versions"]}
        assert [first[v]["role"] for v in (1, 2, 3)] == ["superseded", "serving", "building"]
        assert first[3]["progress"] == pytest.approx(0.1)
        assert first[3]["lag_estimated"] is True
        assert first[3]["eta_seconds"] is None  # one read: no rate yet
        clock.now += 10
        state.update(self._read(40_000, 600), head=head)
        building = {v["version"]: v for v in state.snapshot()["versions"]}[3]
        assert building["progress"] == pytest.approx(0.6)
        assert building["events_per_second"] == pytest.approx(5_000)
        assert building["eta_seconds"] == pytest.approx(8)
        assert first[1]["progress"] is None
        assert first[2]["progress"] is None

    def test_a_superseded_unit_is_not_unrunnable_and_does_not_page(self) -> None:
        """No host runs version 1 any more: it is not listed as unrunnable, and /metrics
        says it is superseded (the alert rules leave it alone) and which version serves."""
        state = DashboardState()
        state.update(self._read(5, 999), head=Position.parse("9:1000"))
        assert state.snapshot()["unrunnable"] == []
        text = prometheus_text(state.statuses, versions=state.versions)
        check_metrics(text)
        families = {f.name: f for f in text_string_to_metric_families(text.decode())}

        def by_version(family: str) -> dict[str, float]:
            return {s.labels["version"]: s.value for s in families[family].samples}

        assert by_version("eventcore_projection_serving") == {"1": 0, "2": 1, "3": 0}
        assert by_version("eventcore_projection_superseded") == {"1": 1, "2": 0, "3": 0}
        assert by_version("eventcore_projection_rebuild_progress") == {"3": 0.999}
        # The existing names carry the version too.
        assert by_version("eventcore_projection_running") == {"1": 0, "2": 1, "3": 1}

    def test_a_projection_with_one_version_lists_no_versions(self) -> None:
        """Version 1 alone is what every projection had before versions: nothing to show."""
        state = DashboardState()
        state.update([_running("ledger")])
        assert state.snapshot()["versions"] == []
