"""Projection versions under real processes (issue 27): a side-by-side rebuild and a rolling
deploy with kill -9, on real PostgreSQL, while this process keeps appending.

Each host is a process running tests/postgres/versions_host.py: one version of "totals",
which keeps a running total per stream (version *N* adds each amount times *N*) and records
every event it applies in a table keyed by the event id, both in its version's read-model
schema. Readers go through ``read_model_schema``, as an application would.
"""

from __future__ import annotations

import signal
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio

from eventcore_trio import NewEvent, ProjectionState
from eventcore_trio._versions import read_model_schema_name
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.testing import PostgresHarness, read_all

from ..conftest import oldest_server_param
from ..helpers import RecordingHosts, eventually
from .versions_host import NAME

# Many processes and seconds per test, and nothing in it that differs between server
# versions: one server (see conftest.oldest_server_param).
pytestmark = pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)

VERSIONS_HOST = Path(__file__).parent / "versions_host.py"
STREAMS = 20
#: How far behind the head the serving read model may be: every event appended more than
#: this long ago must be in it.
FRESH_WITHIN = 1.0


@pytest.fixture
async def store(postgres_dsn: str) -> AsyncIterator[PostgresStore]:
    async with PostgresHarness(postgres_dsn).open_store() as store:
        assert isinstance(store, PostgresStore)
        yield store


class VersionHosts(RecordingHosts):
    """Host processes running `VERSIONS_HOST`; ``start("V:P:B")`` runs version V in P
    partitions with batches of B, and ``runs[pid]`` is ``{"V"}``."""

    def __init__(self, nursery: trio.Nursery, dsn: str, schema: str, logs: Path) -> None:
        super().__init__(nursery, dsn, schema, "", logs)
        self._argv = [sys.executable, str(VERSIONS_HOST), schema]

    async def terminate(self, pid: int) -> None:
        """SIGTERM host *pid* and wait until it has stopped, cleanly."""
        process = self.processes.pop(pid)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await process.wait()
        assert process.returncode == 0, self.said(pid)


@attrs.define
class Writer:
    """Appends a "Deposited" event to one of `STREAMS` streams every few milliseconds (a few
    hundred a second) and remembers, per stream, the versions whose append had returned by
    when."""

    store: PostgresStore
    # (when the append returned, stream, its version then), in the order they returned
    appended: list[tuple[float, str, int]] = attrs.field(factory=list)
    stop: trio.Event = attrs.field(factory=trio.Event)
    # when the backlog was in
    seeded: float = 0

    async def seed(self, events: int) -> None:
        """A backlog of *events*, appended 200 at a time."""
        for n in range(0, events, 200):
            stream = f"acct-{n // 200 % STREAMS}"
            batch = [NewEvent("Deposited", {"amount": k % 7 + 1}) for k in range(200)]
            result = await self.store.append(stream, batch)
            self.appended.append((trio.current_time(), stream, result.stream_versions[stream]))
        self.seeded = trio.current_time()

    async def run(self) -> None:
        """Append until `stop` is set."""
        n = 0
        while not self.stop.is_set():
            stream = f"acct-{n % STREAMS}"
            result = await self.store.append(stream, [NewEvent("Deposited", {"amount": n % 7 + 1})])
            self.appended.append((trio.current_time(), stream, result.stream_versions[stream]))
            n += 1
            await trio.sleep(0.002)

    def due(self, before: float) -> dict[str, int]:
        """Per stream, its greatest version whose append returned before *before*."""
        due: dict[str, int] = {}
        for returned, stream, version in self.appended:
            if returned >= before:
                break
            due[stream] = max(due.get(stream, 0), version)
        return due


async def _behind(
    store: PostgresStore, writer: Writer, at_least: float = 0
) -> tuple[str, dict[str, tuple[int, int]]]:
    """The serving read model's schema, and the streams in which it lacks an event appended
    more than `FRESH_WITHIN` ago, or before *at_least* (with the version it has and the one
    due)."""
    due = writer.due(max(trio.current_time() - FRESH_WITHIN, at_least))
    schema = await store.read_model_schema(NAME)
    seen: dict[str, int] = {}
    # The first version serves at once: before its first batch its table does not exist.
    if await store.admin.fetchval("SELECT to_regclass($1)", f'"{schema}".totals'):
        rows = await store.admin.fetch(f'SELECT stream_id, last_version FROM "{schema}".totals')
        seen = {row["stream_id"]: row["last_version"] for row in rows}
    return schema, {s: (seen.get(s, 0), v) for s, v in due.items() if seen.get(s, 0) < v}


async def _fresh(store: PostgresStore, writer: Writer) -> bool:
    """Whether the serving read model holds the backlog and is fresh."""
    return not (await _behind(store, writer, writer.seeded))[1]


async def _assert_fresh(store: PostgresStore, writer: Writer) -> str:
    """The serving read model holds every event appended more than `FRESH_WITHIN` ago; its
    schema."""
    schema, behind = await _behind(store, writer)
    assert not behind, f"{schema} more than {FRESH_WITHIN}s behind: {behind}"
    return schema


async def _version_caught_up(store: PostgresStore, version: int) -> bool:
    status = [s for s in await store.projection_status() if (s.name, s.version) == (NAME, version)]
    return bool(status) and all(s.checkpoint is not None and s.lag_events == 0 for s in status)


async def _superseded(store: PostgresStore, version: int) -> bool:
    status = [s for s in await store.projection_status() if (s.name, s.version) == (NAME, version)]
    return bool(status) and all(
        s.state is ProjectionState.SUPERSEDED and not s.serving and s.leader is None for s in status
    )


async def _verify(store: PostgresStore, version: int, *, complete: bool) -> int:
    """Version *version*'s read model holds, per stream, a prefix of the stream (all of it
    if *complete*), each event once, and totals that are its fold of exactly that prefix;
    returns how many events it applied."""
    schema = read_model_schema_name(store.schema, NAME, version)
    amounts: dict[str, list[int]] = defaultdict(list)
    ids: dict[object, tuple[str, int]] = {}
    for event in await read_all(store, page_size=5000):
        amounts[event.stream_id].append(event.data["amount"])
        ids[event.event_id] = (event.stream_id, event.stream_version)
    applied = await store.admin.fetch(
        f'SELECT event_id, stream_id, stream_version FROM "{schema}".applied'
    )
    versions: dict[str, set[int]] = defaultdict(set)
    for row in applied:
        assert ids[row["event_id"]] == (row["stream_id"], row["stream_version"])
        versions[row["stream_id"]].add(row["stream_version"])
    totals = {
        row["stream_id"]: (row["total"], row["last_version"])
        for row in await store.admin.fetch(
            f'SELECT stream_id, total, last_version FROM "{schema}".totals'
        )
    }
    for stream, stream_amounts in amounts.items():
        k = len(versions[stream])
        assert versions[stream] == set(range(1, k + 1)), f"v{version}: a gap in {stream}"
        if complete:
            assert k == len(stream_amounts), f"v{version}: {stream} incomplete"
        if k:
            assert totals[stream] == (version * sum(stream_amounts[:k]), k), stream
        else:
            assert stream not in totals
    return len(applied)


async def test_a_new_version_rebuilds_beside_the_serving_one(
    store: PostgresStore, postgres_dsn: str, tmp_path: Path
) -> None:
    """Host A runs version 1; host B, started later over a backlog, runs version 2 (totals
    doubled). While version 2 rebuilds, readers get version 1's schema, within a second of
    the head; then version 2's, for good; version 2 ends with every event exactly once and
    version 1 stops: superseded, its table no longer changing."""
    v1 = read_model_schema_name(store.schema, NAME, 1)
    v2 = read_model_schema_name(store.schema, NAME, 2)
    writer = Writer(store)
    # Enough for a rebuild of several seconds (asserted below), beside version 1 serving.
    await writer.seed(4_000)
    async with trio.open_nursery() as nursery:
        hosts = VersionHosts(nursery, postgres_dsn, store.schema, tmp_path)
        await hosts.start("1:1:200")
        nursery.start_soon(writer.run)
        await eventually(lambda: _fresh(store, writer), within=60)
        await hosts.start("2:1:50")
        started = trio.current_time()
        served: list[str] = []

        async def v2_serves() -> bool:
            # One look as a reader: fresh data from version 1 until version 2 serves.
            schema = await _assert_fresh(store, writer)
            if served and served[-1] != schema:
                assert (served[-1], schema) == (v1, v2), "the served schema went back"
            served.append(schema)
            return schema == v2

        await eventually(v2_serves, within=60)
        assert trio.current_time() - started > 2, "the backlog was too small to see a rebuild"
        assert v1 in served
        [*_, switch] = await store.version_switches(NAME)
        assert (switch.from_version, switch.to_version, switch.reason) == (1, 2, "caught-up")
        assert switch.position is not None

        async def v1_stopped() -> bool:
            assert await _assert_fresh(store, writer) == v2
            return await _superseded(store, 1)

        await eventually(v1_stopped, within=10)
        stopped_at = await store.admin.fetchval(f'SELECT count(*) FROM "{v1}".applied')
        # More appends, applied by version 2, and version 1's table does not move.
        more = len(writer.appended) + 300
        await eventually(lambda: _fresh_until(store, writer, more, v2), within=30)
        assert await store.admin.fetchval(f'SELECT count(*) FROM "{v1}".applied') == stopped_at
        writer.stop.set()
        await eventually(lambda: _version_caught_up(store, 2), within=30)
        assert await store.read_model_schema(NAME) == v2
        nursery.cancel_scope.cancel()
    hosts.close()
    assert await _verify(store, 2, complete=True) == len(await read_all(store, page_size=5000))
    assert await _verify(store, 1, complete=False) == stopped_at
    _assert_never_applied_twice(hosts)


async def _fresh_until(store: PostgresStore, writer: Writer, appended: int, schema: str) -> bool:
    """Whether the writer has appended *appended* events; meanwhile *schema* serves, fresh."""
    assert await _assert_fresh(store, writer) == schema
    return len(writer.appended) >= appended


def _assert_never_applied_twice(hosts: VersionHosts) -> None:
    # A second application of an event fails its batch on the primary key of `applied`:
    # the host logs it, and retries it for ever.
    for pid in hosts.runs:
        assert "applied_pkey" not in hosts.said(pid), hosts.said(pid)


async def _leaders(store: PostgresStore, version: int) -> dict[str, int | None]:
    """Version *version*'s units, and the pid leading each."""
    return {
        s.unit: None if s.leader is None else s.leader.pid
        for s in await store.projection_status()
        if (s.name, s.version) == (NAME, version)
    }


async def _all_led(store: PostgresStore, version: int, units: int, pids: set[int]) -> bool:
    leaders = await _leaders(store, version)
    return len(leaders) == units and all(pid in pids for pid in leaders.values())


async def test_a_rolling_deploy_with_kills(
    store: PostgresStore, postgres_dsn: str, tmp_path: Path
) -> None:
    """Three hosts run version 1 (two partitions) under continuous appends; they are
    replaced one by one by hosts running version 2 (three partitions, totals doubled): one
    old host is killed with SIGKILL, one stopped with SIGTERM, and a new one killed with
    SIGKILL mid-rebuild and started again. Version 2 takes over and ends with every event
    exactly once; version 1 applied a prefix of each stream, each event once."""
    v2 = read_model_schema_name(store.schema, NAME, 2)
    writer = Writer(store)
    await writer.seed(6_000)
    async with trio.open_nursery() as nursery:
        hosts = VersionHosts(nursery, postgres_dsn, store.schema, tmp_path)
        old = {await hosts.start("1:2:200") for _ in range(3)}
        nursery.start_soon(writer.run)
        await eventually(lambda: _all_led(store, 1, 2, old), within=30)
        await eventually(lambda: _fresh(store, writer), within=60)
        new = {await hosts.start("2:3:100")}
        # SIGKILL an old host that leads a unit: its unit fails over to another old host.
        victim = next(pid for pid in (await _leaders(store, 1)).values() if pid is not None)
        hosts.kill(victim)
        old.remove(victim)
        new.add(await hosts.start("2:3:100"))
        await eventually(lambda: _all_led(store, 2, 3, new), within=30)

        async def rebuilding() -> bool:
            # Version 2 has applied something, led by both new hosts, and still builds.
            assert await store.serving_version(NAME) == 1
            leaders = set((await _leaders(store, 2)).values())
            applied = await store.admin.fetchval(f'SELECT count(*) FROM "{v2}".applied')
            return leaders == new and applied > 0

        await eventually(rebuilding, within=30)
        leaders = list((await _leaders(store, 2)).values())
        victim = max(new, key=leaders.count)
        hosts.kill(victim)
        new.remove(victim)
        assert await store.serving_version(NAME) == 1, "the kill came too late"
        new.add(await hosts.start("2:3:100"))
        # SIGTERM an old host: what it leads is handed to the last one.
        await hosts.terminate(old.pop())
        new.add(await hosts.start("2:3:100"))
        await eventually(lambda: _all_led(store, 1, 2, old), within=30)

        async def v2_serves() -> bool:
            return await store.read_model_schema(NAME) == v2

        await eventually(v2_serves, within=60)
        await eventually(lambda: _superseded(store, 1), within=10)
        await hosts.terminate(old.pop())
        more = len(writer.appended) + 200
        await eventually(lambda: _fresh_until(store, writer, more, v2), within=30)
        writer.stop.set()
        await eventually(lambda: _version_caught_up(store, 2), within=30)
        assert await store.read_model_schema(NAME) == v2
        nursery.cancel_scope.cancel()
    hosts.close()
    _assert_never_applied_twice(hosts)
    assert await _verify(store, 2, complete=True) == len(await read_all(store, page_size=5000))
    assert await _verify(store, 1, complete=False) > 6_000
