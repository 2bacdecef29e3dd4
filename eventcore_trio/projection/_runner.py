"""`run_projection`: the Trio shell around the pure pipeline.

The shell takes leadership, then loops: ask the pipeline for an effect, perform it, report the
outcome. It runs inside a cancel scope that a watcher cancels the moment the leadership is
lost, so in-flight work stops within about a second and nothing more commits (the batch's
transaction is on the lock-holding session, which is gone).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import attrs
import trio

from .._errors import (
    DatabaseError,
    EventCoreError,
    InvalidArgument,
    LeadershipLost,
    LeadershipUnavailable,
    PartitionsMismatch,
    ProjectionFailed,
    ProjectionRunning,
    StoreConnectionError,
)
from .._events import RecordedEvent
from .._protocols import Leadership, Store
from .._status import ProjectionState
from .._util import background, raise_single, wait_any
from ._config import ProjectionConfig
from ._metrics import METRICS
from ._pipeline import (
    ApplyBatch,
    BatchCommitted,
    BatchFailed,
    CheckpointLoaded,
    Done,
    Effect,
    Fail,
    FindTarget,
    LoadCheckpoint,
    PageRead,
    ProjectionPipeline,
    ProjectionResult,
    ReadFailed,
    ReadPage,
    Result,
    Sleep,
    Slept,
    TargetFound,
    WaitForEvents,
    Woken,
)
from ._projector import ProjectionContext, ResolvedProjector, resolve

logger = logging.getLogger("eventcore_trio.projection")


class _HandlerFailed(Exception):
    def __init__(self, index: int | None, error: BaseException) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


async def _apply_batch(
    projector: ResolvedProjector, store: Store, leadership: Leadership, effect: ApplyBatch
) -> Result:
    started = time.perf_counter()
    staged = False
    try:
        async with leadership.open_batch() as batch:
            ctx = projector.context(batch, store)
            if effect.events:
                await _run_handlers(
                    projector, ctx, effect.events, use_batch_hook=effect.use_batch_hook
                )
            if effect.dead_letter is not None:
                failure = effect.dead_letter
                await batch.record_dead_letter(
                    failure.event, failure.error, retries=failure.retries
                )
            await batch.save_checkpoint(effect.expected, effect.checkpoint)
            staged = True
    except _HandlerFailed as failed:
        return BatchFailed(failed.index, failed.error)
    except DatabaseError as exc:
        if not (staged and effect.events):
            raise
        # The database refused the commit itself (a deferred constraint, a serialization
        # failure) on a session that still holds the lock: some event's writes caused it.
        # The pipeline finds which by applying the batch one event at a time, so the
        # projector's on_error decides, as for any handler error.
        return BatchFailed(None, exc)
    lag = None
    if effect.events:
        lag = (dt.datetime.now(dt.UTC) - effect.events[-1].recorded_at).total_seconds()
    METRICS.batch(projector.name, len(effect.events), time.perf_counter() - started, lag)
    if effect.dead_letter is not None:
        METRICS.dead_letter(projector.name)
    return BatchCommitted()


async def _run_handlers(
    projector: ResolvedProjector,
    ctx: ProjectionContext,
    events: Sequence[RecordedEvent],
    *,
    use_batch_hook: bool = False,
) -> None:
    # The pipeline decides whether a batch goes to the batch hook in one call; a projector
    # that has only a batch hook gets single events as batches of one.
    decode = projector.decode
    if use_batch_hook and projector.apply_batch is not None:
        ctx._position = events[-1].position
        ctx._event = events[-1]
        try:
            payload: Sequence[Any] = (
                events if decode is None else [item for e in events for item in decode(e)]
            )
            await projector.apply_batch(payload, ctx)
        except Exception as exc:
            raise _HandlerFailed(None, exc) from exc
        _check_batch(ctx, None)
        await _flush(ctx)
        return
    batch_hook = projector.apply_batch
    for index, event in enumerate(events):
        ctx._position = event.position
        ctx._event = event
        try:
            if decode is None:
                # The common case, once per event: no decoding, no tuple of one.
                if batch_hook is None:
                    await projector.apply(event, ctx)
                else:
                    await batch_hook([event], ctx)
            else:
                # An upcast event may stand for several typed events, or none.
                for item in decode(event):
                    if batch_hook is None:
                        await projector.apply(item, ctx)
                    else:
                        await batch_hook([item], ctx)
        except Exception as exc:
            raise _HandlerFailed(index, exc) from exc
        _check_batch(ctx, index)
    await _flush(ctx)


async def _flush(ctx: ProjectionContext) -> None:
    # Writes queued through ctx.db.queue go out once per batch. Which event's write failed
    # is not known here (index None): the pipeline then applies the batch's events one at a
    # time, where it is.
    try:
        await ctx._batch.flush()
    except Exception as exc:
        raise _HandlerFailed(None, exc) from exc
    _check_batch(ctx, None)


def _check_batch(ctx: ProjectionContext, index: int | None) -> None:
    # A handler that swallowed the error of an interrupted ctx.db statement (or the
    # cancellation of its own timeout) returned normally, but its batch cannot commit: the
    # failure is that handler's.
    failure = ctx._batch.failure
    if failure is not None:
        raise _HandlerFailed(index, failure) from failure


async def _perform(
    effect: Effect, projector: ResolvedProjector, store: Store, leadership: Leadership
) -> Result:
    match effect:
        case LoadCheckpoint():
            return CheckpointLoaded(await store.load_checkpoint(projector.name))
        case FindTarget():
            return TargetFound(await store.last_position(projector.filter))
        case ReadPage(after, limit):
            try:
                page = await store.read_events(
                    after, limit=limit, filter=projector.filter, undecodable="include"
                )
            except StoreConnectionError as exc:
                logger.warning("projector %s: read failed: %s", projector.name, exc)
                return ReadFailed(exc)
            return PageRead(tuple(page))
        case ApplyBatch():
            return await _apply_batch(projector, store, leadership, effect)
        case Sleep(seconds, reason):
            logger.info("projector %s: sleeping %.2fs (%s)", projector.name, seconds, reason)
            await trio.sleep(seconds)
            return Slept()
        case WaitForEvents(timeout, notified):
            with trio.move_on_after(timeout):
                if notified:
                    await store.wait_for_events()
                else:
                    await trio.sleep_forever()
            return Woken()
    raise AssertionError(effect)  # pragma: no cover


async def _drive(
    projector: ResolvedProjector,
    store: Store,
    leadership: Leadership,
    config: ProjectionConfig,
    stop: trio.Event | None = None,
) -> ProjectionResult | None:
    # Returns None when *stop* is set: between effects, so a batch in flight commits first,
    # and at once from waits and sleeps.
    pipeline = ProjectionPipeline(
        config=config,
        on_error=projector.on_error,
        has_batch_hook=projector.apply_batch is not None,
    )
    effect = pipeline.start()
    while True:
        if stop is not None and stop.is_set():
            return None
        if isinstance(effect, Done):
            return effect.result
        if isinstance(effect, Fail):
            failure = effect.failure
            raise ProjectionFailed(
                f"projector {projector.name!r} stopped: {effect.message}: "
                f"{type(effect.error).__name__}: {effect.error}",
                projector=projector.name,
                position=None if failure is None else failure.position,
                event=None if failure is None else failure.event,
                retries=0 if failure is None else failure.retries,
            ) from effect.error
        if stop is not None and isinstance(effect, WaitForEvents | Sleep):
            with trio.CancelScope() as waiting:
                async with background(partial(_cancel_when_set, stop, waiting)):
                    result = await _perform(effect, projector, store, leadership)
            if waiting.cancelled_caught:
                return None
        else:
            result = await _perform(effect, projector, store, leadership)
        effect = pipeline.resume(result)


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _cancel_when_lost(leadership: Leadership, scope: trio.CancelScope) -> None:
    await leadership.wait_lost()
    scope.cancel()


async def _record_count(
    projector: ResolvedProjector,
    store: Store,
    leadership: Leadership,
    *,
    on_waiting: Callable[[], None] | None,
    stop: trio.Event | None,
) -> bool:
    # Under the unit's lock, so that no unit runs with a partition count its projection no
    # longer has (a change takes the locks of every unit of the old count). A change waits
    # while hosts run the old count (a rolling deploy that splits the projection): the unit
    # has started then (*on_waiting*), holding its own lock and applying nothing, and a
    # hand-off (*stop*) or the loss of its lock ends the wait. Returns False after a
    # hand-off; raises LeadershipLost after a loss.
    waiting = trio.Event()

    def wait_begins() -> None:
        logger.info(
            "projector %s: waits for the units of the projection's recorded partition count "
            "to stop (hosts that run another count of %r); it runs with %d partitions once "
            "they have",
            projector.name,
            projector.projection,
            projector.partitions,
        )
        waiting.set()
        if on_waiting is not None:
            on_waiting()

    async def end_wait(scope: trio.CancelScope) -> None:
        await waiting.wait()
        await wait_any(leadership.wait_lost, trio.sleep_forever if stop is None else stop.wait)
        scope.cancel()

    with trio.CancelScope() as scope:
        async with background(partial(end_wait, scope)):
            await store.set_partitions(
                projector.projection, projector.partitions, on_waiting=wait_begins
            )
    if not scope.cancelled_caught:
        return True
    if not leadership.is_held:
        cause = leadership.lost_reason or "its lock session ended"
        raise LeadershipLost(
            f"projector {projector.name!r} lost its leadership ({cause}) while it waited for "
            "a change of its partition count; it had applied nothing. Another instance may "
            "lead now."
        )
    return False


async def run_led(
    projector: ResolvedProjector,
    store: Store,
    leadership: Leadership,
    config: ProjectionConfig,
    *,
    on_running: Callable[[], None] | None = None,
    stop: trio.Event | None = None,
) -> ProjectionResult | None:
    """Run *projector* (one unit) under an already acquired *leadership* (the host's entry
    point). Setting *stop* ends the run gracefully (the batch in flight commits first); it
    then returns None. *on_running* is called once the unit runs, or waits for a change of
    its projection's partition count (see `_record_count`)."""
    if not await _record_count(projector, store, leadership, on_waiting=on_running, stop=stop):
        return None
    await leadership.report(ProjectionState.RUNNING, filter=projector.filter)
    logger.info("projector %s: leading", projector.name)
    if on_running is not None:
        on_running()
    with trio.CancelScope() as scope:
        async with background(partial(_cancel_when_lost, leadership, scope)):
            try:
                return await _drive(projector, store, leadership, config, stop)
            except ProjectionFailed as exc:
                logger.error("projector %s: %s", projector.name, exc)
                with (
                    trio.move_on_after(5, shield=True),
                    contextlib.suppress(EventCoreError),
                ):
                    await leadership.report(ProjectionState.FAILED, error=str(exc))
                raise
    cause = leadership.lost_reason or "its lock session ended"
    raise LeadershipLost(
        f"projector {projector.name!r} lost its leadership ({cause}); its in-flight batch was "
        "cancelled and did not commit. Another instance may lead now."
    )


async def run_projection(
    projector: object,
    store: Store,
    config: ProjectionConfig | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> ProjectionResult:
    """Run one projector: take leadership, then apply events in transactional batches.

    Loads the checkpoint, reads pages with the projector's filter pushed into the store, and
    for each batch applies the events and moves the checkpoint in one transaction
    (compare-and-set). With ``continuous=False`` (the default) it processes every event
    visible when it started, across all pages, and returns; with ``continuous=True`` it
    follows new events, woken by the store's notifications and polling every
    ``poll_interval``, until cancelled.

    Usable with ``await nursery.start(run_projection, ...)``, which returns once the run
    leads (or, with ``wait_for_leadership=True``, stands by).

    A partitioned projector runs every partition at once, each as its own unit (lock,
    checkpoint, batches); the result then sums theirs, with the greatest checkpoint.

    Args:
        projector: a `Projector` (``@projector`` function or a class instance).
        store: the store to read from and checkpoint in.
        config: a `ProjectionConfig`; defaults apply when None.

    Returns:
        What a catch-up run did (a continuous run only ends by cancellation or error).

    Raises:
        LeadershipUnavailable: another instance leads and ``wait_for_leadership`` is False.
        ProjectionFailed: an event failed fatally; the cause is chained.
        LeadershipLost: the lock was lost mid-run; nothing more was committed.
        InvalidArgument: *projector* is not a projector.

    This is a checkpoint; cancelling it rolls back the batch in flight and releases the lock.

    .. versionadded:: 0.1
    """
    resolved = resolve(projector)
    if config is None:
        config = ProjectionConfig()
    elif not isinstance(config, ProjectionConfig):
        raise InvalidArgument(f"config must be a ProjectionConfig, got {type(config).__name__}")
    if resolved.partitions > 1:
        return await _run_partitioned(resolved, store, config, task_status)
    return await _run_unit(resolved, store, config, task_status)


async def _run_partitioned(
    resolved: ResolvedProjector,
    store: Store,
    config: ProjectionConfig,
    task_status: trio.TaskStatus[None],
) -> ProjectionResult:
    # Every unit at once, in this process; started once every unit has. A unit's failure
    # cancels the others and reaches the caller as itself, not as a group of one.
    results: list[ProjectionResult] = []

    async def run(unit: ResolvedProjector, *, task_status: trio.TaskStatus[None]) -> None:
        results.append(await _run_unit(unit, store, config, task_status))

    # Checked before any unit starts, so a refused count is one clear error.
    await store.set_partitions(resolved.projection, resolved.partitions)
    try:
        async with trio.open_nursery() as nursery:
            for unit in resolved.units():
                await nursery.start(run, unit)
            task_status.started()
    except BaseExceptionGroup as group:
        raise_single(group)
    checkpoints = [r.checkpoint for r in results if r.checkpoint is not None]
    return ProjectionResult(
        events_applied=sum(r.events_applied for r in results),
        dead_letters=sum(r.dead_letters for r in results),
        checkpoint=max(checkpoints, default=None),
    )


async def _run_unit(
    resolved: ResolvedProjector,
    store: Store,
    config: ProjectionConfig,
    task_status: trio.TaskStatus[None],
) -> ProjectionResult:
    started = False

    def ready() -> None:
        nonlocal started
        if not started:
            started = True
            task_status.started()

    acquire: Any = (
        store.wait_acquire(resolved.name, on_standby=ready)
        if config.wait_for_leadership
        else store.try_acquire(resolved.name)
    )
    async with acquire as leadership:
        result = await run_led(resolved, store, leadership, config, on_running=ready)
    assert result is not None  # only a stop event ends a run without a result
    return result


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


async def replay_dead_letters(projector: object, store: Store) -> ReplayResult:
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
        projector: the projector as its hosts run it (same name and partition count).
        store: the store the projection runs against.

    Returns:
        How many letters were replayed (and deleted) and how many failed again (kept).

    Raises:
        ProjectionRunning: another session leads a unit of the projection; stop its hosts
            first. Nothing was replayed.
        PartitionsMismatch: *projector*'s partition count is not the recorded one; nothing
            was replayed.
        DeadLetterNotFound: a letter was gone when its replay resolved it; its batch was
            rolled back.
        InvalidArgument: *projector* is not a projector.

    .. versionadded:: 0.1
    .. versionchanged:: 0.3
       Replays the units the store records, under all of their locks at once; refuses a
       projector with another partition count, and raises `ProjectionRunning` (a
       `LeadershipUnavailable`) while any unit runs. A letter that is gone fails its batch.
       A letter whose commit the database refuses counts as failed again, and the replay
       goes on with the next (it raised `DatabaseError`).
    """
    resolved = resolve(projector)
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
        staged = False
        try:
            async with leadership.open_batch() as batch:
                ctx = resolved.context(batch, store)
                await _run_handlers(resolved, ctx, [letter.event])
                await batch.resolve_dead_letter(letter.id)
                staged = True
        except _HandlerFailed as exc:
            error: BaseException = exc.error
        except DatabaseError as exc:
            if not staged:
                raise
            # The database refused the commit itself (a deferred constraint, a
            # serialization failure) on a session that still holds the lock: the letter's
            # writes caused it, as in _apply_batch, where on_error decides. Nothing
            # committed, so the letter is kept: it failed again, and the next one is tried.
            error = exc
        else:
            replayed += 1
            continue
        logger.warning(
            "projector %s: replay of %s failed again: %s", resolved.name, letter.position, error
        )
        failed += 1
    return replayed, failed
