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
import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any, final

import attrs
import outcome
import trio

from .._errors import (
    CheckpointAhead,
    EventCoreError,
    InvalidArgument,
    LeadershipLost,
    ProjectionFailed,
    StoreConnectionError,
)
from .._positions import Position
from .._protocols import Leadership, ProjectionBatch, Store
from .._status import ProjectionState
from .._util import background, raise_single, service_nursery, wait_any
from .._versions import VersionRole
from ._config import ProjectionConfig
from ._context import apply_and_commit
from ._metrics import METRICS
from ._pipeline import (
    AnyEvent,
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
from ._projector import ResolvedProjector, resolve_call

logger = logging.getLogger("eventcore_trio.projection")


async def _apply_batch(
    projector: ResolvedProjector, store: Store, leadership: Leadership, effect: ApplyBatch
) -> Result:
    started = time.perf_counter()

    async def stage(batch: ProjectionBatch) -> None:
        if effect.dead_letter is not None:
            failure = effect.dead_letter
            await batch.record_dead_letter(failure.event, failure.error, retries=failure.retries)
        await batch.save_checkpoint(effect.expected, effect.checkpoint)

    failed = await apply_and_commit(
        projector,
        store,
        leadership,
        effect.events,
        then=stage,
        use_batch_hook=effect.use_batch_hook,
        from_start=effect.expected is None,
    )
    if failed is not None:
        return BatchFailed(failed.index, failed.error)
    lag = None
    if effect.events:
        lag = (dt.datetime.now(dt.UTC) - effect.events[-1].recorded_at).total_seconds()
    METRICS.batch(projector.name, len(effect.events), time.perf_counter() - started, lag)
    if effect.dead_letter is not None:
        METRICS.dead_letter(projector.name)
    return BatchCommitted()


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


class _Prefetch:
    """The read of the next page, issued while the batch before it applies and commits.

    Its page is used only for the very effect it was issued for, right after that batch
    committed; otherwise (the batch failed, the run went anywhere else) it is cancelled and
    forgotten. A page read earlier is still a correct, gap-free page from that position: the
    read's horizon rules are in the read itself.
    """

    def __init__(self, effect: ReadPage) -> None:
        self.effect = effect
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        # None: not read (cancelled, or the read failed: the shell then reads as usual, and
        # reports that read's failure, so a prefetch never changes what a failure does).
        self.page: tuple[AnyEvent, ...] | None = None

    async def run(self, projector: ResolvedProjector, store: Store) -> None:
        with self.scope:
            try:
                page = await store.read_events(
                    self.effect.after,
                    limit=self.effect.limit,
                    filter=projector.filter,
                    undecodable="include",
                )
            except Exception as exc:
                logger.debug("projector %s: read ahead failed: %s", projector.name, exc)
            else:
                self.page = tuple(page)
        self.done.set()

    async def take(self) -> PageRead | None:
        """The page, once read; None when there is none to use."""
        await self.done.wait()
        # An empty page is not used: read while the batch's own transaction was open, it may
        # stop short of events that committed meanwhile, whose notification came before the
        # wait that an empty page leads to. The shell reads again instead.
        if not self.page:
            return None
        return PageRead(self.page)


@final
class _VersionWatch:
    """Whether this unit's projection version still runs, and its switch once caught up.

    At most once per ``poll_interval`` (and at the end of a catch-up run) the unit looks:
    a building version that is caught up (an idle moment) asks the store to make it serve,
    which checks every unit of the version and switches in one atomic step; otherwise the
    unit asks how its version stands, also between batches, so that a version kept busy by a
    steady stream of events still hears that it was superseded. Never a statement per event.
    """

    def __init__(
        self, projector: ResolvedProjector, store: Store, role: VersionRole, every: float
    ) -> None:
        self._projector = projector
        self._store = store
        self.role = role
        self._every = every
        # When it last asked for its role, and (building) when it last tried to take over:
        # at its first idle moment a building version tries at once (it may have caught up
        # at once); the role it was just told at the start.
        self._asked = trio.current_time()
        self._tried = -math.inf

    async def look(self, *, caught_up: bool, now: bool = False) -> bool:
        """Look again if due (or *now*); returns whether it did (it asked the store)."""
        projector = self._projector
        clock = trio.current_time()
        if caught_up and self.role is VersionRole.BUILDING:
            if not now and clock - self._tried < self._every:
                return False
            self.role = await self._store.switch_if_caught_up(
                projector.base, projector.version, projector.unit_filters
            )
            if self.role is VersionRole.SERVING:
                logger.info(
                    "projection %s: version %d caught up and serves now",
                    projector.base,
                    projector.version,
                )
            self._tried = self._asked = trio.current_time()
            return True
        if not now and clock - self._asked < self._every:
            return False
        self.role = await self._store.version_role(projector.base, projector.version)
        self._asked = trio.current_time()
        return True


async def _drive(
    projector: ResolvedProjector,
    store: Store,
    leadership: Leadership,
    config: ProjectionConfig,
    stop: trio.Event | None = None,
    watch: _VersionWatch | None = None,
    *,
    checkpoint: outcome.Outcome[Position | None] | None = None,
) -> ProjectionResult | None:
    # Returns None when *stop* is set: between effects, so a batch in flight commits first,
    # and at once from waits and sleeps. *checkpoint*: the checkpoint already loaded, the
    # answer to the first effect.
    pipeline = ProjectionPipeline(
        config=config,
        on_error=projector.on_error,
        has_batch_hook=projector.apply_batch is not None,
    )
    effect = pipeline.start()
    async with service_nursery() as nursery:
        return await _loop(
            pipeline, effect, nursery, projector, store, leadership, stop, watch, checkpoint
        )


async def _loop(
    pipeline: ProjectionPipeline,
    effect: Effect,
    nursery: trio.Nursery,
    projector: ResolvedProjector,
    store: Store,
    leadership: Leadership,
    stop: trio.Event | None,
    watch: _VersionWatch | None,
    checkpoint: outcome.Outcome[Position | None] | None,
) -> ProjectionResult | None:
    # The next page read while a batch commits (see _Prefetch), in *nursery*: cancelled with
    # the run, and never outliving it.
    prefetch: _Prefetch | None = None
    if checkpoint is not None:
        assert isinstance(effect, LoadCheckpoint)
        effect = pipeline.resume(CheckpointLoaded(checkpoint.unwrap()))
    while True:
        if prefetch is not None and effect != prefetch.effect:
            prefetch.scope.cancel()
            prefetch = None
        if stop is not None and stop.is_set():
            return None
        # Caught up (an idle moment, the end): a building version may take over. Between
        # batches (the next read): the version's role is looked at again when due.
        if (
            watch is not None
            and isinstance(effect, Done | WaitForEvents | ReadPage)
            and prefetch is None
        ):
            looked = await watch.look(
                caught_up=not isinstance(effect, ReadPage), now=isinstance(effect, Done)
            )
            if not watch.role.runs:
                return attrs.evolve(pipeline.result_so_far(), superseded=True)
            if looked and isinstance(effect, WaitForEvents):
                # A notification that came while it looked would not wake the wait: read
                # again first (the next look is a poll_interval away, so this is once).
                effect = pipeline.resume(Woken())
                continue
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
        page: PageRead | None = None
        if prefetch is not None:
            # The effect is the read that the committed batch was answered with.
            page = await prefetch.take()
            prefetch = None
        elif isinstance(effect, ApplyBatch) and effect.read_next is not None:
            prefetch = _Prefetch(effect.read_next)
            nursery.start_soon(prefetch.run, projector, store)
        result: Result
        if page is not None:
            result = page
        elif stop is not None and isinstance(effect, WaitForEvents | Sleep):
            with trio.CancelScope() as waiting:
                async with background(partial(_cancel_when_set, stop, waiting)):
                    result = await _perform(effect, projector, store, leadership)
            if waiting.cancelled_caught:
                return None
        else:
            result = await _perform(effect, projector, store, leadership)
        if prefetch is not None and not isinstance(result, BatchCommitted):
            # A failed batch: what follows it is decided anew, never by a page read before.
            prefetch.scope.cancel()
            prefetch = None
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


async def _report_running(
    projector: ResolvedProjector, store: Store, leadership: Leadership
) -> outcome.Outcome[Position | None]:
    # The report goes out on the lock session while the checkpoint is read from the pool: a
    # new leader (a failover) starts applying one round trip sooner. The checkpoint may be
    # read this early: the partition count is recorded (nothing rewrites this unit's
    # checkpoint now), and only this unit's leader writes it while the lock is held. Its
    # outcome, an error too, is the pipeline's first effect's (see _loop).
    loaded: list[outcome.Outcome[Position | None]] = []

    async def load() -> None:
        # Errors only: a cancellation ends the nursery as usual.
        try:
            checkpoint = await store.load_checkpoint(projector.name)
        except Exception as exc:
            loaded.append(outcome.Error(exc))
        else:
            loaded.append(outcome.Value(checkpoint))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load)
            await leadership.report(ProjectionState.RUNNING, filter=projector.filter)
    except BaseExceptionGroup as group:
        raise_single(group)
    return loaded[0]


async def _set_up_read_model(
    projector: ResolvedProjector, store: Store, leadership: Leadership
) -> None:
    # A unit that starts from the beginning runs its setup hook before anything else, in a
    # transaction of its own: its version may serve before it has an event to apply (the
    # first version serves at once; a version of events not written yet is caught up at
    # once), and readers must then find the tables. A version below the serving one does
    # not run, so it sets nothing up.
    if projector.setup is None:
        return
    serving = await store.serving_version(projector.base)
    if serving is not None and projector.version < serving:
        return
    try:
        if await store.load_checkpoint(projector.name) is not None:
            return
    except CheckpointAhead:
        return  # the run refuses it with its own error, which says what to do

    async def nothing(batch: ProjectionBatch) -> None:
        pass

    await apply_and_commit(projector, store, leadership, (), then=nothing, from_start=True)


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
    its projection's partition count (see `_record_count`). A unit of a version that no
    longer runs (see `VersionRole`) applies nothing and returns at once, ``superseded``."""
    await _set_up_read_model(projector, store, leadership)
    role = await store.version_role(projector.base, projector.version)
    if not role.runs:
        await leadership.report(ProjectionState.SUPERSEDED, filter=projector.filter)
        if on_running is not None:
            on_running()
        return ProjectionResult(events_applied=0, dead_letters=0, checkpoint=None, superseded=True)
    if not await _record_count(projector, store, leadership, on_waiting=on_running, stop=stop):
        return None
    checkpoint = await _report_running(projector, store, leadership)
    logger.info("projector %s: leading", projector.name)
    if on_running is not None:
        on_running()
    with trio.CancelScope() as scope:
        async with background(partial(_cancel_when_lost, leadership, scope)):
            watch = _VersionWatch(projector, store, role, config.poll_interval)
            try:
                result = await _drive(
                    projector, store, leadership, config, stop, watch, checkpoint=checkpoint
                )
                if result is not None and result.superseded:
                    logger.info(
                        "projection %s: version %d %s; unit %s stops",
                        projector.base,
                        projector.version,
                        "was superseded by a higher one"
                        if watch.role is VersionRole.SUPERSEDED
                        else "was withdrawn",
                        projector.name,
                    )
                    with trio.move_on_after(5, shield=True), contextlib.suppress(EventCoreError):
                        await leadership.report(ProjectionState.SUPERSEDED)
                return result
            except ProjectionFailed as exc:
                # The host (or the caller) reports the failure once; this is for debugging.
                logger.debug("projector %s: %s", projector.name, exc)
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
    store: Store,
    projector: object,
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
        store: the store to read from and checkpoint in.
        projector: a `Projector` (``@projector`` function or a class instance).
        config: a `ProjectionConfig`; defaults apply when None.

    Returns:
        What a catch-up run did (a continuous run only ends by cancellation or error).

    Raises:
        LeadershipUnavailable: another instance leads and ``wait_for_leadership`` is False.
        ProjectionFailed: an event failed fatally; the cause is chained.
        LeadershipLost: the lock was lost mid-run; nothing more was committed.
        InvalidArgument: *projector* is not a projector, or *store* is not a store.

    This is a checkpoint; cancelling it rolls back the batch in flight and releases the lock.

    .. versionadded:: 0.1
    .. versionchanged:: 0.4
       The store comes first, as in `run_projections`: ``run_projection(store, projector)``.
       The old order, ``run_projection(projector, store)``, still works with a
       `DeprecationWarning`; it is removed in 0.5.
    """
    store, resolved = resolve_call("run_projection", store, projector)
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
        superseded=any(r.superseded for r in results),
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
