"""The dashboard: /status.json, /metrics, actions and bad input, a real HTTP server, and a
database restart under it."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from functools import partial

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from eventcore_trio import (
    Failure,
    FailureStrategy,
    LeaderInfo,
    NewEvent,
    ProjectionContext,
    ProjectionState,
    ProjectionStatus,
    RecordedEvent,
    projector,
    run_projection,
    run_projections,
)
from eventcore_trio.dashboard import DashboardState, dashboard_app, poll_status, serve_dashboard
from eventcore_trio.postgres import PostgresStore, open_postgres_store
from eventcore_trio.testing import EmbeddedPostgres

from ..dashboard.promtool import check_metrics
from ..helpers import eventually


@projector("ledger", event_types=["Deposited"])
async def ledger(event: RecordedEvent, ctx: ProjectionContext) -> None:
    pass


@projector("audit", partitions=2)
async def audit(event: RecordedEvent, ctx: ProjectionContext) -> None:
    pass


@pytest.fixture
async def client(store: PostgresStore) -> AsyncIterator[tuple[httpx.AsyncClient, DashboardState]]:
    """The app in process (no sockets), with actions allowed and its poller running."""
    state = DashboardState(allow_actions=True)
    transport = httpx.ASGITransport(app=dashboard_app(store, state))
    async with (
        trio.open_nursery() as nursery,
        httpx.AsyncClient(transport=transport, base_url="http://localhost") as http,
    ):
        await nursery.start(poll_status, store, state)
        yield http, state
        nursery.cancel_scope.cancel()


class TestEndpoints:
    """What the page and scripts read."""

    async def test_status_and_metrics_of_a_running_host(
        self,
        store: PostgresStore,
        client: tuple[httpx.AsyncClient, DashboardState],
    ) -> None:
        """Every unit with its state and leader; units per host; the metrics parse."""
        http, _ = client
        await store.append("acc-1", [NewEvent("Deposited", {})])
        async with trio.open_nursery() as nursery:
            await nursery.start(run_projections, store, [ledger, audit])

            async def all_running() -> bool:
                body = (await http.get("/status.json")).json()
                return len(body["units"]) == 3 and all(
                    u["state"] == "running" for u in body["units"]
                )

            await eventually(all_running)
            body = (await http.get("/status.json")).json()
            assert sorted(u["unit"] for u in body["units"]) == [
                "audit[0/2]",
                "audit[1/2]",
                "ledger",
            ]
            assert sum(h["units"] for h in body["hosts"]) == 3
            assert body["error"] is None
            assert body["lag_history"]
            metrics = (await http.get("/metrics")).text
            families = {f.name: f for f in text_string_to_metric_families(metrics)}
            lag = families["eventcore_projection_lag_events"]
            assert {s.labels["unit"] for s in lag.samples} == {"ledger", "audit[0/2]", "audit[1/2]"}
            assert sum(s.value for s in families["eventcore_host_units"].samples) == 3
            page = (await http.get("/")).text
            assert "/status.json" in page
            nursery.cancel_scope.cancel()

    async def test_bad_input_gets_a_4xx(
        self, store: PostgresStore, client: tuple[httpx.AsyncClient, DashboardState]
    ) -> None:
        """Unknown paths and methods, and every malformed action: 4xx, never a traceback."""
        http, _ = client
        await store.append("acc-1", [NewEvent("Deposited", {})])
        await run_projection(ledger, store)
        action = {"x-eventcore-action": "1", "content-type": "application/json"}
        cases = [
            (await http.get("/nope"), 404),
            (await http.post("/status.json"), 405),
            (await http.get("/actions/reset"), 405),
            (await http.post("/actions/reset", json={"projection": "ledger"}), 400),
            (await http.post("/actions/reset", content=b"{", headers=action), 400),
            (await http.post("/actions/reset", content=b"[1]", headers=action), 400),
            (await http.post("/actions/reset", json={"projection": 7}, headers=action), 400),
            (
                await http.post(
                    "/actions/reset", json={"projection": "ledger", "confirm": "x"}, headers=action
                ),
                400,
            ),
            (
                await http.post(
                    "/actions/reset", json={"projection": "nope", "confirm": "nope"}, headers=action
                ),
                404,
            ),
        ]
        for response, code in cases:
            assert response.status_code == code, response.text
            assert "Traceback" not in response.text

    async def test_reset_needs_the_flag_and_a_stopped_projection(
        self, store: PostgresStore, client: tuple[httpx.AsyncClient, DashboardState]
    ) -> None:
        """Forbidden when read-only; refused while running; done once stopped."""
        http, state = client
        await store.append("acc-1", [NewEvent("Deposited", {})])
        await run_projection(ledger, store)
        action = {"x-eventcore-action": "1"}
        body = {"projection": "ledger", "confirm": "ledger"}
        state.allow_actions = False
        assert (await http.post("/actions/reset", json=body, headers=action)).status_code == 403
        state.allow_actions = True
        async with trio.open_nursery() as nursery:
            await nursery.start(run_projections, store, [ledger])
            response = await http.post("/actions/reset", json=body, headers=action)
            assert response.status_code == 409
            nursery.cancel_scope.cancel()
        response = await http.post("/actions/reset", json=body, headers=action)
        assert response.status_code == 200
        assert await store.load_checkpoint("ledger") is None


async def test_replaying_dead_letters_of_the_given_projectors(store: PostgresStore) -> None:
    """With the projector's code: the page's replay applies its dead letters again; without
    it, or while it runs, a 404 or a 409."""
    broken = True

    def skip(failure: Failure) -> FailureStrategy:
        return FailureStrategy.SKIP

    @projector("fragile", on_error=skip)
    async def fragile(event: RecordedEvent, ctx: ProjectionContext) -> None:
        if broken:
            raise RuntimeError("not yet")

    await store.append("s", [NewEvent("E", {})])
    await run_projection(fragile, store)
    assert len(await store.dead_letters("fragile")) == 1
    state = DashboardState(allow_actions=True)
    app = dashboard_app(store, state, [fragile])
    action = {"x-eventcore-action": "1"}
    body = {"projection": "fragile", "confirm": "fragile"}
    async with (
        trio.open_nursery() as nursery,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://localhost"
        ) as http,
    ):
        await nursery.start(poll_status, store, state)
        assert (await http.get("/status.json")).json()["replayable"] == ["fragile"]
        other = {"projection": "ledger", "confirm": "ledger"}
        assert (await http.post("/actions/replay", json=other, headers=action)).status_code == 404
        async with trio.open_nursery() as hosting:
            await hosting.start(run_projections, store, [fragile])
            response = await http.post("/actions/replay", json=body, headers=action)
            assert response.status_code == 409
            hosting.cancel_scope.cancel()
        broken = False
        response = await http.post("/actions/replay", json=body, headers=action)
        assert response.json() == {"replayed": 1, "failed": 0}
        assert await store.dead_letters("fragile") == []
        nursery.cancel_scope.cancel()


async def test_replaying_with_a_projector_of_another_partition_count_is_refused(
    store: PostgresStore,
) -> None:
    """A dashboard given the projector with a partition count its projection no longer has
    answers 409, says why, and replays nothing."""

    def skip(failure: Failure) -> FailureStrategy:
        return FailureStrategy.SKIP

    @projector("fragile", partitions=2, on_error=skip)
    async def split(event: RecordedEvent, ctx: ProjectionContext) -> None:
        raise RuntimeError("not yet")

    @projector("fragile", on_error=skip)
    async def unsplit(event: RecordedEvent, ctx: ProjectionContext) -> None:
        pass

    await store.append("s", [NewEvent("E", {})])
    await run_projection(split, store)
    letters = await store.dead_letters("fragile")
    assert len(letters) == 1
    app = dashboard_app(store, DashboardState(allow_actions=True), [unsplit])
    action = {"x-eventcore-action": "1"}
    body = {"projection": "fragile", "confirm": "fragile"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
        response = await http.post("/actions/replay", json=body, headers=action)
    assert response.status_code == 409
    assert "runs as 2 partition(s)" in response.json()["error"]
    assert "--projectors" in response.json()["error"]
    assert await store.dead_letters("fragile") == letters


def _status(unit: str, pid: int | None) -> ProjectionStatus:
    return ProjectionStatus(
        name=unit,
        checkpoint=None,
        lag_events=0,
        lag_seconds=0.0,
        leader=None if pid is None else LeaderInfo(pid=pid, host="h", application_name="a"),
        standbys=1,
        state=ProjectionState.RUNNING if pid else ProjectionState.STANDBY,
        last_error=None,
        updated_at=dt.datetime.now(dt.UTC),
        dead_letters=0,
    )


def test_failovers_are_seen_when_another_process_leads() -> None:
    """A unit led by another process than the one that led it last is a failover."""
    state = DashboardState()
    for pid in (10, 10, None, 11, 11):
        state.update([_status("ledger", pid)])
    [failover] = state.snapshot()["failovers"]
    assert (failover["unit"], failover["from"]["pid"], failover["to"]["pid"]) == ("ledger", 10, 11)


async def test_a_real_server_and_a_database_restart(own_server: EmbeddedPostgres) -> None:
    """Over real HTTP on an ephemeral port; the database restarts under it: the snapshot
    says it is stale, then recovers; the server never stops answering."""
    async with (
        open_postgres_store(own_server.dsn) as store,
        trio.open_nursery() as nursery,
    ):
        await store.append("acc-1", [NewEvent("Deposited", {})])
        await run_projection(ledger, store)
        [url] = await nursery.start(partial(serve_dashboard, store, bind="127.0.0.1:0"))
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/status.json")).json()["units"][0]["unit"] == "ledger"
            await trio.to_thread.run_sync(own_server.stop)

            async def stale() -> bool:
                return (await http.get("/status.json")).json()["error"] is not None

            await eventually(stale, within=20)
            # The outage is reported, and the unit's last values (running 1, lag 0) are not
            # served as if current.
            response = await http.get("/metrics")
            assert response.status_code == 200
            down = _samples(response.text)
            assert down["eventcore_store_up"] == [0]
            assert down["eventcore_projection_running"] == []
            assert down["eventcore_projection_lag_events"] == []
            await trio.to_thread.run_sync(own_server.start)

            async def fresh() -> bool:
                return (await http.get("/status.json")).json()["error"] is None

            await eventually(fresh, within=30)
            up = _samples((await http.get("/metrics")).text)
            assert up["eventcore_store_up"] == [1]
            assert up["eventcore_projection_running"] == [0]
        nursery.cancel_scope.cancel()


def _samples(text: str) -> dict[str, list[float]]:
    return {
        family.name: [sample.value for sample in family.samples]
        for family in text_string_to_metric_families(text)
    }


async def test_a_foreign_host_header_reads_nothing_and_resets_nothing(store: PostgresStore) -> None:
    """Over real HTTP with actions allowed: a request naming another host (a page that
    rebound its name to 127.0.0.1) gets 400, and its reset changes nothing; the dashboard's
    own names, and a name given with ``allowed_hosts``, work."""
    await store.append("acc-1", [NewEvent("Deposited", {})])
    await run_projection(ledger, store)
    checkpoint = await store.load_checkpoint("ledger")
    assert checkpoint is not None
    action = {"x-eventcore-action": "1"}
    body = {"projection": "ledger", "confirm": "ledger"}
    async with trio.open_nursery() as nursery:
        serve = partial(
            serve_dashboard,
            store,
            bind="127.0.0.1:0",
            allow_actions=True,
            allowed_hosts=["dashboard.internal"],
        )
        [url] = await nursery.start(serve)
        port = url.rpartition(":")[2]
        async with httpx.AsyncClient(base_url=url) as http:
            foreign = {"host": f"attacker.example:{port}"}
            for path in ("/", "/status.json", "/metrics"):
                response = await http.get(path, headers=foreign)
                assert response.status_code == 400, path
                assert "ledger" not in response.text
            response = await http.post("/actions/reset", json=body, headers=action | foreign)
            assert response.status_code == 400
            assert await store.load_checkpoint("ledger") == checkpoint
            for host in (f"localhost:{port}", "dashboard.internal", f"127.0.0.1:{port}"):
                response = await http.get("/status.json", headers={"host": host})
                assert response.json()["units"][0]["unit"] == "ledger", host
            response = await http.post(
                "/actions/reset", json=body, headers=action | {"host": f"localhost:{port}"}
            )
            assert response.status_code == 200
            assert await store.load_checkpoint("ledger") is None
        nursery.cancel_scope.cancel()


async def test_live_metrics_pass_promtool(store: PostgresStore) -> None:
    """``/metrics`` of a real dashboard over hosts running partitioned and plain projectors
    (every series: units, hosts, runnable_by, the store's health) passes ``promtool check
    metrics``, Prometheus's own parser and linter."""
    await store.append("acc-1", [NewEvent("Deposited", {})])
    async with trio.open_nursery() as nursery:
        await nursery.start(run_projections, store, [ledger, audit])
        [url] = await nursery.start(partial(serve_dashboard, store, bind="127.0.0.1:0"))
        async with httpx.AsyncClient(base_url=url) as http:

            async def all_served() -> bool:
                samples = _samples((await http.get("/metrics")).text)
                return samples["eventcore_projection_running"] == [1, 1, 1] and bool(
                    samples["eventcore_projection_runnable_by"]
                )

            await eventually(all_served)
            text = (await http.get("/metrics")).content
        check_metrics(text)
        families = _samples(text.decode())
        assert families["eventcore_store_up"] == [1]
        assert families["eventcore_host_units"] == [3]
        nursery.cancel_scope.cancel()
