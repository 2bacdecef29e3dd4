"""`replay_dead_letters`: apply a projection's dead letters again, under every unit's lock."""

from __future__ import annotations

import contextlib
import logging
import uuid
from functools import partial

import attrs

from .._errors import LeadershipUnavailable, PartitionsMismatch, ProjectionRunning
from .._events import RecordedEvent
from .._protocols import Leadership, ProjectionBatch, Store
from .._status import ProjectionState
from ._context import apply_and_commit
from ._projector import ResolvedProjector, resolve_call

logger = logging.getLogger("eventcore_trio.projection")


@attrs.frozen(kw_only=True)
class ReplayResult:
    """What `replay_dead_letters` did.

    Attributes:
        replayed: dead letters applied successfully and deleted, each in the transaction
            that applied it.
        failed: dead letters whose replay failed again (kept): the handler raised, the
            database refused to commit what it wrote, or the event is still undecodable.

    .. versionadded:: 0.1
    """

    replayed: int
    failed: int


async def replay_dead_letters(store: Store, projector: object) -> ReplayResult:
    """Apply a projection's dead letters again, each in its own transaction.

    The units replayed are the ones the store records for the projection
    (`ProjectorCoordinator.recorded_partitions`), never the shape of *projector*: a
    projector whose partition count differs (code from before a split, or a script that
    leaves out ``partitions=``) is refused with `PartitionsMismatch`, and nothing is
    replayed. The replay first takes the lock of every unit, so it never runs beside a
    leader of any of them and the count cannot change under it; then, unit by unit, it
    applies each of that unit's dead letters in a batch of that unit (``ctx.db`` and
    ``ctx.partition`` as when the unit skipped it). A letter whose event now applies is
    deleted in the same transaction as what the handler wrote. One that fails again is kept
    and counted in `ReplayResult.failed`, and the replay goes on with the next letter:
    whether its handler raised, or the database refused to commit what it wrote (a deferred
    constraint, a serialization failure: `DatabaseError` at COMMIT), or its event is still
    undecodable. Status shows the units as replaying meanwhile.

    Resolving a letter that is no longer there fails its batch (`DeadLetterNotFound`, the
    transaction rolled back) and ends the replay: a letter is never reported as replayed
    unless this replay deleted it. Letters replayed before it stay replayed.

    This is a checkpoint. Cancelling it rolls back the letter in flight (letters already
    replayed stay replayed) and releases every lock.

    Args:
        store: the store the projection runs against.
        projector: the projector as its hosts run it (same name and partition count).

    Returns:
        How many letters were replayed (and deleted) and how many failed again (kept).

    Raises:
        ProjectionRunning: another session leads a unit of the projection; stop its hosts
            first. Nothing was replayed.
        PartitionsMismatch: *projector*'s partition count is not the recorded one; nothing
            was replayed.
        DeadLetterNotFound: a letter was gone when its replay resolved it; its batch was
            rolled back.
        InvalidArgument: *projector* is not a projector, or *store* is not a store.

    .. versionadded:: 0.1
    .. versionchanged:: 0.3
       Replays the units the store records, under all of their locks at once; refuses a
       projector with another partition count, and raises `ProjectionRunning` (a
       `LeadershipUnavailable`) while any unit runs. A letter that is gone fails its batch.
       A letter whose commit the database refuses counts as failed again, and the replay
       goes on with the next (it raised `DatabaseError`).
    .. versionchanged:: 0.4
       The store comes first, as in `run_projections`: ``replay_dead_letters(store,
       projector)``. The old order, ``replay_dead_letters(projector, store)``, still works
       with a `DeprecationWarning`; it is removed in 0.5.
    """
    store, resolved = resolve_call("replay_dead_letters", store, projector)
    name = resolved.projection
    while True:
        recorded = await store.recorded_partitions(name)
        if recorded is None:
            return ReplayResult(replayed=0, failed=0)  # it never ran here: no dead letters
        if recorded != resolved.partitions:
            raise PartitionsMismatch(name, recorded, resolved.partitions)
        units = sorted(resolved.units(), key=lambda unit: unit.name)
        async with contextlib.AsyncExitStack() as stack:
            leaderships = []
            for unit in units:
                # In name order, as reset_projection: of two replays at once, one gets all.
                try:
                    leadership = await stack.enter_async_context(store.try_acquire(unit.name))
                except LeadershipUnavailable as exc:
                    raise ProjectionRunning(name, can_wait=False) from exc
                leaderships.append(leadership)
            # A split commits only under every lock of the old count: with all of them held,
            # the count read before taking them holds until they are released, unless it
            # changed in between; then the refusal above decides again.
            if await store.recorded_partitions(name) != recorded:
                continue
            for leadership in leaderships:
                # Status shows REPLAYING, not a running leader, while this holds the lock
                # (and STOPPED once it lets go).
                await leadership.report(ProjectionState.REPLAYING)
            replayed = failed = 0
            for unit, leadership in zip(units, leaderships, strict=True):
                done, not_done = await _replay(unit, store, leadership)
                replayed += done
                failed += not_done
            return ReplayResult(replayed=replayed, failed=failed)


async def _replay(
    resolved: ResolvedProjector, store: Store, leadership: Leadership
) -> tuple[int, int]:
    # The unit's own letters (its name is a unit name), read under its lock: no leader of
    # it can add one, and no split can move one, until the replay lets go.
    replayed = failed = 0
    for letter in await store.dead_letters(resolved.name):
        if not isinstance(letter.event, RecordedEvent):
            failed += 1
            continue
        # A letter whose handler raises again, or whose writes the database refuses to
        # commit, is kept (nothing committed): it failed again, and the next one is tried.
        failure = await apply_and_commit(
            resolved, store, leadership, [letter.event], then=partial(_resolve, letter.id)
        )
        if failure is None:
            replayed += 1
            continue
        logger.warning(
            "projector %s: replay of %s failed again: %s",
            resolved.name,
            letter.position,
            failure.error,
        )
        failed += 1
    return replayed, failed


async def _resolve(dead_letter_id: uuid.UUID, batch: ProjectionBatch) -> None:
    await batch.resolve_dead_letter(dead_letter_id)
