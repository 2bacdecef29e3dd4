"""A change of partition count while hosts of the old count run (a rolling deploy).

Old hosts run ``orders`` with 2 partitions, a new host with 4, in this process, each on a
store of its own (its own sessions), on one schema. What must hold (docs/scale-out.md,
"Changing the partition count"): the new host reports started at once; every unit of the
recorded count stays led by the old hosts, through lost sessions and hand-offs, however long
the new host waits; the split happens once the old hosts are gone, and continues from their
checkpoints, every event applied exactly once (written through ``ctx.db``).
"""

from __future__ import annotations

import types
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import pytest
import trio

from eventcore_trio import (
    LeadershipLost,
    LeadershipUnavailable,
    NewEvent,
    ProjectionState,
    RecordedEvent,
)
from eventcore_trio.postgres import PostgresLeadership, PostgresStore, _membership
from eventcore_trio.postgres._keys import projector_lock_key
from eventcore_trio.postgres._leadership import fenced_transaction, try_acquire_all
from eventcore_trio.projection import (
    ProjectionConfig,
    ProjectionContext,
    projector,
    run_projection,
    run_projections,
)
from eventcore_trio.projection._balance import _score
from eventcore_trio.testing import PostgresHarness

from ..helpers import eventually

CONFIG = ProjectionConfig(balance_interval=0.1, poll_interval=0.2, batch_size=10)
OLD = [f"orders[{i}/2]" for i in range(2)]
NEW = [f"orders[{i}/4]" for i in range(4)]


def _recorder(app: str, partitions: int) -> object:
    # Records every event it applies in the batch's transaction: exactly once, or the
    # test's final check fails.
    @projector("orders", partitions=partitions)
    async def orders(event: RecordedEvent, ctx: ProjectionContext) -> None:
        await ctx.db.execute(
            f'INSERT INTO "{app}".applied (unit, stream_id, version, event_id) '
            "VALUES ($1, $2, $3, $4)",
            f"orders[{ctx.partition}/{ctx.partitions}]",
            event.stream_id,
            event.stream_version,
            event.event_id,
        )

    return orders


class Hosts:
    """Balancing hosts of one test, each `run_projections` on a store of its own."""

    def __init__(self, nursery: trio.Nursery, harness: PostgresHarness, app: str) -> None:
        self._nursery = nursery
        self._harness = harness
        self._app = app
        self._scopes: dict[str, trio.CancelScope] = {}

    async def start(self, name: str, partitions: int) -> None:
        """Start host *name* (its stores' application_name) and return once it reports
        started (`run_projections` under ``nursery.start``)."""
        scope = self._scopes[name] = trio.CancelScope()
        harness = PostgresHarness(
            self._harness.dsn, schema=self._harness.schema, application_name=name
        )

        async def host(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                async with harness.open_store() as store:
                    await run_projections(
                        store, [_recorder(self._app, partitions)], CONFIG, task_status=task_status
                    )

        await self._nursery.start(host)

    def stop(self, name: str) -> None:
        self._scopes[name].cancel()


async def _app_schema(store: PostgresStore) -> str:
    app = f"app_{uuid.uuid4().hex[:10]}"
    await store.admin.execute(
        f'CREATE SCHEMA "{app}"; CREATE TABLE "{app}".applied (id bigserial PRIMARY KEY, '
        "unit text NOT NULL, stream_id text NOT NULL, version bigint NOT NULL, "
        "event_id uuid NOT NULL)"
    )
    return app


async def _append(store: PostgresStore, first: int, count: int) -> None:
    for n in range(first, first + count):
        await store.append(f"order-{n % 20}", [NewEvent("Placed", {"n": n})])


async def _leads(store: PostgresStore, host: str) -> set[str]:
    """What host *host* (its application name) published that it leads."""
    rows = await store.admin.fetch(
        f'SELECT leads FROM "{store.schema}".hosts WHERE application = $1', host
    )
    return {unit for row in rows for unit in row["leads"]}


async def _leads_all(store: PostgresStore, host: str, units: list[str]) -> bool:
    return await _leads(store, host) == set(units)


async def _holder(store: PostgresStore, unit: str) -> str | None:
    """The application_name of the session holding *unit*'s lock, if any."""
    name: str | None = await store.admin.fetchval(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND ((l.classid::bigint << 32) | l.objid::bigint) = $1",
        projector_lock_key(store.schema, unit),
    )
    return name


def _condition(
    store: PostgresStore, check: Callable[[dict[str, tuple[ProjectionState, bool, int]]], bool]
) -> Callable[[], Awaitable[bool]]:
    """A predicate over the orders units' (state, led, lag) in status, for `eventually`."""

    async def holds() -> bool:
        units = {
            s.unit: (s.state, s.leader is not None, s.lag_events)
            for s in await store.projection_status()
            if s.name == "orders"
        }
        return check(units)

    return holds


def _old_led_new_waiting(units: dict[str, tuple[ProjectionState, bool, int]]) -> bool:
    return all(units.get(u, (None,))[:2] == (ProjectionState.RUNNING, True) for u in OLD) and all(
        units.get(u, (None,))[0] is ProjectionState.AWAITING_SPLIT for u in NEW
    )


def _caught_up(units: dict[str, tuple[ProjectionState, bool, int]]) -> bool:
    return all(lag == 0 for _, _, lag in units.values())


async def _verify(store: PostgresStore, app: str, events: int) -> None:
    """Every event applied exactly once, each stream's in order."""
    rows = await store.admin.fetch(
        f'SELECT stream_id, version, event_id FROM "{app}".applied ORDER BY id'
    )
    assert len(rows) == events
    assert len({row["event_id"] for row in rows}) == events, "an event was applied twice"
    versions: dict[str, list[int]] = {}
    for row in rows:
        versions.setdefault(row["stream_id"], []).append(row["version"])
    assert all(v == list(range(1, len(v) + 1)) for v in versions.values())


async def test_new_host_reports_started_while_old_count_hosts_run(
    harness: PostgresHarness, store: PostgresStore
) -> None:
    """A host with the new count reports started (and publishes) while a host of the old
    count runs, its units waiting for the split; the split happens once the old host stops,
    continuing from its checkpoints."""
    app = await _app_schema(store)
    await _append(store, 0, 40)
    async with trio.open_nursery() as nursery:
        hosts = Hosts(nursery, harness, app)
        await hosts.start("a1", 2)
        with trio.fail_after(30):
            await hosts.start("b", 4)  # while a1 leads every unit of the recorded count
        await eventually(lambda: _leads_all(store, "b", NEW), within=10)  # it publishes
        await eventually(_condition(store, _old_led_new_waiting), within=30)
        await eventually(_condition(store, _caught_up), within=30)
        status = {s.unit: s for s in await store.projection_status() if s.name == "orders"}
        assert sorted(status) == sorted(OLD + NEW)
        for unit in NEW:
            # No checkpoint of its own yet; its lag counts from its parent's checkpoint.
            assert status[unit].checkpoint is None
            assert status[unit].leader is None
            assert status[unit].runnable_by == 1
            assert len(status[unit].lacking_hosts) == 1
        await _append(store, 40, 20)  # applied by a1, under the recorded count
        await eventually(_condition(store, _caught_up), within=30)
        assert await _leads(store, "a1") == set(OLD)
        hosts.stop("a1")

        async def split() -> bool:
            units = {s.unit: s for s in await store.projection_status() if s.name == "orders"}
            return sorted(units) == NEW and all(s.leader is not None for s in units.values())

        await eventually(split, within=30)
        await _append(store, 60, 20)
        await eventually(_condition(store, _caught_up), within=30)
        nursery.cancel_scope.cancel()
    await _verify(store, app, 80)


async def test_old_unit_stays_led_while_a_new_count_host_waits_to_split(
    harness: PostgresHarness, store: PostgresStore
) -> None:
    """A lost lock session of an old-count unit, while a new-count host waits to split,
    goes back to the live old host that runs it (never to the waiting split), which applies
    its events again at once."""
    app = await _app_schema(store)
    await _append(store, 0, 40)
    async with trio.open_nursery() as nursery:
        hosts = Hosts(nursery, harness, app)
        await hosts.start("a1", 2)
        await eventually(lambda: _leads_all(store, "a1", OLD), within=30)
        with trio.fail_after(30):
            await hosts.start("b", 4)
        await eventually(_condition(store, _old_led_new_waiting), within=30)
        lost = await store.admin.fetchval(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
            "AND ((classid::bigint << 32) | objid::bigint) = $1",
            projector_lock_key(store.schema, "orders[0/2]"),
        )
        assert await store.admin.fetchval("SELECT pg_terminate_backend($1)", lost)
        await _append(store, 40, 20)

        async def led_again() -> bool:
            holder = await _holder(store, "orders[0/2]")
            return holder is not None and holder.startswith("a1 leader")

        await eventually(led_again, within=15)
        await eventually(_condition(store, _old_led_new_waiting), within=15)
        await eventually(_condition(store, _caught_up), within=30)
        nursery.cancel_scope.cancel()
    await _verify(store, app, 60)


def _host_id_keeping(unit: str, other: str) -> str:
    """A host id whose host, leading both *unit* and *other*, keeps *unit* and hands *other*
    off when a second host joins (rendezvous hashing, projection/_balance.py)."""
    n = 0
    while _score(unit, f"{n:032x}") >= _score(other, f"{n:032x}"):
        n += 1
    return f"{n:032x}"


async def test_graceful_hand_off_between_old_hosts_during_a_count_change(
    harness: PostgresHarness, store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a new-count host waits to split, a second old-count host joins and the first
    hands it orders[0/2] (the recipient stands by first, then the holder releases): the
    recipient leads it, and nothing is lost or applied twice."""
    app = await _app_schema(store)
    await _append(store, 0, 40)
    # a1 registers first: its id makes it keep orders[1/2] and hand orders[0/2] to a2.
    ids = iter([_host_id_keeping("orders[1/2]", "orders[0/2]")])
    monkeypatch.setattr(
        _membership,
        "uuid",
        types.SimpleNamespace(uuid4=lambda: types.SimpleNamespace(hex=next(ids, None))),
    )

    def fresh_ids() -> None:
        # Every later registration (b, a2, re-registrations) gets a random id.
        monkeypatch.setattr(_membership, "uuid", uuid)

    async with trio.open_nursery() as nursery:
        hosts = Hosts(nursery, harness, app)
        await hosts.start("a1", 2)
        fresh_ids()
        await eventually(lambda: _leads_all(store, "a1", OLD), within=30)
        with trio.fail_after(30):
            await hosts.start("b", 4)
        await eventually(_condition(store, _old_led_new_waiting), within=30)
        await hosts.start("a2", 2)
        await eventually(lambda: _leads_all(store, "a1", ["orders[1/2]"]), within=30)

        async def a2_leads_it() -> bool:
            holder = await _holder(store, "orders[0/2]")
            return holder is not None and holder.startswith("a2 leader")

        await eventually(a2_leads_it, within=10)
        await _append(store, 40, 20)
        await eventually(_condition(store, _old_led_new_waiting), within=15)
        await eventually(_condition(store, _caught_up), within=30)
        assert await _leads(store, "a2") == {"orders[0/2]"}
        nursery.cancel_scope.cancel()
    await _verify(store, app, 60)


async def _standbys(store: PostgresStore, unit: str) -> int:
    """How many leader sessions (standbys) wait for *unit*'s lock."""
    n: int = await store.admin.fetchval(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND NOT l.granted AND l.objsubid = 1 "
        "AND ((l.classid::bigint << 32) | l.objid::bigint) = $1 "
        "AND a.application_name LIKE '% leader %'",
        projector_lock_key(store.schema, unit),
    )
    return n


async def _waits_for(store: PostgresStore, unit: str) -> bool:
    return await _standbys(store, unit) > 0


async def _free(store: PostgresStore, unit: str) -> bool:
    return await _holder(store, unit) is None


async def _ran_with_two_partitions(store: PostgresStore) -> None:
    """orders ran with 2 partitions: its units have checkpoints (status lists them)."""

    @projector("orders", partitions=2)
    async def orders(event: RecordedEvent, ctx: ProjectionContext) -> None:
        pass

    await _append(store, 0, 10)
    await run_projection(store, orders)


async def test_a_waiting_split_never_overtakes_a_standby(store: PostgresStore) -> None:
    """A split that waits for the old count's units holds none of their locks and never
    queues for one: a lock its leader releases goes to the standby that waits for it, even
    one that started waiting after the split did; the split happens once both units stop."""
    await _ran_with_two_partitions(store)
    split_waits = trio.Event()
    split_done = trio.Event()

    async def split() -> None:
        # As a unit of the new count does: under its own lock (so status lists it).
        async with store.try_acquire("orders[2/4]"):
            await store.set_partitions("orders", 4, on_waiting=split_waits.set)
        split_done.set()

    async with trio.open_nursery() as nursery:
        async with store.try_acquire("orders[1/2]"):
            first = trio.CancelScope()
            async with trio.open_nursery() as leaders:

                async def lead_first(task_status: trio.TaskStatus[None]) -> None:
                    with first:
                        async with store.try_acquire("orders[0/2]"):
                            task_status.started()
                            await trio.sleep_forever()

                await leaders.start(lead_first)
                nursery.start_soon(split)
                with trio.fail_after(10):
                    await split_waits.wait()
                standby_leads = trio.Event()

                async def stand_by() -> None:
                    async with store.wait_acquire("orders[0/2]"):
                        standby_leads.set()
                        await trio.sleep_forever()

                leaders.start_soon(stand_by)
                await eventually(lambda: _waits_for(store, "orders[0/2]"), within=10)
                first.cancel()  # the leader of orders[0/2] goes; its standby must lead
                with trio.fail_after(10):
                    await standby_leads.wait()
                holder = await _holder(store, "orders[0/2]")
                assert holder is not None
                assert " leader " in holder
                assert await store.recorded_partitions("orders") == 2
                assert not split_done.is_set()
                status = {s.unit: s.state for s in await store.projection_status()}
                assert status["orders[0/2]"] is ProjectionState.RUNNING
                assert status["orders[2/4]"] is ProjectionState.AWAITING_SPLIT
                leaders.cancel_scope.cancel()
        with trio.fail_after(10):
            await split_done.wait()
    assert await store.recorded_partitions("orders") == 4


async def test_all_locks_of_a_change_or_none_and_a_fenced_commit(
    harness: PostgresHarness, store: PostgresStore
) -> None:
    """The change takes every lock of the old count at once or keeps none, shows the units
    as repartitioning (not resetting) while it holds them, and commits only while its
    session holds all of them."""
    await _ran_with_two_partitions(store)
    keys = [projector_lock_key(store.schema, unit) for unit in OLD]

    def take_all() -> AbstractAsyncContextManager[PostgresLeadership]:
        return try_acquire_all(
            harness.dsn,
            names=OLD,
            keys=keys,
            context=store._leadership_context,
            application_name="test repartition orders",
            connect_timeout=10,
        )

    async with store.try_acquire("orders[1/2]"):
        with pytest.raises(LeadershipUnavailable):
            async with take_all():
                pytest.fail("took the old units while one is led")
        await eventually(lambda: _free(store, "orders[0/2]"), within=5)  # none kept
    async with take_all() as leadership:
        status = {s.unit: s.state for s in await store.projection_status()}
        assert [status[u] for u in OLD] == [ProjectionState.REPARTITIONING] * 2
        async with leadership._use() as connection:
            await connection.execute("SELECT pg_advisory_unlock($1)", keys[1])
        with pytest.raises(LeadershipLost):
            async with fenced_transaction(leadership, keys) as connection:
                pytest.fail("a transaction opened without every lock")
