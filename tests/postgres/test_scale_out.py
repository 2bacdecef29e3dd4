"""Scale-out across real processes: units spread evenly, survive kill -9, re-spread on joins.

Each host is a process running tests/postgres/recording_host.py: six plain projectors and
one partitioned one, all writing what they apply through ctx.db (exactly once, or the
test fails), while this process keeps appending.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncIterator

import pytest
import trio

from eventcore_trio import ProjectionState, partition_of
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.testing import PostgresHarness, read_all

from ..conftest import oldest_server_param
from ..helpers import (
    RECORDING_HOST,
    RecordingHosts,
    append_orders,
    caught_up,
    create_applied_table,
    eventually,
)

# Many processes and seconds per test, and nothing in it that differs between server
# versions: one server (see conftest.oldest_server_param).
pytestmark = pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)

PLAIN = [f"plain-{i}" for i in range(6)]
PROJECTIONS = [*PLAIN, "wide"]


@pytest.fixture
async def store(postgres_dsn: str) -> AsyncIterator[PostgresStore]:
    async with PostgresHarness(postgres_dsn).open_store() as store:
        assert isinstance(store, PostgresStore)
        yield store


async def _start(hosts: RecordingHosts, partitions: int) -> int:
    # Six plain projectors and "wide" in *partitions* partitions.
    return await hosts.start(*PLAIN, f"wide:{partitions}")


async def _spread(store: PostgresStore, units: int) -> Counter[int] | None:
    """Units led per host pid, or None while some unit has no leader."""
    status = [s for s in await store.projection_status() if s.name in PROJECTIONS]
    if len(status) != units or any(s.leader is None for s in status):
        return None
    for s in status:
        assert s.leader is not None
        assert s.leader.application_name.startswith("eventcore-trio")
    return Counter(s.leader.pid for s in status if s.leader is not None)


async def _even_over(store: PostgresStore, pids: set[int], units: int) -> bool:
    spread = await _spread(store, units)
    if spread is None or set(spread) != pids:
        return False
    return max(spread.values()) - min(spread.values()) <= 1


async def _verify(store: PostgresStore, app: str) -> None:
    """Every projection applied every event exactly once; streams in order, in one partition."""
    events = await read_all(store, page_size=5000)
    rows = await store.admin.fetch(
        f"SELECT projection, partition, partitions, stream_id, version, event_id, pid "
        f'FROM "{app}".applied ORDER BY id'
    )
    by_projection: dict[str, list[object]] = defaultdict(list)
    for row in rows:
        by_projection[row["projection"]].append(row)
    for name in PROJECTIONS:
        applied = [r["event_id"] for r in by_projection[name]]  # type: ignore[index]
        assert len(applied) == len(set(applied)), f"{name}: an event was applied twice"
        assert set(applied) == {e.event_id for e in events}, f"{name}: an event was lost"
        versions: dict[str, list[int]] = defaultdict(list)
        for r in by_projection[name]:
            versions[r["stream_id"]].append(r["version"])  # type: ignore[index]
        assert all(v == sorted(v) for v in versions.values()), f"{name}: order broken"
    wide = by_projection["wide"]
    for r in wide:
        # Each stream in one partition per count: the one its hash says.
        expected = partition_of(r["stream_id"], r["partitions"]).index  # type: ignore[index]
        assert r["partition"] == expected  # type: ignore[index]
    assert len({r["pid"] for r in wide}) > 1, "the partitioned projection ran on one host"  # type: ignore[index]


async def test_units_spread_over_hosts_and_recover_from_kill_and_join(
    store: PostgresStore, postgres_dsn: str
) -> None:
    """3 hosts even; kill -9 the busiest: all led again at once, then even; a 4th: even."""
    app = await create_applied_table(store)
    units = 6 + 4
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        hosts = RecordingHosts(nursery, postgres_dsn, store.schema, app)
        nursery.start_soon(append_orders, store, stop)
        for _ in range(3):
            await _start(hosts, 4)
            await trio.sleep(0.3)  # started a few hundred ms apart, as the issue asks
        await eventually(lambda: _even_over(store, set(hosts.processes), units), within=30)
        # Bounded connections: about one standby per unit, not one per unit per host (20).
        await eventually(lambda: _standbys_at_most(store, units), within=10)

        spread = await _spread(store, units)
        assert spread is not None
        busiest = max(spread, key=lambda pid: spread[pid])
        status = await store.projection_status()
        its_units = [u.unit for u in status if u.leader is not None and u.leader.pid == busiest]
        before = await store.admin.lock_sessions(its_units)
        hosts.kill(busiest)
        killed_at = trio.current_time()
        # Taken over by the standbys: each lock held by another session (polled every 2 ms).
        with trio.fail_after(10):
            while True:
                now = await store.admin.lock_sessions(its_units)
                if len(now) == len(its_units) and all(now[u] != before[u] for u in its_units):
                    break
                await trio.sleep(0.002)
        took_over = trio.current_time() - killed_at
        assert took_over < 1, f"the killed host's units were led again after {took_over:.2f}s"
        await eventually(lambda: _all_led_without(store, busiest, units), within=10)
        await eventually(lambda: _even_over(store, set(hosts.processes), units), within=30)

        await _start(hosts, 4)
        await eventually(lambda: _even_over(store, set(hosts.processes), units), within=30)
        stop.set()
        await eventually(lambda: caught_up(store, PROJECTIONS), within=60)
        nursery.cancel_scope.cancel()
    await _verify(store, app)


async def _standbys_at_most(store: PostgresStore, limit: int) -> bool:
    waiting = await store.admin.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    return int(waiting) <= limit


async def _all_led_without(store: PostgresStore, dead: int, units: int) -> bool:
    spread = await _spread(store, units)
    return spread is not None and dead not in spread


async def test_split_under_load_and_refused_merge(store: PostgresStore, postgres_dsn: str) -> None:
    """Hosts at K=2 replaced by hosts at K=4 while writers append: nothing lost or doubled,
    order kept; a host started with K=3 afterwards refuses to run the projection."""
    app = await create_applied_table(store)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(append_orders, store, stop)
        async with trio.open_nursery() as old:
            old_hosts = RecordingHosts(old, postgres_dsn, store.schema, app)
            await _start(old_hosts, 2)
            await _start(old_hosts, 2)
            await eventually(lambda: _even_over(store, set(old_hosts.processes), 8), within=30)
            new_hosts = RecordingHosts(nursery, postgres_dsn, store.schema, app)
            # A rolling deploy: the new host is ready at once; its units wait for the split,
            # which waits for the old hosts, which lead every unit of the old count meanwhile.
            await _start(new_hosts, 4)
            await eventually(lambda: _split_waiting(store), within=30)
            old.cancel_scope.cancel()
        await _start(new_hosts, 4)
        await eventually(lambda: _even_over(store, set(new_hosts.processes), 10), within=30)
        wide = [s for s in await store.projection_status() if s.name == "wide"]
        assert [s.partitions for s in wide] == [4, 4, 4, 4]
        stop.set()
        await eventually(lambda: caught_up(store, PROJECTIONS), within=60)
        nursery.cancel_scope.cancel()
    await _verify(store, app)
    # K=4 to K=3 is refused: the host logs why and what to do, and runs nothing of it.
    refused = await trio.lowlevel.open_process(
        [sys.executable, str(RECORDING_HOST), store.schema, app, *PLAIN, "wide:3"],
        env={**os.environ, "EVENTCORE_DSN": postgres_dsn},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    assert refused.stderr is not None
    said = b""
    try:
        with trio.fail_after(60):
            while b"reset wide" not in said:
                chunk = await refused.stderr.receive_some()
                assert chunk, said.decode()
                said += chunk
    finally:
        refused.kill()
        await refused.wait()
        await refused.stderr.aclose()
    assert b"PartitionsChanged" in said

    async def only_the_recorded_count() -> bool:
        # The refused host's units (of 3) are listed, failed, until its sessions end.
        wide = [s for s in await store.projection_status() if s.name == "wide"]
        assert all(s.state is ProjectionState.FAILED for s in wide if s.partitions == 3)
        return [s.partitions for s in wide] == [4] * 4

    await eventually(only_the_recorded_count, within=10)


async def _split_waiting(store: PostgresStore) -> bool:
    # The new count's units are held by the new host and wait for the split; the old
    # count's units are led by the old hosts.
    wide = {s.unit: s for s in await store.projection_status() if s.name == "wide"}
    new = [wide.get(f"wide[{i}/4]") for i in range(4)]
    old = [wide.get(f"wide[{i}/2]") for i in range(2)]
    return all(s is not None and s.state is ProjectionState.AWAITING_SPLIT for s in new) and all(
        s is not None and s.state is ProjectionState.RUNNING and s.leader is not None for s in old
    )
