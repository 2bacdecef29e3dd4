"""Read-your-writes: wait until projections have applied a position."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

import attrs
import trio

from .._errors import InvalidArgument, ProjectionLagging
from .._events import AppendResult
from .._partitions import partition_of
from .._positions import Position
from .._protocols import CheckpointStore, EventReader
from ._projector import ResolvedProjector, resolve

# Checks back off from the first to the last delay: an answer within milliseconds when the
# projection keeps up, and a few cheap queries a second when it does not.
_FIRST_DELAY: Final = 0.002
_LAST_DELAY: Final = 0.1


class _Store(CheckpointStore, EventReader, Protocol):
    async def recorded_partitions(self, name: str) -> int | None:
        """See `ProjectorCoordinator.recorded_partitions`."""
        ...


def _resolved(projectors: Sequence[object]) -> list[ResolvedProjector]:
    if isinstance(projectors, (str, bytes)) or not isinstance(projectors, Sequence):
        raise InvalidArgument(
            "wait_for_projections() takes a list of projectors (the objects, for their "
            "filters and partitions), not names"
        )
    return [resolve(candidate) for candidate in projectors]


def _units(
    projector: ResolvedProjector, count: int, streams: Sequence[str] | None
) -> list[ResolvedProjector]:
    # The units of *projector* when its projection runs as *count* of them, which is not
    # always the object's count: after a split, code from before it (or a script that
    # leaves out partitions=) still says the old one, whose units no longer run.
    shaped = (
        projector if count == projector.partitions else attrs.evolve(projector, partitions=count)
    )
    # A partition holds the events of its streams only: wait for those that hold a written
    # stream.
    return [
        unit
        for unit in shaped.units()
        if unit.partition is None
        or streams is None
        or any(partition_of(s, unit.partition.count) == unit.partition for s in streams)
    ]


async def _has_applied(
    store: _Store,
    unit: ResolvedProjector,
    position: Position,
    visible: Callable[[], Awaitable[bool]],
) -> bool:
    checkpoint = await store.load_checkpoint(unit.name)
    if checkpoint is not None and checkpoint >= position:
        return True
    # Behind the position, a unit has still applied everything up to it when its next event
    # comes after it: the event at the position is not one it applies (its filter or its
    # partition), and neither is anything before. That needs the position to be visible to
    # readers; until then the unit cannot have applied it.
    if not await visible():
        return False
    page = await store.read_events(checkpoint, limit=1, filter=unit.filter, undecodable="include")
    return not page or page[0].position > position


async def wait_for_projections(
    store: _Store,
    projectors: Sequence[object],
    written: AppendResult | Position | None,
    *,
    # A parameter, not only an outer cancel scope: the error names the lagging units,
    # which a TooSlowError from outside could not. An outer scope cancels it cleanly too.
    timeout: float = 10.0,  # noqa: ASYNC109
) -> None:
    """Wait until *projectors* have applied *written*: read-your-writes for a read model.

    After `execute` (or an append), a handler that shows the read model waits for the
    projections it reads to apply its own write. A projection has applied a position when
    its checkpoint reached it, or when nothing it applies lies between its checkpoint and
    the position (the event is filtered out, or in another partition). For a partitioned
    projector given an `AppendResult`, only the partitions of the written streams are waited
    for. The units waited for are the ones the store records for the projection
    (`ProjectorCoordinator.recorded_partitions`, read again at every check), not the
    projector object's partition count, which may be older or newer code: after a 2 -> 4
    split, a projector that still says ``partitions=2`` waits for the four units that run. A
    projection that never ran here is waited for as the object says. The projections run
    anywhere: this only reads their checkpoints, backing off from 2 ms to 100 ms between
    checks.

    Example::

        result = await execute(store, Transfer("alice", "bob", 30), registry=registry)
        await wait_for_projections(store, [balances], result.append, timeout=5)

    Args:
        store: the store the projections run against.
        projectors: the projectors (the objects, for their filters and partitions).
        written: an `AppendResult` (``ExecutionResult.append``), a `Position`, or None (a
            command that wrote nothing: returns at once).
        timeout: seconds to wait at most.

    Raises:
        ProjectionLagging: a projection had not applied *written* within *timeout*; its
            ``lagging`` names the units.
        InvalidArgument: not projectors, a bad *written* or *timeout*.

    Cancelling it (a cancel scope) just stops waiting.

    .. versionadded:: 0.3
    """
    if type(timeout) not in (int, float) or not 0 <= timeout < math.inf:
        raise InvalidArgument(f"timeout must be a finite number of seconds >= 0, got {timeout!r}")
    resolved = _resolved(projectors)  # checked even when there is nothing to wait for
    if written is None:
        return
    if isinstance(written, AppendResult):
        position = written.position
        streams: Sequence[str] | None = list(written.stream_versions)
    elif isinstance(written, Position):
        position, streams = written, None
    else:
        raise InvalidArgument(
            "wait_for_projections() waits for an AppendResult (ExecutionResult.append), a "
            f"Position or None, got {type(written).__name__}"
        )
    if position is None:
        return
    # Units found to have applied the position (they stay so: checkpoints only move forward,
    # and a split's new units start from their parent's), and projections all of whose units
    # have.
    applied: set[str] = set()
    done: set[int] = set()

    async def still_pending() -> list[ResolvedProjector]:
        # Whether the position is readable yet: asked once per round, by the first unit
        # behind it, not once per unit.
        known: list[bool] = []

        async def visible() -> bool:
            if not known:
                last = await store.last_position()
                known.append(last is not None and last >= position)
            return known[0]

        lagging: list[ResolvedProjector] = []
        for index, projector in enumerate(resolved):
            if index in done:
                continue
            # The units the store records, read every round: a split may happen meanwhile.
            # A projection that never ran here is waited for as the object says.
            recorded = await store.recorded_partitions(projector.projection)
            count = projector.partitions if recorded is None else recorded
            behind = []
            for unit in _units(projector, count, streams):
                if unit.name in applied:
                    continue
                if await _has_applied(store, unit, position, visible):
                    applied.add(unit.name)
                else:
                    behind.append(unit)
            if behind:
                lagging += behind
            else:
                done.add(index)
        return lagging

    # One check whatever the timeout (timeout=0 asks "applied yet?"), then checks backing
    # off until the deadline.
    deadline = trio.current_time() + timeout
    pending = await still_pending()
    delay = _FIRST_DELAY
    with trio.move_on_at(deadline):
        while pending:
            await trio.sleep(delay)
            delay = min(delay * 2, _LAST_DELAY)
            pending = await still_pending()
    if not pending:
        return
    names = tuple(unit.name for unit in pending)
    raise ProjectionLagging(
        f"{', '.join(repr(n) for n in names)} had not applied position {position} after "
        f"{timeout} s; is a host running {'it' if len(names) == 1 else 'them'}, and is "
        "nothing failing or holding readers back? (eventcore-trio status)",
        lagging=names,
        position=position,
    )


async def wait_caught_up(
    store: _Store,
    projectors: Sequence[object],
    *,
    timeout: float = 10.0,  # noqa: ASYNC109  (the error names the lagging units)
) -> None:
    """Wait until *projectors* have applied every event stored so far (for tests).

    The store's last readable position now, then `wait_for_projections` on it: every
    partition of each projector, so a test's assertions on the read models see every event
    it appended before the call.

    Raises:
        ProjectionLagging: a projection had not caught up within *timeout*.

    .. versionadded:: 0.3
    """
    await wait_for_projections(store, projectors, await store.last_position(), timeout=timeout)
