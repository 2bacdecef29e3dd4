"""Hosts that run different projectors on one schema, as real processes on real PostgreSQL.

Each host is a process running tests/postgres/recording_host.py with the projectors a test
names, all writing what they apply through ctx.db (exactly once, or the test fails), while
this process keeps appending. Before hosts said what they run, a unit could be planned for
a host that does not have it and then stay unled for good: the first two tests fail that way.
"""

from __future__ import annotations

import os
import socket
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from eventcore_trio import LeaderInfo, NewEvent, RecordedEvent, partition_of
from eventcore_trio.dashboard import DashboardState, dashboard_app
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.projection import (
    ProjectionContext,
    projector,
    run_projection,
    run_projections,
)
from eventcore_trio.testing import PostgresHarness, read_all

from ..conftest import oldest_server_param
from ..helpers import (
    RecordingHosts,
    append_orders,
    caught_up,
    create_applied_table,
    dsn_environment,
    eventually,
)

# Many processes and seconds per test, and nothing in it that differs between server
# versions: one server (see conftest.oldest_server_param).
pytestmark = pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)

CLI = [sys.executable, "-m", "eventcore_trio.cli"]
SERVICE_A = [f"a{i}" for i in range(6)]
SERVICE_B = ["audit", "billing"]


@pytest.fixture
async def store(postgres_dsn: str) -> AsyncIterator[PostgresStore]:
    async with PostgresHarness(postgres_dsn).open_store() as store:
        assert isinstance(store, PostgresStore)
        yield store


async def _led_by_hosts_that_have_them(
    store: PostgresStore, hosts: RecordingHosts, projections: Iterable[str], units: int
) -> Counter[int] | None:
    """Units led per host pid once every unit of *projections* is led by a host that runs
    it; None before."""
    names = set(projections)
    status = [s for s in await store.projection_status() if s.name in names]
    if len(status) != units:
        return None
    spread: Counter[int] = Counter()
    for s in status:
        if s.leader is None:
            return None
        assert s.name in hosts.runs[s.leader.pid], f"{s.unit} led by a host that lacks it"
        spread[s.leader.pid] += 1
    return spread


async def _verify(store: PostgresStore, app: str, projections: Iterable[str]) -> None:
    """Every projection applied every event exactly once, each stream in order."""
    events = {e.event_id for e in await read_all(store, page_size=5000)}
    assert events
    rows = await store.admin.fetch(
        f'SELECT projection, stream_id, version, event_id FROM "{app}".applied ORDER BY id'
    )
    applied: dict[str, list[object]] = defaultdict(list)
    versions: dict[tuple[str, str], list[int]] = defaultdict(list)
    for row in rows:
        applied[row["projection"]].append(row["event_id"])
        versions[row["projection"], row["stream_id"]].append(row["version"])
    for name in projections:
        assert len(applied[name]) == len(set(applied[name])), f"{name}: applied twice"
        assert set(applied[name]) == events, f"{name}: an event was lost"
    assert all(v == sorted(v) for v in versions.values()), "a stream's order broke"


async def test_two_services_on_one_schema_both_run(
    store: PostgresStore, postgres_dsn: str, tmp_path: Path
) -> None:
    """A host with six projectors starts first, a host with two others joins: each leads
    its own, both catch up exactly once, and each logs what it lacks."""
    app = await create_applied_table(store)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        hosts = RecordingHosts(nursery, postgres_dsn, store.schema, app, tmp_path)
        nursery.start_soon(append_orders, store, stop)
        a = await hosts.start(*SERVICE_A)
        await eventually(lambda: _led(store, hosts, SERVICE_A, 6), within=30)
        b = await hosts.start(*SERVICE_B)
        everything = [*SERVICE_A, *SERVICE_B]
        await eventually(lambda: _led(store, hosts, everything, 8), within=30)
        spread = await _led_by_hosts_that_have_them(store, hosts, everything, 8)
        assert spread == {a: 6, b: 2}
        stop.set()
        await eventually(lambda: caught_up(store, everything), within=60)
        await eventually(lambda: _logged(hosts, a, "does not have: audit, billing"), within=10)
        await eventually(lambda: _logged(hosts, b, "does not have: a0, a1"), within=10)
        nursery.cancel_scope.cancel()
    hosts.close()
    await _verify(store, app, everything)


async def test_a_host_that_adds_a_projector_runs_it(
    store: PostgresStore, postgres_dsn: str, tmp_path: Path
) -> None:
    """Two services run; a third host (a new version of the first, with a new partitioned
    projector) starts while events are appended: the new projector's four partitions run on
    it, and the spread is as even as the sets allow (5, 2, 5)."""
    app = await create_applied_table(store)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        hosts = RecordingHosts(nursery, postgres_dsn, store.schema, app, tmp_path)
        nursery.start_soon(append_orders, store, stop)
        a = await hosts.start(*SERVICE_A)
        b = await hosts.start(*SERVICE_B)
        before = [*SERVICE_A, *SERVICE_B]
        await eventually(lambda: _led(store, hosts, before, 8), within=30)
        c = await hosts.start(*SERVICE_A, "gamma:4")
        everything = [*before, "gamma"]

        async def settled() -> bool:
            spread = await _led_by_hosts_that_have_them(store, hosts, everything, 12)
            return spread == {a: 5, b: 2, c: 5}

        await eventually(settled, within=30)
        gamma = [s for s in await store.projection_status() if s.name == "gamma"]
        assert [s.partitions for s in gamma] == [4] * 4
        assert {s.leader.pid for s in gamma if s.leader is not None} == {c}
        stop.set()
        await eventually(lambda: caught_up(store, everything), within=60)
        nursery.cancel_scope.cancel()
    hosts.close()
    await _verify(store, app, everything)


async def _led(
    store: PostgresStore, hosts: RecordingHosts, projections: list[str], units: int
) -> bool:
    return await _led_by_hosts_that_have_them(store, hosts, projections, units) is not None


async def _logged(hosts: RecordingHosts, pid: int, text: str) -> bool:
    await trio.lowlevel.checkpoint()
    return text in hosts.said(pid)


@projector("audit")
async def _audit(event: RecordedEvent, ctx: ProjectionContext) -> None:
    """Applies nothing: it only has to have run here once."""


@projector("orders")
async def _orders(event: RecordedEvent, ctx: ProjectionContext) -> None:
    """Applies nothing; what the live host runs."""


async def test_status_shows_a_unit_no_live_host_can_run(
    store: PostgresStore, postgres_dsn: str
) -> None:
    """The only live host runs "orders"; "audit" ran here once: status (and the status
    command) lists audit as runnable by no live host, naming that host, and lists orders as
    runnable by it."""
    await store.append("s-1", [NewEvent("E", {})])
    await run_projection(store, _audit)
    (alone,) = [s for s in await store.projection_status() if s.name == "audit"]
    assert alone.runnable_by is None, "no balancing host is live: nothing to say"
    async with trio.open_nursery() as nursery:
        await nursery.start(run_projections, store, [_orders])
        status = {s.unit: s for s in await store.projection_status()}
        command = await trio.run_process(
            [*CLI, "status", "--schema", store.schema],
            capture_stdout=True,
            env=dsn_environment(postgres_dsn),
        )
        nursery.cancel_scope.cancel()
    table = command.stdout.decode()
    assert f"    no live host runs it (lacking: {os.getpid()}@{socket.gethostname()})" in table
    assert table.count("no live host runs it") == 1
    assert set(status) == {"audit", "orders"}
    audit = status["audit"]
    assert audit.unrunnable
    assert audit.runnable_by == 0
    assert audit.lacking_hosts == (
        LeaderInfo(pid=os.getpid(), host=socket.gethostname(), application_name="eventcore-trio"),
    )
    assert audit.checkpoint is not None
    assert status["orders"].runnable_by == 1
    assert status["orders"].lacking_hosts == ()
    assert not status["orders"].unrunnable


async def test_the_dashboard_shows_a_unit_no_live_host_can_run(store: PostgresStore) -> None:
    """/status.json lists "audit" as unrunnable, naming the host that lacks it, and /metrics
    says 0 hosts can run it and 1 can run "orders"."""
    await store.append("s-1", [NewEvent("E", {})])
    await run_projection(store, _audit)
    state = DashboardState()
    transport = httpx.ASGITransport(app=dashboard_app(store, state))
    async with (
        trio.open_nursery() as nursery,
        httpx.AsyncClient(transport=transport, base_url="http://localhost") as http,
    ):
        await nursery.start(run_projections, store, [_orders])
        state.update(await store.projection_status())
        body = (await http.get("/status.json")).json()
        metrics = (await http.get("/metrics")).text
        nursery.cancel_scope.cancel()
    assert body["unrunnable"] == ["audit"]
    units = {u["unit"]: u for u in body["units"]}
    assert units["audit"]["runnable_by"] == 0
    assert units["audit"]["lacking_hosts"] == [
        {"pid": os.getpid(), "host": socket.gethostname(), "application_name": "eventcore-trio"}
    ]
    assert units["orders"]["runnable_by"] == 1
    assert units["orders"]["lacking_hosts"] == []
    runnable_by = {
        sample.labels["unit"]: sample.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "eventcore_projection_runnable_by"
        for sample in family.samples
    }
    assert runnable_by == {"audit": 0, "orders": 1}


async def test_a_host_row_carries_what_the_host_runs(store: PostgresStore) -> None:
    """What a host registers with comes back in every host's view; a row without it (a host
    of an older version) reads as not said."""
    async with (
        store.register_host(runs=["orders", "wide[0/2]", "wide[1/2]"]) as first,
        store.register_host() as second,
    ):
        runs = frozenset({"orders", "wide[0/2]", "wide[1/2]"})
        view = await first.view(["orders"])
        assert view.hosts[first.host_id].runs == runs
        assert view.hosts[second.host_id].runs is None
        await first.publish(frozenset({"orders"}), frozenset())
        view = await second.view(["orders"])
        assert view.hosts[first.host_id].runs == runs
        assert view.hosts[first.host_id].can_run == runs
        # Listed before they ever ran: no checkpoint, every event of the partition as lag.
        await store.append("s-1", [NewEvent("E", {})])
        status = {s.unit: s for s in await store.projection_status()}
        assert set(status) == runs
        assert [status[u].lag_events for u in sorted(runs)] == [
            1,
            *(int(partition_of("s-1", 2).index == i) for i in range(2)),
        ]
        assert all(s.checkpoint is None and s.runnable_by == 1 for s in status.values())
