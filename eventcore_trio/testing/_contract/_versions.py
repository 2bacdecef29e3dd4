"""The contract of projection versions: which version serves, switching once caught up,
switching back by hand, retiring, and the runtime stopping a superseded version."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from ..._errors import InvalidArgument, ProjectionNotFound, ProjectionRunning
from ..._events import NewEvent
from ..._filters import EventFilter
from ..._protocols import Store
from ..._status import ProjectionState
from ..._versions import VersionRole
from ...projection import (
    ProjectionConfig,
    ProjectionContext,
    projector,
    run_projection,
    run_projections,
)
from ._support import events

_ALL = EventFilter()


class _Seen(list[str]):
    """The types a projector applied; `reached` waits until it has applied *n*."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = trio.Event()

    def add(self, item: str) -> None:
        self.append(item)
        self._changed.set()
        self._changed = trio.Event()

    async def reached(self, n: int) -> None:
        with trio.fail_after(10):
            while len(self) < n:
                await self._changed.wait()


def _counter(name: str, version: int, seen: _Seen, **options: Any) -> Any:
    @projector(name, version=version, **options)
    async def count(event: Any, ctx: ProjectionContext) -> None:
        seen.add(event.type)

    return count


async def _checkpoint_all(store: Store, unit: str) -> None:
    # Move *unit*'s checkpoint to the head, as a caught-up unit has it.
    position = await store.last_position()
    assert position is not None
    async with store.try_acquire(unit) as leadership, leadership.open_batch() as batch:
        await batch.save_checkpoint(await store.load_checkpoint(unit), position)


async def _until_async(read: Callable[[], Awaitable[object]], wanted: object) -> None:
    # The store's state, which no event announces (on PostgreSQL, rows another session
    # writes): polled, bounded.
    with trio.fail_after(10):
        while await read() != wanted:  # noqa: ASYNC110
            await trio.sleep(0.01)


async def _state_of(store: Store, name: str, version: int) -> ProjectionState | None:
    for record in await store.projection_status():
        if (record.name, record.version) == (name, version):
            return record.state
    return None


class VersionContract:
    """Projection versions: serving, switching, retiring."""

    async def test_the_first_version_asked_about_serves(self, store: Store) -> None:
        """While no version serves, the first one to ask serves at once, recorded as a
        "first" switch; a lower one asked later is superseded, a higher one builds."""
        assert await store.serving_version("p") is None
        assert await store.version_role("p", 2) is VersionRole.SERVING
        assert await store.serving_version("p") == 2
        assert await store.version_role("p", 1) is VersionRole.SUPERSEDED
        assert await store.version_role("p", 3) is VersionRole.BUILDING
        [switch] = await store.version_switches("p")
        assert (switch.name, switch.from_version, switch.to_version, switch.reason) == (
            "p",
            None,
            2,
            "first",
        )

    async def test_a_building_version_takes_over_only_once_caught_up(self, store: Store) -> None:
        """The switch checks every unit: one behind refuses it; all caught up make it serve,
        recorded as "caught-up" at the position reached."""
        await store.append("s", events("A", "B"))
        assert await store.version_role("p", 1) is VersionRole.SERVING
        units = [("p@v2", _ALL)]
        assert await store.switch_if_caught_up("p", 2, units) is VersionRole.BUILDING
        assert await store.serving_version("p") == 1
        await _checkpoint_all(store, "p@v2")
        assert await store.switch_if_caught_up("p", 2, units) is VersionRole.SERVING
        assert await store.serving_version("p") == 2
        assert await store.version_role("p", 1) is VersionRole.SUPERSEDED
        last = (await store.version_switches("p"))[-1]
        assert (last.from_version, last.to_version, last.reason) == (1, 2, "caught-up")
        assert last.position == await store.last_position()

    async def test_a_switch_waits_for_every_unit(self, store: Store) -> None:
        """A version of two units switches only when both have caught up."""
        await store.append("s", events("A"))
        await store.version_role("p", 1)
        units = [("p@v2[0/2]", _ALL), ("p@v2[1/2]", _ALL)]
        await _checkpoint_all(store, "p@v2[0/2]")
        assert await store.switch_if_caught_up("p", 2, units) is VersionRole.BUILDING
        await _checkpoint_all(store, "p@v2[1/2]")
        assert await store.switch_if_caught_up("p", 2, units) is VersionRole.SERVING

    async def test_a_unit_with_nothing_to_apply_is_caught_up(self, store: Store) -> None:
        """A unit whose filter matches no event needs no checkpoint to be caught up."""
        await store.append("s", events("A"))
        await store.version_role("p", 1)
        units = [("p@v2", EventFilter(event_types=["Nothing"]))]
        assert await store.switch_if_caught_up("p", 2, units) is VersionRole.SERVING

    async def test_a_unit_filtered_by_tags_waits_only_for_tagged_events(self, store: Store) -> None:
        """A unit's tags count in whether it caught up: an event carrying them holds the
        switch back, events without them after its checkpoint do not."""
        await store.append("s", [NewEvent("A", {}, tags=["t", "u"])])
        await store.version_role("p", 1)
        units = [("p@v2", EventFilter(tags=["t"]))]
        assert await store.switch_if_caught_up("p", 2, units) is VersionRole.BUILDING
        await _checkpoint_all(store, "p@v2")
        await store.append("s", [NewEvent("A", {}, tags=["u"]), *events("A")])
        assert await store.switch_if_caught_up("p", 2, units) is VersionRole.SERVING

    async def test_switching_back_withdraws_the_versions_above(self, store: Store) -> None:
        """An operator's switch back serves the older version at once and withdraws the
        newer: it stops, and never takes over on its own again."""
        await store.append("s", events("A"))
        await _checkpoint_all(store, "p")
        await store.version_role("p", 1)
        await _checkpoint_all(store, "p@v2")
        assert await store.switch_if_caught_up("p", 2, [("p@v2", _ALL)]) is VersionRole.SERVING
        await store.serve_version("p", 1)
        assert await store.serving_version("p") == 1
        assert await store.version_role("p", 2) is VersionRole.WITHDRAWN
        assert await store.switch_if_caught_up("p", 2, [("p@v2", _ALL)]) is VersionRole.WITHDRAWN
        assert [s.reason for s in await store.version_switches("p")] == [
            "first",
            "caught-up",
            "manual",
        ]
        await store.serve_version("p", 2)
        assert await store.version_role("p", 2) is VersionRole.SERVING

    async def test_serving_a_version_that_never_ran_is_refused(self, store: Store) -> None:
        """serve_version names only a version that ran here."""
        await store.version_role("p", 1)
        with pytest.raises(ProjectionNotFound):
            await store.serve_version("p", 7)
        assert await store.serving_version("p") == 1

    async def test_retire_drops_a_version_but_never_the_serving_one(self, store: Store) -> None:
        """Retiring a superseded version forgets its checkpoint; the serving version, a
        version that never ran and a running one (without wait) are refused."""
        await store.append("s", events("A"))
        await _checkpoint_all(store, "p")
        await store.version_role("p", 1)
        await _checkpoint_all(store, "p@v2")
        await store.switch_if_caught_up("p", 2, [("p@v2", _ALL)])
        with pytest.raises(InvalidArgument, match="serves"):
            await store.retire_version("p", 2)
        with pytest.raises(ProjectionNotFound):
            await store.retire_version("p", 5)
        async with store.try_acquire("p"):
            with pytest.raises(ProjectionRunning):
                await store.retire_version("p", 1)
        await store.retire_version("p", 1)
        assert await store.load_checkpoint("p") is None
        assert await store.load_checkpoint("p@v2") is not None
        assert await store.serving_version("p") == 2

    async def test_a_version_has_its_own_partition_count(self, store: Store) -> None:
        """Version 2 records a partition count of its own, under its versioned name."""
        await store.set_partitions("p", 1)
        await store.set_partitions("p@v2", 4)
        assert await store.recorded_partitions("p") == 1
        assert await store.recorded_partitions("p@v2") == 4

    async def test_a_manual_switch_records_how_far_the_version_got(self, store: Store) -> None:
        """serve_version's switch carries the version's greatest checkpoint."""
        await store.append("s", events("A"))
        await store.version_role("p", 2)
        await _checkpoint_all(store, "p")
        await store.serve_version("p", 1)
        last = (await store.version_switches("p"))[-1]
        assert (last.from_version, last.to_version, last.reason) == (2, 1, "manual")
        assert last.position == await store.last_position()

    async def test_bad_versions_are_refused(self, store: Store) -> None:
        """Versions are ints from 1; names are projector names."""
        for bad in (0, -1, 1.5, "2", True):
            with pytest.raises(InvalidArgument):
                await store.version_role("p", bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            await store.version_role("p@v2", 3)
        with pytest.raises(InvalidArgument):
            await store.serve_version("p", 0)

    # -- the runtime ---------------------------------------------------------------------

    async def test_a_new_version_rebuilds_then_serves_and_the_old_one_stops(
        self, store: Store
    ) -> None:
        """Version 2 applies every event from the start while version 1 serves, takes over
        once caught up, and a continuous version 1 ends, superseded, with its status saying
        so; version 1's checkpoint stays."""
        await store.append("s", events("A", "B", "C"))
        old, new = _Seen(), _Seen()
        config = ProjectionConfig(continuous=True, poll_interval=0.05)
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def run_old() -> None:
                result = await run_projection(store, _counter("p", 1, old), config)
                assert result.superseded
                done.set()

            nursery.start_soon(run_old)
            await old.reached(3)
            assert await store.serving_version("p") == 1
            result = await run_projection(
                store, _counter("p", 2, new), ProjectionConfig(continuous=False)
            )
            assert result.events_applied == 3
            assert not result.superseded
            assert await store.serving_version("p") == 2
            with trio.fail_after(10):
                await done.wait()
        assert new == ["A", "B", "C"]
        assert await store.load_checkpoint("p") is not None
        rows = {(s.name, s.version): s for s in await store.projection_status()}
        assert rows["p", 1].state is ProjectionState.SUPERSEDED
        assert not rows["p", 1].serving
        assert rows["p", 2].serving

    async def test_a_superseded_version_does_not_run(self, store: Store) -> None:
        """A run of a version below the serving one applies nothing and says superseded."""
        await store.append("s", events("A"))
        await store.version_role("p", 3)
        seen = _Seen()
        result = await run_projection(store, _counter("p", 1, seen))
        assert result.superseded
        assert result.events_applied == 0
        assert seen == []

    async def test_a_host_runs_both_versions_until_the_switch(self, store: Store) -> None:
        """Under one host, version 2 rebuilds beside version 1 and takes over; version 1's
        unit stops and the host keeps running."""
        await store.append("s", events("A", "B"))
        old, new = _Seen(), _Seen()
        config = ProjectionConfig(poll_interval=0.05)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                run_projections, store, [_counter("p", 1, old), _counter("p", 2, new)], config
            )
            await _until_async(lambda: _state_of(store, "p", 1), ProjectionState.SUPERSEDED)
            assert await store.serving_version("p") == 2
            await store.append("s", events("C"))
            await new.reached(3)
            nursery.cancel_scope.cancel()
        assert new == ["A", "B", "C"]
        assert "C" not in old
