"""Everything about checkpoints and the projections they belong to: loading and saving a
checkpoint, status, reset, dead letters, and each projection's partition count (and changing
it). "Where is a checkpoint written?" Here, and in a batch's commit (`MemoryBatch`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import attrs
import trio

from .._errors import CheckpointAhead, CheckpointConflict, ProjectionNotFound, ProjectionRunning
from .._filters import EventFilter
from .._partitions import Unit, partition_of, plan_repartition, split_parent, units_of
from .._positions import Position
from .._status import (
    DeadLetter,
    ProjectionState,
    ProjectionStatus,
    ahead_error,
    count_change,
    host_coverage,
    status_order,
    unit_state,
)
from .._versions import role_of, split_versioned
from ._leadership import wait_lead
from ._membership import live_hosts
from ._reads import first_after
from ._state import MemoryState, ProjectionRecord, now

# Seconds between a waiting change of partition count's looks while a unit of the old count
# is awaited but not led (a standby about to take it).
_REPARTITION_RETRY = 0.01


# -- checkpoints ---------------------------------------------------------------------------


def load_checkpoint(state: MemoryState, name: str) -> Position | None:
    """The saved position of *name*.

    Raises:
        CheckpointAhead: the stored checkpoint is beyond the store's last position.
    """
    position = state.checkpoints.get(name)
    if position is not None and state.ahead(position):
        raise CheckpointAhead(name, position, stored=True)
    return position


def save_checkpoint(state: MemoryState, name: str, position: Position) -> None:
    """Save *position* as *name*'s checkpoint; it never moves backwards.

    Raises:
        CheckpointAhead: *position* is beyond the store's last position; nothing changed.
        CheckpointConflict: *position* is behind the saved one; nothing changed.
    """
    state.check_not_ahead(name, position)
    current = state.checkpoints.get(name)
    if current is not None and position < current:
        raise CheckpointConflict(name, position, current)
    state.checkpoints[name] = position
    state.projection(name).updated_at = now()


# -- status, reset, dead letters -----------------------------------------------------------


def projection_status(state: MemoryState) -> list[ProjectionStatus]:
    """One record per unit that has run or checkpointed, or that a live host runs (see
    `MemoryStore.projection_status`)."""
    current_time = now()
    hosts = [(host.state, host.process) for host in live_hosts(state)]
    runnable = {unit for host, _ in hosts for unit in host.can_run}
    in_use = state.leaders.keys() | {u for u, n in state.waiting.items() if n}

    def other_count(unit: Unit) -> int | None:
        # The projection's recorded count, when *unit* is of another one.
        count = state.partitions.get(unit.projection)
        return None if count is None or count == unit.partitions else count

    # Projections with something applied under their recorded count.
    applied = {
        Unit.parse(unit).projection
        for unit in state.checkpoints.keys() | {u for u, d in state.dead_letters.items() if d}
        if other_count(Unit.parse(unit)) is None
    }
    result = []
    # A unit of a count the projection does not have (a change of count under way, or
    # refused) is listed while a live host runs it or a task leads or awaits it.
    others = {u for u in in_use if other_count(Unit.parse(u)) is not None}
    names = state.projections.keys() | state.checkpoints.keys() | runnable | others
    for name in sorted(names):
        parsed = Unit.parse(name)
        recorded = other_count(parsed)
        if recorded is not None and name not in runnable and name not in in_use:
            continue  # a unit of a count the projection no longer has, or never had
        record = state.projections.get(name) or ProjectionRecord(
            filter=None if parsed.partition is None else EventFilter(partition=parsed.partition)
        )
        checkpoint = state.checkpoints.get(name)
        ahead = checkpoint is not None and state.ahead(checkpoint)
        lag_from, lag_filter = checkpoint, record.filter
        runnable_by, lacking = host_coverage(name, hosts)
        holder = None
        last_error = record.last_error
        if recorded is not None:
            # It applies nothing: it waits for the count to change (its lag counts from the
            # checkpoint it will continue from), or its hosts are refused.
            change = count_change(parsed, recorded, applied=parsed.projection in applied)
            holder, last_error = change.state, change.error or last_error
            if change.parent is not None and change.parent.name in state.checkpoints:
                lag_from = state.checkpoints[change.parent.name]
                parent_filter = state.projections.get(change.parent.name, ProjectionRecord()).filter
                if parent_filter is not None:
                    lag_filter = attrs.evolve(parent_filter, partition=parsed.partition)
        elif name in state.leaders:
            replaying = record.state is ProjectionState.REPLAYING
            holder = ProjectionState.REPLAYING if replaying else ProjectionState.RUNNING
        if checkpoint is not None and ahead:
            last_error = ahead_error(name, checkpoint, last_error)
        if lag_from is not None and state.ahead(lag_from):
            lag_from = None  # a reset rebuilds from the beginning: all of it is lag
        pending = [
            e
            for e in state.log[first_after(state, lag_from) :]
            if lag_filter is None or lag_filter.matches(e.stream_id, e.type, e.tags)
        ]
        unit = unit_state(holder=holder, standbys=state.waiting[name], last=record.state)
        base, version = split_versioned(parsed.projection)
        serving = state.serving.get(base)
        withdrawn = frozenset(state.withdrawn.get(base, ()))
        if holder is None and not role_of(version, serving, withdrawn).runs:
            unit = ProjectionState.SUPERSEDED
        result.append(
            ProjectionStatus(
                name=base,
                version=version,
                serving=serving is None or serving == version,
                partition=None if parsed.partition is None else parsed.partition.index,
                partitions=parsed.partitions,
                checkpoint=checkpoint,
                lag_events=len(pending),
                lag_seconds=(
                    (current_time - pending[0].recorded_at).total_seconds() if pending else 0.0
                ),
                leader=record.leader if unit is ProjectionState.RUNNING else None,
                standbys=state.waiting[name],
                state=unit,
                last_error=last_error,
                updated_at=record.updated_at,
                dead_letters=len(state.dead_letters.get(name, ())),
                runnable_by=runnable_by,
                lacking_hosts=lacking,
                checkpoint_ahead=ahead,
            )
        )
    return sorted(result, key=status_order)


async def reset_projection(state: MemoryState, name: str, *, wait: bool) -> None:
    """Forget *name*'s checkpoint and dead letters (see `MemoryStore.reset_projection`)."""
    units = state.unit_names(name)
    if not any(unit in state.projections or unit in state.checkpoints for unit in units):
        raise ProjectionNotFound(f"no projection named {name!r} has run against this store")
    while True:
        if not wait and any(unit in state.leaders for unit in units):
            raise ProjectionRunning(name)
        async with contextlib.AsyncExitStack() as stack:
            for unit in sorted(units):
                await stack.enter_async_context(wait_lead(state, unit, state.reset_waiting))
            current = state.unit_names(name)
            if current == units:
                for unit in units:
                    state.checkpoints.pop(unit, None)
                    state.dead_letters.pop(unit, None)
                    record = state.projection(unit)
                    record.state, record.last_error, record.updated_at = (
                        ProjectionState.STOPPED,
                        None,
                        now(),
                    )
                return
        units = current


def dead_letters(state: MemoryState, name: str) -> list[DeadLetter]:
    """The dead letters of *name* (every unit's), in position order."""
    letters = [d for unit in state.unit_names(name) for d in state.dead_letters.get(unit, ())]
    return sorted(letters, key=lambda d: d.position)


# -- partition counts ----------------------------------------------------------------------


async def set_partitions(
    state: MemoryState, name: str, partitions: int, on_waiting: Callable[[], None] | None
) -> None:
    """Record that *name* runs as *partitions* units, waiting while a unit of the current
    count is led or awaited (see `MemoryStore.set_partitions`)."""
    waiting = False
    while (current := state.partition_count(name)) != partitions:
        if current is None:
            state.partitions[name] = partitions
            return
        old = [unit.name for unit in units_of(name, current)]
        plan_repartition(name, current, partitions, applied=_applied(state, old))
        busy = [
            unit
            for unit in old
            if unit in state.leaders or state.waiting[unit] or state.reset_waiting[unit]
        ]
        if not busy:
            # No unit of the current count runs, and none can start before this synchronous
            # change is made.
            _repartition(state, name, current, partitions, old)
            return
        if not waiting:
            waiting = True
            if on_waiting is not None:
                on_waiting()
        leader = state.leaders.get(busy[0])
        if leader is not None:
            await leader.wait_lost()
        else:
            await trio.sleep(_REPARTITION_RETRY)  # a standby about to take the unit


def _applied(state: MemoryState, units: list[str]) -> bool:
    return any(unit in state.checkpoints or state.dead_letters.get(unit) for unit in units)


def _repartition(
    state: MemoryState, name: str, current: int, requested: int, old: list[str]
) -> None:
    applied = _applied(state, old)
    if plan_repartition(name, current, requested, applied=applied) == "split":
        for child in units_of(name, requested):
            parent = split_parent(child, current).name
            if parent in state.checkpoints:
                state.checkpoints[child.name] = state.checkpoints[parent]
            parent_filter = state.projections.get(parent, ProjectionRecord()).filter
            if parent_filter is not None:
                state.projection(child.name).filter = attrs.evolve(
                    parent_filter, partition=child.partition
                )
        for unit in old:
            for letter in state.dead_letters.get(unit, ()):
                moved = partition_of(letter.event.stream_id, requested)
                state.dead_letters.setdefault(Unit(name, moved).name, []).append(
                    attrs.evolve(letter, partition=moved.index)
                )
    for unit in old:
        state.checkpoints.pop(unit, None)
        state.projections.pop(unit, None)
        state.dead_letters.pop(unit, None)
    state.partitions[name] = requested
