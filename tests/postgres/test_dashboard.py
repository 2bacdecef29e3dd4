"""The dashboard: /status.json, /metrics, actions and bad input, a real HTTP server, and a
database restart under it; the database it watches, failed units' errors, every live host,
and hand-offs apart from failovers between real host processes."""

from __future__ import annotations

import datetime as dt
import os
import secrets
import sys
import uuid
from collections.abc import AsyncIterator
from functools import partial
from urllib.parse import urlsplit

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
    ProjectionFailed,
    ProjectionState,
    ProjectionStatus,
    RecordedEvent,
    projector,
    run_projection,
    run_projections,
)
from eventcore_trio._status import status_json
from eventcore_trio.dashboard import DashboardState, dashboard_app, poll_status, serve_dashboard
from eventcore_trio.postgres import (
    PostgresStore,
    open_postgres_store,
    projector_lock_key,
    writer_lock_key,
)
from eventcore_trio.postgres._bridge import connect
from eventcore_trio.testing import EmbeddedPostgres, PostgresHarness

from ..conftest import oldest_server_param
from ..dashboard.promtool import check_metrics
from ..helpers import RecordingHosts, create_applied_table, eventually

#: The action token the dashboards under test are started with.
TOKEN = "test-token-0123456789abcdef"
#: What an action must carry: the header that stops cross-site forms, and the token.
ACTION = {"x-eventcore-action": "1", "authorization": f"Bearer {TOKEN}"}


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
    transport = httpx.ASGITransport(app=dashboard_app(store, state, action_token=TOKEN))
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
                # The host's count is what it published, a moment after it leads.
                return (
                    len(body["units"]) == 3
                    and all(u["state"] == "running" for u in body["units"])
                    and [h["units"] for h in body["hosts"]] == [3]
                )

            await eventually(all_running)
            body = (await http.get("/status.json")).json()
            assert sorted(u["unit"] for u in body["units"]) == [
                "audit[0/2]",
                "audit[1/2]",
                "ledger",
            ]
            [host] = body["hosts"]
            assert (host["pid"], host["lacks"], body["live_hosts"]) == (os.getpid(), [], 1)
            assert host["host_id"] is not None
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
        await run_projection(store, ledger)
        action = ACTION | {"content-type": "application/json"}
        cases = [
            (await http.get("/nope"), 404),
            (await http.post("/status.json"), 405),
            (await http.get("/actions/reset"), 405),
            (await http.post("/actions/reset", json={"projection": "ledger"}), 401),
            (
                await http.post(
                    "/actions/reset",
                    json={"projection": "ledger", "confirm": "ledger"},
                    headers={"authorization": f"Bearer {TOKEN}"},
                ),
                400,
            ),
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
        await run_projection(store, ledger)
        action = ACTION
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
    await run_projection(store, fragile)
    assert len(await store.dead_letters("fragile")) == 1
    state = DashboardState(allow_actions=True)
    app = dashboard_app(store, state, [fragile], action_token=TOKEN)
    action = ACTION
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
    await run_projection(store, split)
    letters = await store.dead_letters("fragile")
    assert len(letters) == 1
    app = dashboard_app(store, DashboardState(allow_actions=True), [unsplit], action_token=TOKEN)
    action = ACTION
    body = {"projection": "fragile", "confirm": "fragile"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
        response = await http.post("/actions/replay", json=body, headers=action)
    assert response.status_code == 409
    assert "runs as 2 partition(s)" in response.json()["error"]
    assert "--projectors" in response.json()["error"]
    assert await store.dead_letters("fragile") == letters


async def test_it_says_which_database_and_schema_it_watches(
    store: PostgresStore, postgres_dsn: str, client: tuple[httpx.AsyncClient, DashboardState]
) -> None:
    """``source``: the database's name, the server's address and port as the server sees
    the connection, and the schema; never the DSN's password."""
    http, _ = client
    body = (await http.get("/status.json")).json()
    source = body["source"]
    assert source["database"] == await store.admin.fetchval("SELECT current_database()")
    assert source["schema"] == store.schema
    dsn = urlsplit(postgres_dsn)
    if source["host"] is not None:
        assert source["port"] == (dsn.port or 5432)
    if dsn.password:
        assert dsn.password not in (await http.get("/status.json")).text


async def test_a_failed_unit_carries_its_error(
    store: PostgresStore, client: tuple[httpx.AsyncClient, DashboardState]
) -> None:
    """A unit stopped by a fatal error is ``failed`` with the error in ``last_error``, as the
    page shows it (the browser test checks it is shown escaped)."""
    http, _ = client

    @projector("brittle")
    async def brittle(event: RecordedEvent, ctx: ProjectionContext) -> None:
        raise ValueError("<b>bad</b> amount")

    await store.append("s", [NewEvent("E", {})])
    with pytest.raises(ProjectionFailed):
        await run_projection(store, brittle)

    async def failed() -> bool:
        units = (await http.get("/status.json")).json()["units"]
        return any(u["unit"] == "brittle" and u["state"] == "failed" for u in units)

    await eventually(failed)
    [unit] = [u for u in (await http.get("/status.json")).json()["units"] if u["unit"] == "brittle"]
    assert "<b>bad</b> amount" in unit["last_error"]


async def test_a_building_version_beside_the_serving_one(
    store: PostgresStore, client: tuple[httpx.AsyncClient, DashboardState]
) -> None:
    """Version 1 serves; version 2 has applied a quarter of the log: /status.json lists
    both, the building one with its progress; /metrics says which serves. Once version 2
    catches up and version 1 is superseded, version 1 is neither unrunnable nor failed."""
    http, _ = client

    @projector("audit")
    async def audit_v1(event: RecordedEvent, ctx: ProjectionContext) -> None:
        pass

    @projector("audit", version=2)
    async def audit_v2(event: RecordedEvent, ctx: ProjectionContext) -> None:
        pass

    for i in range(40):
        await store.append(f"a-{i}", [NewEvent("E", {})])
    await run_projection(store, audit_v1)
    tenth = (await store.read_events(None, limit=10))[-1].position
    await store.version_role("audit", 2)
    async with store.try_acquire("audit@v2") as leadership, leadership.open_batch() as batch:
        await batch.save_checkpoint(None, tenth)

    async def versions() -> dict[int, dict[str, object]]:
        body = (await http.get("/status.json")).json()
        return {v["version"]: v for v in body["versions"] if v["name"] == "audit"}

    async def both() -> bool:
        return set(await versions()) == {1, 2}

    await eventually(both)
    shown = await versions()
    assert (shown[1]["role"], shown[2]["role"]) == ("serving", "building")
    assert shown[2]["progress"] == pytest.approx(0.25)
    metrics = (await http.get("/metrics")).text
    check_metrics(metrics.encode())
    assert 'eventcore_projection_serving{projector="audit",unit="audit",version="1"} 1.0' in (
        metrics
    )
    assert 'eventcore_projection_rebuild_progress{projector="audit",version="2"} 0.25' in (metrics)

    await run_projection(store, audit_v2)  # catches up and takes over

    async def switched() -> bool:
        shown = await versions()
        return shown.get(1, {}).get("role") == "superseded"

    await eventually(switched)
    body = (await http.get("/status.json")).json()
    [old] = [u for u in body["units"] if u["unit"] == "audit"]
    assert (old["state"], old["serving"]) == ("superseded", False)
    assert "audit" not in body["unrunnable"]


@pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
async def test_hosts_starting_together_idle_hosts_and_a_kill(
    store: PostgresStore, postgres_dsn: str
) -> None:
    """Four balancing host processes started together over three projectors: no failover
    (moves between live hosts are hand-offs), all four live hosts listed, the idle one
    too; after a kill -9 of a leader its unit's move is a failover."""
    app = await create_applied_table(store)
    state = DashboardState()
    async with trio.open_nursery() as nursery:
        await nursery.start(poll_status, store, state)
        hosts = RecordingHosts(nursery, postgres_dsn, store.schema, app)
        async with trio.open_nursery() as starting:
            for _ in range(4):
                starting.start_soon(hosts.start, "first", "second", "third")

        async def spread() -> bool:
            body = state.snapshot()
            leaders = {u["leader"]["pid"] for u in body["units"] if u["leader"] is not None}
            return len(body["units"]) == 3 and len(leaders) == 3 and body["live_hosts"] == 4

        await eventually(spread, within=30)
        body = state.snapshot()
        assert body["failovers"] == []
        listed = {h["pid"]: h for h in body["hosts"]}
        assert set(listed) == set(hosts.processes)
        assert all(h["host_id"] is not None for h in listed.values())
        # The one that leads no unit is listed as well (idle, or standing by).
        assert len(set(listed) - {u["leader"]["pid"] for u in body["units"]}) == 1
        # A move seen meanwhile was between live hosts.
        for move in body["handoffs"]:
            assert move["from"]["pid"] in hosts.processes

        victim = next(u for u in body["units"] if u["unit"] == "first")["leader"]["pid"]
        hosts.kill(victim)

        async def failed_over() -> bool:
            return any(f["unit"] == "first" for f in state.snapshot()["failovers"])

        await eventually(failed_over, within=30)
        [failover] = [f for f in state.snapshot()["failovers"] if f["unit"] == "first"]
        assert failover["from"]["pid"] == victim
        assert failover["to"]["pid"] != victim
        nursery.cancel_scope.cancel()


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
        await run_projection(store, ledger)
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
    await run_projection(store, ledger)
    checkpoint = await store.load_checkpoint("ledger")
    assert checkpoint is not None
    action = ACTION
    body = {"projection": "ledger", "confirm": "ledger"}
    async with trio.open_nursery() as nursery:
        serve = partial(
            serve_dashboard,
            store,
            bind="127.0.0.1:0",
            allow_actions=True,
            allowed_hosts=["dashboard.internal"],
            action_token=TOKEN,
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


@pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
async def test_actions_without_the_token_change_nothing(store: PostgresStore) -> None:
    """Over real HTTP, as a ``curl`` from any local account would: a reset or a replay
    without the token, with a wrong one of its length, a shorter or a longer one, or under
    another scheme gets 401 with a JSON error, and the checkpoint and the dead letter stay
    as PostgreSQL has them; with the token, the reset is done."""

    def skip(failure: Failure) -> FailureStrategy:
        return FailureStrategy.SKIP

    @projector("fragile", on_error=skip)
    async def fragile(event: RecordedEvent, ctx: ProjectionContext) -> None:
        raise RuntimeError("not yet")

    await store.append("s", [NewEvent("E", {})])
    await run_projection(store, fragile)

    async def stored() -> tuple[object, object, int]:
        row = await store.admin.fetchrow(
            f'SELECT tx, position FROM "{store.schema}".subscriptions '
            "WHERE subscription_name = 'fragile'"
        )
        assert row is not None
        letters = await store.admin.fetchval(f'SELECT count(*) FROM "{store.schema}".dead_letters')
        return row["tx"], row["position"], int(letters)

    before = await stored()
    assert before[0] is not None
    assert before[2] == 1
    refused: list[dict[str, str]] = [
        {},
        {"authorization": "Bearer"},
        {"authorization": "Bearer " + "x" * len(TOKEN)},
        {"authorization": f"Bearer {TOKEN[:-1]}"},
        {"authorization": f"Bearer {TOKEN}x"},
        {"authorization": f"Basic {TOKEN}"},
    ]
    body = {"projection": "fragile", "confirm": "fragile"}
    async with trio.open_nursery() as nursery:
        serve = partial(
            serve_dashboard,
            store,
            bind="127.0.0.1:0",
            allow_actions=True,
            projectors=[fragile],
            action_token=TOKEN,
        )
        [url] = await nursery.start(serve)
        async with httpx.AsyncClient(base_url=url) as http:
            for headers in refused:
                for path in ("/actions/reset", "/actions/replay"):
                    response = await http.post(
                        path, json=body, headers={"x-eventcore-action": "1"} | headers
                    )
                    assert response.status_code == 401, (path, headers)
                    assert "Authorization: Bearer" in response.json()["error"]
                    assert response.headers["www-authenticate"].startswith("Bearer")
            assert await stored() == before
            response = await http.post("/actions/reset", json=body, headers=ACTION)
            assert response.json() == {"reset": "fragile"}
        nursery.cancel_scope.cancel()
    assert await stored() == (None, None, 0)


@pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
async def test_status_names_sessions_from_outside_on_the_stores_locks(
    store: PostgresStore, harness: PostgresHarness
) -> None:
    """A session asking for the writer lock exclusively (every append waits for it) is named
    by pid, user, application, address and time while it waits and while it holds it, and no
    longer once it lets go; so is a role that may only connect holding a projection's lock.
    The store's own shared append is not named. Status, its JSON, the command's table and
    the dashboard's status all say so."""
    await store.append("acc-1", [NewEvent("Deposited", {})])
    await run_projection(store, ledger)
    role, password = f"nosy_{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(16)
    await store.admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    parts = urlsplit(harness.dsn)
    nosy_dsn = parts._replace(netloc=f"{role}:{password}@{parts.hostname}:{parts.port}").geturl()
    writer = writer_lock_key(store.schema)
    version = int(await store.admin.fetchval("SHOW server_version_num"))

    async def foreign() -> set[tuple[str, str | None, int, str, bool, bool]]:
        [record] = await store.projection_status()
        return {
            (f.kind, f.unit, f.pid, f.user, f.exclusive, f.granted) for f in record.foreign_locks
        }

    nosy = None
    try:
        nosy = await connect(nosy_dsn, application_name="nosy", connect_timeout=10)
        async with store.admin.connection("by hand") as by_hand:
            row = await by_hand.fetchrow("SELECT pg_backend_pid() AS pid, current_user AS user")
            assert row is not None
            hand_pid, hand_user = row["pid"], row["user"]
            nosy_pid = await nosy.fetchval("SELECT pg_backend_pid()")
            await nosy.execute(
                "SELECT pg_advisory_lock($1)", projector_lock_key(store.schema, "ledger")
            )
            taken = ("projection", "ledger", nosy_pid, role, True, True)
            # The append held open commits first, then the nursery waits for the lock.
            async with (
                trio.open_nursery() as nursery,
                harness.hold_commit(store, "acc-2", [NewEvent("Deposited", {})]),
            ):
                # Behind the store's own open append, which holds the lock shared.
                nursery.start_soon(by_hand.execute, "SELECT pg_advisory_lock($1)", writer)
                waiting = ("writer", None, hand_pid, hand_user, True, False)

                async def named_waiting() -> bool:
                    return await foreign() == {waiting, taken}

                await eventually(named_waiting)
                [record] = await store.projection_status()
                [lock] = [f for f in record.foreign_locks if f.kind == "writer"]
                assert (lock.waiting_since is not None) == (version >= 140000)
            # The append committed: the session by hand holds the writer lock now.
            assert await foreign() == {("writer", None, hand_pid, hand_user, True, True), taken}
            records = await store.projection_status()
            [nosy_lock] = [f for f in records[0].foreign_locks if f.unit == "ledger"]
            assert (nosy_lock.application_name, nosy_lock.client_addr) == ("nosy", "127.0.0.1")
            assert nosy_lock.connected_at is not None
            shown = status_json(records[0])["foreign_locks"]
            assert isinstance(shown, list)
            assert {(f["kind"], f["pid"], f["user"]) for f in shown} == {
                ("writer", hand_pid, hand_user),
                ("projection", nosy_pid, role),
            }
            state = DashboardState()
            state.update(records)
            assert state.snapshot()["foreign_locks"] == shown
            done = await trio.run_process(
                [sys.executable, "-m", "eventcore_trio.cli", "status", "--schema", store.schema],
                capture_stdout=True,
                env={**os.environ, "EVENTCORE_DSN": harness.dsn},
            )
            table = done.stdout.decode()
            assert f"WARNING: session pid {hand_pid} (user '{hand_user}'" in table
            assert "holds the writer lock exclusively: appends wait for it" in table
            assert f"WARNING: session pid {nosy_pid} (user '{role}', application 'nosy'" in table
            assert "holds the lock of unit 'ledger' exclusively" in table
            assert "pg_terminate_backend" in table

            await by_hand.execute("SELECT pg_advisory_unlock($1)", writer)
            await nosy.execute("SELECT pg_advisory_unlock_all()")
            assert await foreign() == set()
    finally:
        if nosy is not None:
            await nosy.close()
        await store.admin.execute(f"DROP ROLE IF EXISTS {role}")
