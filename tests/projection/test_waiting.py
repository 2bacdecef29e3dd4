"""wait_for_projections: read-your-writes across backends, partitions and filters."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from eventcore_trio import (
    InvalidArgument,
    NewEvent,
    ProjectionConfig,
    ProjectionContext,
    ProjectionLagging,
    RecordedEvent,
    StateCache,
    Store,
    execute,
    partition_of,
    projector,
    run_projection,
    wait_for_projections,
)
from eventcore_trio.demo import OpenAccount, Transfer, registry
from eventcore_trio.testing import BackendHarness, MemoryHarness, PostgresHarness

balances: dict[str, int] = {}


@projector("balances", event_types=["AccountOpened", "MoneyWithdrawn", "MoneyDeposited"])
async def balance_view(event: RecordedEvent, ctx: ProjectionContext) -> None:
    change = {"AccountOpened": "initial", "MoneyDeposited": "amount"}.get(event.type)
    amount = int(event.data[change]) if change else -int(event.data["amount"])
    balances[event.stream_id] = balances.get(event.stream_id, 0) + amount


@projector("audit", partitions=4)
async def audit(event: RecordedEvent, ctx: ProjectionContext) -> None:
    pass


class WaitingContract:
    """wait_for_projections on every backend."""

    @pytest.fixture
    async def store(self, harness: BackendHarness) -> AsyncIterator[Store]:
        balances.clear()
        async with harness.open_store() as store:
            yield store

    async def test_returns_once_the_write_is_applied(self, store: Store) -> None:
        """After the wait, the read model shows the command's own write."""
        cache = StateCache()
        for account in ("alice", "bob"):
            await execute(store, OpenAccount(account, 100), registry=registry, cache=cache)
        config = ProjectionConfig(continuous=True, poll_interval=0.05)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_projection, store, balance_view, config)
            for amount in (10, 20, 30):
                result = await execute(
                    store, Transfer("alice", "bob", amount), registry=registry, cache=cache
                )
                await wait_for_projections(store, [balance_view], result.append, timeout=10)
                assert balances["bob"] == 100 + sum(range(10, amount + 1, 10))
            nursery.cancel_scope.cancel()

    async def test_times_out_naming_the_lagging_projection(self, store: Store) -> None:
        """No host runs it: the error names it and the position, after the timeout."""
        result = await execute(store, OpenAccount("alice", 5), registry=registry)
        with pytest.raises(ProjectionLagging) as raised:
            await wait_for_projections(store, [balance_view], result.append, timeout=0.1)
        assert raised.value.lagging == ("balances",)
        assert result.append is not None
        assert raised.value.position == result.append.position
        assert "'balances'" in str(raised.value)

    async def test_a_cancel_scope_stops_the_wait(self, store: Store) -> None:
        """Cancelled from outside, it just stops: no error, nothing left behind."""
        result = await execute(store, OpenAccount("alice", 5), registry=registry)
        with trio.move_on_after(0.05) as scope:
            await wait_for_projections(store, [balance_view], result.append, timeout=60)
        assert scope.cancelled_caught

    async def test_events_a_projection_does_not_apply_are_not_waited_for(
        self, store: Store
    ) -> None:
        """Filtered out, or nothing written: it returns at once, though nothing runs."""
        result = await store.append("log", [NewEvent("Logged", {})])
        await wait_for_projections(store, [balance_view], result, timeout=0)
        await wait_for_projections(store, [balance_view], None, timeout=0)

    async def test_only_the_partitions_of_the_written_streams(self, store: Store) -> None:
        """An AppendResult names its streams: only their partitions are waited for; a bare
        position waits for every partition with events before it."""
        for n in range(12):
            await store.append(f"s{n}", [NewEvent("Noted", {})])
        result = await store.append("target", [NewEvent("Noted", {})])
        mine = f"audit[{partition_of('target', 4).index}/4]"
        with pytest.raises(ProjectionLagging) as raised:
            await wait_for_projections(store, [audit], result, timeout=0.05)
        assert raised.value.lagging == (mine,)
        assert result.position is not None
        with pytest.raises(ProjectionLagging) as raised:
            await wait_for_projections(store, [audit], result.position, timeout=0.05)
        assert len(raised.value.lagging) == 4
        await run_projection(store, audit)
        await wait_for_projections(store, [audit], result, timeout=0)

    async def test_goes_by_the_units_the_store_records(self, store: Store) -> None:
        """Given a projector with another partition count than its projection runs as (code
        from before or after a split), it waits for the units that run: no false lag after
        a 2 -> 4 split, and a lag names the units of the recorded count."""

        async def nothing(event: RecordedEvent, ctx: ProjectionContext) -> None:
            pass

        one, two, four = (projector("orders", partitions=n)(nothing) for n in (1, 2, 4))
        for n in range(8):
            await store.append(f"order-{n}", [NewEvent("Placed", {})])
        await run_projection(store, two)
        before_split = await store.append("order-1", [NewEvent("Placed", {})])
        unit_of_two = f"orders[{partition_of('order-1', 2).index}/2]"
        # Newer code, hosts not yet split: the two units that run are waited for.
        with pytest.raises(ProjectionLagging) as raised:
            await wait_for_projections(store, [four], before_split, timeout=0)
        assert raised.value.lagging == (unit_of_two,)
        await run_projection(store, four)  # the split, which applies the write
        assert await store.recorded_partitions("orders") == 4
        for old in (two, one):
            await wait_for_projections(store, [old], before_split, timeout=0)
            assert before_split.position is not None
            await wait_for_projections(store, [old], before_split.position, timeout=0)
        after_split = await store.append("order-1", [NewEvent("Placed", {})])
        with pytest.raises(ProjectionLagging) as raised:
            await wait_for_projections(store, [two], after_split, timeout=0)
        assert raised.value.lagging == (f"orders[{partition_of('order-1', 4).index}/4]",)

    async def test_bad_arguments(self, store: Store) -> None:
        """Names instead of projectors, bad positions and timeouts are refused."""
        with pytest.raises(InvalidArgument, match="projectors"):
            await wait_for_projections(store, "balances", None)
        with pytest.raises(InvalidArgument, match="AppendResult"):
            await wait_for_projections(store, [balance_view], "1:1")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="timeout"):
            await wait_for_projections(store, [balance_view], None, timeout=-1)


class TestMemoryWaiting(WaitingContract):
    """On the in-memory store."""

    @pytest.fixture
    def harness(self) -> BackendHarness:
        return MemoryHarness()


class TestPostgresWaiting(WaitingContract):
    """On PostgreSQL."""

    @pytest.fixture
    def harness(self, postgres_dsn: str) -> BackendHarness:
        return PostgresHarness(postgres_dsn)
