"""Partitioned projections on every backend: units, ctx.partition, splits, reset, status."""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from typing import Any, cast

import pytest
import trio

from eventcore_trio import (
    EventFilter,
    InvalidArgument,
    NewEvent,
    Partition,
    PartitionsChanged,
    PartitionsMismatch,
    ProjectionRunning,
    ProjectionState,
    RecordedEvent,
    Store,
    partition_of,
)
from eventcore_trio.projection import (
    Failure,
    FailureStrategy,
    ProjectionConfig,
    ProjectionContext,
    projector,
    replay_dead_letters,
    run_projection,
    run_projections,
)
from eventcore_trio.testing import BackendHarness, MemoryHarness, PostgresHarness, wait_caught_up

from ..helpers import eventually
from .test_runtime import _reset_waits

STREAMS = [f"order-{i}" for i in range(40)]
# One stream in each partition of 4 (pinned by the stable hash, tests/test_partitions.py).
ONE_PER_PARTITION = ["order-0", "order-1", "order-2", "order-3"]


async def _append_round(store: Store, round_: int) -> None:
    for stream in STREAMS:
        await store.append(stream, [NewEvent("E", {"stream": stream, "v": round_})])


class Applied:
    """Per partition, per stream, the versions applied, in the order they were applied."""

    def __init__(self, name: str = "orders", partitions: int = 4) -> None:
        self.by_partition: dict[int | None, dict[str, list[int]]] = defaultdict(
            lambda: defaultdict(list)
        )
        self.fail_streams: set[str] = set()
        # Replaced after every applied event, so waiters can await the next one.
        self._changed = trio.Event()

        @projector(name, partitions=partitions, on_error=lambda f: self.on_error(f))
        async def apply(event: RecordedEvent, ctx: ProjectionContext) -> None:
            assert ctx.projector == name
            assert ctx.partitions == partitions
            if event.stream_id in self.fail_streams:
                raise ValueError(f"refusing {event.stream_id}")
            self.by_partition[ctx.partition][event.stream_id].append(event.stream_version)
            self._changed.set()
            self._changed = trio.Event()

        self.projector = apply

    def on_error(self, failure: Failure) -> FailureStrategy:
        return FailureStrategy.SKIP

    async def wait_for(self, count: int) -> None:
        """Wait until *count* events have been applied in all."""
        with trio.fail_after(20):
            while sum(len(v) for v in self.versions().values()) < count:
                await self._changed.wait()

    def versions(self) -> dict[str, list[int]]:
        merged: dict[str, list[int]] = defaultdict(list)
        for streams in self.by_partition.values():
            for stream, versions in streams.items():
                merged[stream].extend(versions)
        return merged


class _SplitsAfterFirstLook:
    """A store whose projection *name* is split to *count* partitions right after the first
    `recorded_partitions` reads it: a host's split racing an operator's replay."""

    def __init__(self, store: Store, name: str, count: int) -> None:
        self._store = store
        self._name = name
        self._count = count
        self._split = False

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._store, attribute)

    async def recorded_partitions(self, name: str) -> int | None:
        count = await self._store.recorded_partitions(name)
        if name == self._name and not self._split:
            self._split = True
            await self._store.set_partitions(name, self._count)
        return count


class PartitionContract:
    """What partitioned projections promise, whatever the backend."""

    async def test_partition_filters_divide_the_streams(self, store: Store) -> None:
        """Partitions of one count are disjoint, cover every event, and apply before limit."""
        await _append_round(store, 1)
        seen: list[str] = []
        for index in range(3):
            only = EventFilter(partition=Partition(index, 3))
            page = await store.read_events(None, limit=1000, filter=only)
            assert page, "40 streams leave no partition of 3 empty"
            assert all(partition_of(e.stream_id, 3).index == index for e in page)
            first = await store.read_events(None, limit=1, filter=only)
            assert first == page[:1]
            assert await store.last_position(only) == page[-1].position
            seen += [e.stream_id for e in page]
        assert sorted(seen) == sorted(STREAMS)

    async def test_units_apply_each_stream_in_order_in_one_partition(self, store: Store) -> None:
        """Every event once, each stream in one partition, versions in order; ctx says which."""
        applied = Applied()
        for round_ in range(3):
            await _append_round(store, round_)
        result = await run_projection(store, applied.projector, ProjectionConfig(batch_size=7))
        assert result.events_applied == 120
        assert set(applied.by_partition) == {0, 1, 2, 3}
        for partition, streams in applied.by_partition.items():
            for stream, versions in streams.items():
                assert partition_of(stream, 4).index == partition
                assert versions == [1, 2, 3]
        assert sorted(applied.versions()) == sorted(STREAMS)
        status = [s for s in await store.projection_status() if s.name == "orders"]
        assert [(s.partition, s.partitions) for s in status] == [(i, 4) for i in range(4)]
        assert [s.unit for s in status] == [f"orders[{i}/4]" for i in range(4)]
        assert all(s.lag_events == 0 and s.checkpoint is not None for s in status)

    async def test_units_run_in_a_host_and_follow_new_events(self, store: Store) -> None:
        """run_projections runs every unit; new events reach their stream's partition."""
        applied = Applied()
        await _append_round(store, 1)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_projections, store, [applied.projector])
            await _append_round(store, 2)
            await applied.wait_for(80)
            nursery.cancel_scope.cancel()
        assert all(v == [1, 2] for v in applied.versions().values())

    async def test_split_continues_from_the_parent_checkpoints(self, store: Store) -> None:
        """2 -> 4 -> 8: nothing applied twice, nothing skipped, order kept."""
        two = Applied(partitions=2)
        await _append_round(store, 1)
        await run_projection(store, two.projector)
        await _append_round(store, 2)
        four = Applied(partitions=4)
        result = await run_projection(store, four.projector)
        assert result.events_applied == 40
        assert all(v == [2] for v in four.versions().values())
        await _append_round(store, 3)
        eight = Applied(partitions=8)
        await run_projection(store, eight.projector)
        assert all(v == [3] for v in eight.versions().values())
        status = [s for s in await store.projection_status() if s.name == "orders"]
        assert [s.partition for s in status] == list(range(8))

    async def test_a_split_waits_for_the_old_count_s_host_which_keeps_leading(
        self, store: Store
    ) -> None:
        """A rolling deploy: a host with 4 partitions starts beside a host with 2 and
        reports started; the old host keeps leading and applying every unit of 2 while the
        units of 4 await the split (status says so); once it stops, the split continues
        from its checkpoints."""
        two, four = Applied(partitions=2), Applied(partitions=4)
        await _append_round(store, 1)
        config = ProjectionConfig(balance_interval=0.1, poll_interval=0.2)
        old_host = trio.CancelScope()

        async def run_old(task_status: trio.TaskStatus[None]) -> None:
            with old_host:
                await run_projections(store, [two.projector], config, task_status=task_status)

        async with trio.open_nursery() as nursery:
            await nursery.start(run_old)
            await two.wait_for(40)
            with trio.fail_after(20):
                await nursery.start(run_projections, store, [four.projector], config)
            await _append_round(store, 2)
            await wait_caught_up(store, [two.projector], timeout=20)
            status = {s.unit: s for s in await store.projection_status() if s.name == "orders"}
            assert set(status) == {f"orders[{i}/2]" for i in range(2)} | {
                f"orders[{i}/4]" for i in range(4)
            }
            for i in range(2):
                assert status[f"orders[{i}/2]"].state is ProjectionState.RUNNING
            for i in range(4):
                waiting = status[f"orders[{i}/4]"]
                assert waiting.state is ProjectionState.AWAITING_SPLIT
                assert waiting.checkpoint is None
                assert waiting.lag_events == 0  # counted from its parent's checkpoint
                assert waiting.runnable_by == 1
            assert four.versions() == {}
            old_host.cancel()

            async def split() -> bool:
                units = [s for s in await store.projection_status() if s.name == "orders"]
                return [s.partitions for s in units] == [4] * 4 and all(
                    s.state is ProjectionState.RUNNING for s in units
                )

            await eventually(split, within=20)
            await _append_round(store, 3)
            await four.wait_for(40)
            nursery.cancel_scope.cancel()
        assert all(v == [1, 2] for v in two.versions().values())
        assert all(v == [3] for v in four.versions().values())

    async def test_an_unpartitioned_projection_can_be_split(self, store: Store) -> None:
        """A projection that ran unpartitioned splits into K without replaying anything."""
        one = Applied(partitions=1)
        await _append_round(store, 1)
        await run_projection(store, one.projector)
        assert set(one.by_partition) == {None}
        four = Applied(partitions=4)
        await _append_round(store, 2)
        await run_projection(store, four.projector)
        assert all(v == [2] for v in four.versions().values())

    async def test_other_changes_are_refused_unless_nothing_was_applied(self, store: Store) -> None:
        """4 -> 3 and 4 -> 2 are refused naming reset; after a reset any count is allowed."""
        await _append_round(store, 1)
        await run_projection(store, Applied(partitions=4).projector)
        for count in (3, 2, 1):
            with pytest.raises(PartitionsChanged, match="eventcore-trio reset orders") as info:
                await run_projection(store, Applied(partitions=count).projector)
            assert (info.value.current, info.value.requested) == (4, count)
        await store.reset_projection("orders")
        three = Applied(partitions=3)
        await run_projection(store, three.projector)
        assert all(v == [1] for v in three.versions().values())
        status = [s for s in await store.projection_status() if s.name == "orders"]
        assert [s.partition for s in status] == [0, 1, 2]

    async def test_reset_takes_every_partition_or_none(self, store: Store) -> None:
        """While any unit runs, reset is refused and changes nothing; then it resets all."""
        await _append_round(store, 1)
        await run_projection(store, Applied().projector)
        before = {s.unit: s.checkpoint for s in await store.projection_status()}
        async with store.try_acquire("orders[2/4]"):
            with pytest.raises(ProjectionRunning):
                await store.reset_projection("orders")
        assert {s.unit: s.checkpoint for s in await store.projection_status()} == before
        await store.reset_projection("orders")
        status = [s for s in await store.projection_status() if s.name == "orders"]
        assert len(status) == 4
        assert all(s.checkpoint is None for s in status)
        assert [s.lag_events for s in status] == [
            sum(1 for stream in STREAMS if partition_of(stream, 4).index == i) for i in range(4)
        ]
        again = Applied()
        assert (await run_projection(store, again.projector)).events_applied == 40

    async def test_reset_while_hosts_run_waits_then_rebuilds(self, store: Store) -> None:
        """reset(wait=True) waits for every running unit to stop; the next host rebuilds."""
        await _append_round(store, 1)
        running = Applied()
        reset_done = trio.Event()

        async def reset() -> None:
            await store.reset_projection("orders", wait=True)
            reset_done.set()

        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as hosts:
                await hosts.start(run_projections, store, [running.projector])
                await running.wait_for(40)
                outer.start_soon(reset)
                await eventually(partial(_reset_waits, store, "orders[0/4]"))
                assert not reset_done.is_set()
                hosts.cancel_scope.cancel()
            with trio.fail_after(20):
                await reset_done.wait()
        rebuilt = Applied()
        assert (await run_projection(store, rebuilt.projector)).events_applied == 40

    async def test_dead_letters_follow_their_stream_through_a_split(self, store: Store) -> None:
        """Skipped events are listed for the projection, and move to their new partition."""
        await _append_round(store, 1)
        failing = Applied(partitions=2)
        failing.fail_streams = {"order-3", "order-7"}
        await run_projection(store, failing.projector)
        letters = await store.dead_letters("orders")
        assert sorted(d.event.stream_id for d in letters) == ["order-3", "order-7"]
        assert all(d.projection == "orders" for d in letters)
        assert all(d.partition == partition_of(d.event.stream_id, 2).index for d in letters)
        await run_projection(store, Applied(partitions=4).projector)
        moved = await store.dead_letters("orders")
        assert all(d.partition == partition_of(d.event.stream_id, 4).index for d in moved)
        for d in moved:
            assert [x.id for x in await store.dead_letters(f"orders[{d.partition}/4]")] == [d.id]
        fixed = Applied(partitions=4)
        result = await replay_dead_letters(store, fixed.projector)
        assert (result.replayed, result.failed) == (2, 0)
        assert await store.dead_letters("orders") == []

    async def test_replay_goes_by_the_recorded_units_never_the_projectors(
        self, store: Store
    ) -> None:
        """After a 1 -> 4 split, a replay given the old, unpartitioned projector is refused
        and applies nothing (twice over); given the projector as it runs, it applies every
        letter once, in its partition, and deletes it."""
        await _append_round(store, 1)
        before_split = Applied(partitions=1)
        before_split.fail_streams = set(ONE_PER_PARTITION)
        await run_projection(store, before_split.projector)
        await _append_round(store, 2)
        split = Applied(partitions=4)
        split.fail_streams = set(ONE_PER_PARTITION)
        await run_projection(store, split.projector)
        letters = await store.dead_letters("orders")
        assert len(letters) == 8  # 4 skipped before the split, 4 by the partitions
        assert {d.partition for d in letters} == {0, 1, 2, 3}
        stale = Applied(partitions=1)
        for _ in range(2):
            with pytest.raises(PartitionsMismatch) as info:
                await replay_dead_letters(store, stale.projector)
            assert (info.value.name, info.value.recorded, info.value.given) == ("orders", 4, 1)
            assert "partitions=4" in str(info.value)
        assert stale.versions() == {}
        assert await store.dead_letters("orders") == letters
        fixed = Applied(partitions=4)
        result = await replay_dead_letters(store, fixed.projector)
        assert (result.replayed, result.failed) == (8, 0)
        assert fixed.versions() == {stream: [1, 2] for stream in ONE_PER_PARTITION}
        for partition, streams in fixed.by_partition.items():
            assert all(partition_of(stream, 4).index == partition for stream in streams)
        assert await store.dead_letters("orders") == []
        again = await replay_dead_letters(store, fixed.projector)
        assert (again.replayed, again.failed) == (0, 0)
        assert fixed.versions() == {stream: [1, 2] for stream in ONE_PER_PARTITION}

    async def test_replay_while_any_unit_runs_is_refused_before_anything_applies(
        self, store: Store
    ) -> None:
        """A replay takes every unit's lock first: running hosts, or one led unit, refuse it
        with ProjectionRunning before a single letter is applied."""
        await _append_round(store, 1)
        failing = Applied(partitions=4)
        failing.fail_streams = set(ONE_PER_PARTITION)
        await run_projection(store, failing.projector)
        letters = await store.dead_letters("orders")
        assert len(letters) == 4
        fixed = Applied(partitions=4)
        async with trio.open_nursery() as nursery:
            running = Applied(partitions=4)
            running.fail_streams = set(ONE_PER_PARTITION)
            await nursery.start(run_projections, store, [running.projector])
            await _append_round(store, 2)
            await running.wait_for(40 - 4)
            with pytest.raises(ProjectionRunning) as info:
                await replay_dead_letters(store, fixed.projector)
            assert info.value.name == "orders"
            assert "wait=True" not in str(info.value)
            with pytest.raises(PartitionsMismatch):
                await replay_dead_letters(store, Applied(partitions=1).projector)
            nursery.cancel_scope.cancel()
        letters = await store.dead_letters("orders")
        assert len(letters) == 8
        async with store.try_acquire("orders[3/4]"):
            with pytest.raises(ProjectionRunning):
                await replay_dead_letters(store, fixed.projector)
        assert fixed.versions() == {}
        assert await store.dead_letters("orders") == letters
        result = await replay_dead_letters(store, fixed.projector)
        assert (result.replayed, result.failed) == (8, 0)
        assert fixed.versions() == {stream: [1, 2] for stream in ONE_PER_PARTITION}

    async def test_replay_checks_the_count_again_under_the_locks(self, store: Store) -> None:
        """A split between reading the count and taking the locks is noticed: the replay is
        refused, not run on the old units (whose letters the split moved away)."""
        await _append_round(store, 1)
        failing = Applied(partitions=2)
        failing.fail_streams = set(ONE_PER_PARTITION)
        await run_projection(store, failing.projector)
        letters = await store.dead_letters("orders")
        assert len(letters) == 4
        fixed = Applied(partitions=2)
        splitting = cast(Store, _SplitsAfterFirstLook(store, "orders", 4))
        with pytest.raises(PartitionsMismatch) as info:
            await replay_dead_letters(splitting, fixed.projector)
        assert (info.value.recorded, info.value.given) == (4, 2)
        assert fixed.versions() == {}
        moved = await store.dead_letters("orders")
        assert sorted(d.id for d in moved) == sorted(d.id for d in letters)
        assert {d.partition for d in moved} == {0, 1, 2, 3}

    async def test_bad_partition_settings_are_refused(self, store: Store) -> None:
        """Counts outside 1..1024, non-ints, reserved names and filters with a partition."""

        async def handler(event: RecordedEvent, ctx: ProjectionContext) -> None:
            pass

        for bad in (0, 1025, 2.0, True, "4"):
            with pytest.raises(InvalidArgument, match="partitions"):
                projector("p", partitions=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="reserved"):
            projector("p[1/2]")
        with pytest.raises(InvalidArgument):
            Partition(4, 4)
        with pytest.raises(InvalidArgument):
            Partition(-1, 4)

        class WithPartitionFilter:
            name = "p"
            filter = EventFilter(partition=Partition(0, 2))
            apply = staticmethod(handler)

        with pytest.raises(InvalidArgument, match="partitions=K"):
            await run_projection(store, WithPartitionFilter())

        class Classy:
            name = "classy"
            filter = EventFilter()
            partitions = 3
            apply = staticmethod(handler)

        await store.append("s", [NewEvent("E", {})])
        assert (await run_projection(store, Classy())).events_applied == 1
        assert [s.partitions for s in await store.projection_status()] == [3, 3, 3]


class TestMemoryPartitions(PartitionContract):
    """Partitions on the in-memory store."""

    @pytest.fixture
    def harness(self) -> BackendHarness:
        return MemoryHarness()


class TestPostgresPartitions(PartitionContract):
    """Partitions on PostgreSQL."""

    @pytest.fixture
    def harness(self, postgres_dsn: str) -> BackendHarness:
        return PostgresHarness(postgres_dsn)
