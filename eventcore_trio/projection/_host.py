"""`run_projections`: the host that runs many projectors, one task each, in one nursery."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterable
from functools import partial

import attrs
import trio

from .._errors import (
    EventCoreError,
    InvalidArgument,
    LeadershipLost,
    ProjectionFailed,
    StoreConnectionError,
    UnsupportedPooling,
)
from .._partitions import Unit
from .._protocols import HostMembership, Store
from .._status import ClusterView, HostState
from .._util import background, raise_single, wait_any
from ._balance import plan
from ._config import ProjectionConfig
from ._metrics import METRICS
from ._projector import ResolvedProjector, resolve
from ._runner import run_led

logger = logging.getLogger("eventcore_trio.host")

#: Seconds between a host's status reads for the lag gauges (with OpenTelemetry only).
LAG_REPORT_INTERVAL = 30.0


async def _report_lag(store: Store, units: frozenset[str]) -> None:
    # The lag gauges count what a unit has not applied, held back or not; a batch that does
    # not commit (held back by an open writer) records nothing in the lag histogram, so the
    # gauges come from status, read once per interval for the whole host.
    me = (os.getpid(), socket.gethostname())
    while True:
        try:
            status = await store.projection_status()
        except EventCoreError as exc:
            logger.debug("lag gauges: status unavailable (%s)", exc)
        else:
            METRICS.lag(
                {
                    s.unit: (s.lag_events, s.lag_seconds)
                    for s in status
                    if s.unit in units
                    and s.leader is not None
                    and (s.leader.pid, s.leader.host) == me
                }
            )
        await trio.sleep(LAG_REPORT_INTERVAL)


async def _supervise(
    projector: ResolvedProjector,
    store: Store,
    config: ProjectionConfig,
    ready: Callable[[], None],
    *,
    on_state: Callable[[bool, bool], None] | None = None,
    stop: trio.Event | None = None,
) -> bool:
    # One unit's life in the host: stand by, lead, and after a failure start over after
    # a backoff. A lost lock is not a failure: go straight back to standing by, unless the
    # lock keeps being lost soon after it is taken (then the same backoff applies, since the
    # cause, whatever it is, repeats). The backoff starts over only once a run has been
    # healthy for restart_reset_after seconds. *on_state(leading, standing_by)* hears every
    # change; setting *stop* hands the unit off gracefully (the batch in flight commits).
    # Returns False after a hand-off, True when the unit stopped on a FATAL failure (its lock
    # released, status `failed`): this host does not run it again (see _stopped).
    unit = projector.name

    def state(leading: bool, standing_by: bool) -> None:
        if on_state is not None:
            on_state(leading, standing_by)

    failures = 0
    # The failure whose traceback was logged last, as (type, message): the same one again
    # gets one line per retry, a different one its traceback. None once healthy.
    shown: tuple[type[BaseException], str] | None = None
    failing = False

    async def note_recovery() -> None:
        # Recovery is a run that stays healthy as long as the backoff needs to start over.
        nonlocal failures, shown, failing
        await trio.sleep(config.restart_reset_after)
        logger.info(
            "unit %s recovered: running for %.0fs after %d failed attempts",
            unit,
            config.restart_reset_after,
            failures,
        )
        failures, shown, failing = 0, None, False

    while True:
        stood_by = False
        led_since: float | None = None

        def standing_by() -> None:
            nonlocal stood_by
            stood_by = True
            state(False, True)
            ready()

        try:
            try:
                async with store.wait_acquire(unit, on_standby=standing_by) as leadership:
                    led_since = trio.current_time()
                    state(True, False)
                    if stood_by:
                        METRICS.failover(unit)
                        logger.info("unit %s: took over after standing by", unit)
                    run = partial(run_led, projector, store, leadership, config, on_running=ready)
                    if failing:
                        async with background(note_recovery):
                            result = await run(stop=stop)
                    else:
                        result = await run(stop=stop)
                    if result is None:
                        logger.info("unit %s: handed off", unit)
                        return False
            finally:
                state(False, False)
            if result.superseded:
                # Its version no longer runs (a higher one serves, or it was withdrawn): the
                # lock is released; the unit comes back if an operator serves it again.
                if not await _until_version_runs(projector, store, config, stop):
                    return False
                continue
        except LeadershipLost as exc:
            # Lost while stopping (a stopping leader ends its lock session first, and its
            # batch may hear of that before it hears of the cancellation): the stop's, not a
            # loss to report.
            await trio.lowlevel.checkpoint_if_cancelled()
            if _was_healthy(led_since, config):
                failures = 0
            failures += 1
            # The message names the unit already (and says that another instance may lead).
            about = _about(unit, str(exc).rstrip("."))
            if failures == 1:
                logger.warning("%s; standing by again", about)
                continue
            delay = config.restart_backoff(failures - 1)
            logger.warning(
                "%s; lost %d times in a row, standing by again in %.1fs", about, failures, delay
            )
            await trio.sleep(delay)
        except Exception as exc:
            if isinstance(exc, ProjectionFailed) and exc.event is not None:
                _stopped(unit, exc)
                ready()
                return True
            # Any other error, ours or the projector's: this unit restarts; the others go on.
            if _was_healthy(led_since, config):
                failures, shown = 0, None
            failures += 1
            failing = True
            delay = config.restart_backoff(failures)
            if isinstance(exc, StoreConnectionError):
                # The database went away (a restart, the network): not the projector's
                # fault, so no traceback; reconnect on the same capped backoff.
                logger.warning(
                    "unit %s: cannot reach PostgreSQL (%s); reconnecting in %.1fs",
                    unit,
                    exc,
                    delay,
                )
            else:
                error, text = _failure(unit, exc)
                kind = (type(error), str(error))
                if kind == shown:
                    logger.warning(
                        "unit %s failed again: %s; retry %d in %.1fs", unit, text, failures, delay
                    )
                else:
                    shown = kind
                    logger.error(
                        "unit %s failed: %s; retry %d in %.1fs",
                        unit,
                        text,
                        failures,
                        delay,
                        exc_info=exc,
                    )
            ready()
            await trio.sleep(delay)


async def _until_version_runs(
    projector: ResolvedProjector,
    store: Store,
    config: ProjectionConfig,
    stop: trio.Event | None,
) -> bool:
    # A superseded unit's host looks again every poll_interval; False once *stop* is set
    # (a hand-off while it waited).
    while True:
        with trio.move_on_after(config.poll_interval):
            if stop is None:
                await trio.sleep_forever()
            await stop.wait()
            return False
        with contextlib.suppress(StoreConnectionError):
            if (await store.version_role(projector.base, projector.version)).runs:
                logger.info("unit %s: its version serves again; standing by", projector.name)
                return True


def _stopped(unit: str, exc: ProjectionFailed) -> None:
    # FATAL means "do not retry": the event fails the same way on every attempt, so this
    # host stops the unit (its lock released, status `failed` once no host stands by for
    # it) and says so once, with the traceback. Another host that stands by for the unit
    # takes it over and tries once itself (on a rolling deploy it may run fixed code); it
    # stops too if it fails, so N hosts fail it at most N times, then it stays stopped.
    _, text = _failure(unit, exc)
    logger.error(
        "unit %s stopped: FATAL failure: %s; this host will not run it again: fix the "
        "projector (or make its on_error SKIP the event) and restart the host (after a reset "
        "of the projection, to rebuild it)",
        unit,
        text,
        exc_info=exc,
    )


def _failure(unit: str, exc: BaseException) -> tuple[BaseException, str]:
    # The error that a failure line names, and how: a ProjectionFailed says "projector 'x'
    # stopped: <what>: <Type>: <message>", of which the line keeps <what> onwards (the unit
    # is named once, by the line); its cause is what makes two failures the same.
    if isinstance(exc, ProjectionFailed) and exc.__cause__ is not None:
        prefix = f"projector {exc.projector!r} stopped: "
        text = str(exc)
        return exc.__cause__, text.removeprefix(prefix) if text.startswith(prefix) else text
    return exc, f"{type(exc).__name__}: {exc}"


def _about(unit: str, message: str) -> str:
    # A message that names the unit (as the library's own do, quoted) is logged as it is;
    # another is prefixed with it, so every line names its unit exactly once.
    return message if repr(unit) in message else f"unit {unit}: {message}"


@attrs.define(eq=False)
class _Slot:
    """One unit's task in a balancing host, and what it is doing."""

    unit: ResolvedProjector
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    stop: trio.Event = attrs.Factory(trio.Event)
    ready: trio.Event = attrs.Factory(trio.Event)
    leading: bool = False
    standing_by: bool = False


@attrs.define(eq=False)
class _Balancer:
    """A host's side of balancing: units' tasks started, stopped and handed off per plan."""

    units: dict[str, ResolvedProjector]
    store: Store
    config: ProjectionConfig
    nursery: trio.Nursery
    slots: dict[str, _Slot] = attrs.Factory(dict)
    # Replaced after every change of a slot, so the loop can wait for the next one.
    changed: trio.Event = attrs.Factory(trio.Event)
    # The units other live hosts run and this one does not, as last logged.
    lacking: frozenset[str] = frozenset()
    # Units stopped on a FATAL failure: never started again by this host, whatever the plan
    # says (a unit the plan gives this host then waits, failed, for an operator).
    stopped: set[str] = attrs.Factory(set)

    def poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def _run_slot(self, slot: _Slot) -> None:
        def on_state(leading: bool, standing_by: bool) -> None:
            slot.leading, slot.standing_by = leading, standing_by
            self.poke()

        try:
            with slot.scope:
                if await _supervise(
                    slot.unit,
                    self.store,
                    self.config,
                    slot.ready.set,
                    on_state=on_state,
                    stop=slot.stop,
                ):
                    self.stopped.add(slot.unit.name)
        finally:
            if self.slots.get(slot.unit.name) is slot:
                del self.slots[slot.unit.name]
            slot.ready.set()
            self.poke()

    def apply(self, wanted: frozenset[str], release: frozenset[str]) -> list[_Slot]:
        """Start, stop and hand off units' tasks; return the slots started."""
        started = []
        for name in sorted(wanted - self.slots.keys() - self.stopped):
            slot = self.slots[name] = _Slot(self.units[name])
            self.nursery.start_soon(self._run_slot, slot, name=name)
            started.append(slot)
        for name, slot in list(self.slots.items()):
            if name in release and slot.leading:
                slot.stop.set()
            elif name not in wanted and not slot.leading:
                slot.scope.cancel()
        return started

    async def publish(self, membership: HostMembership, last: HostState | None) -> HostState:
        """Publish what the slots do, if it changed since *last*; return what is published.

        Only changes are published: every publication wakes every other host, so
        publishing an unchanged state would have the hosts wake each other for ever.
        """
        now = HostState(
            frozenset(n for n, s in self.slots.items() if s.leading),
            frozenset(n for n, s in self.slots.items() if s.standing_by),
        )
        if now != last:
            await membership.publish(now.leading, now.standing_by)
        return now

    def report_lacking(self, view: ClusterView, me: str) -> None:
        """Log, once per change, the units other live hosts run that this host does not
        have: nobody here will lead or stand by for them."""
        others = [state for host, state in view.hosts.items() if host != me]
        lacking = frozenset().union(*(state.can_run for state in others)) - self.units.keys()
        if lacking == self.lacking:
            return
        self.lacking = lacking
        if not lacking:
            logger.info("host: runs every projector that the other live hosts run")
            return
        have = {unit.projection for unit in self.units.values()}
        missing = sorted({Unit.parse(u).projection for u in lacking} - have)
        # A projector this host has, with units it does not (another partition count).
        other_units = sorted(u for u in lacking if Unit.parse(u).projection in have)
        logger.warning(
            "host: other live hosts run projectors this host does not have: %s; it will "
            "not lead or stand by for them, so they run only while a host that has them "
            'lives (docs/scale-out.md, "Hosts that run different projectors")',
            ", ".join(missing + [f"{u} (other partition count)" for u in other_units]),
        )

    async def run(self, task_status: trio.TaskStatus[None]) -> None:
        names = sorted(self.units)
        started = False
        failures = 0
        while True:
            try:
                async with self.store.register_host(runs=names) as membership:
                    published: HostState | None = None
                    while membership.is_held:
                        # Taken first: a slot that changes from here on wakes the wait below.
                        changed = self.changed
                        view = await membership.view(names)
                        self.report_lacking(view, membership.host_id)
                        decided = plan(view, membership.host_id, names)
                        new = self.apply(decided.wanted, decided.release)
                        if not started:
                            for slot in new:
                                await slot.ready.wait()
                        published = await self.publish(membership, published)
                        failures = 0
                        if not started:
                            started = True
                            task_status.started()
                        with trio.move_on_after(self.config.balance_interval):
                            await wait_any(changed.wait, membership.wait_changed)
                # Lost as the host stops (its lock session ends first): the stop's.
                await trio.lowlevel.checkpoint_if_cancelled()
                logger.warning("host: its registration was lost; registering again")
            except UnsupportedPooling:
                # A transaction-pooling proxy breaks the lock session or the statement cache:
                # every attempt would fail the same way, so the host stops and says so
                # instead of retrying for ever while leading nothing.
                raise
            except EventCoreError as exc:
                # The database went away, the registration was lost, a statement failed:
                # balancing waits; the units go on as they are.
                failures += 1
                delay = self.config.restart_backoff(failures)
                logger.warning(
                    "host: cannot balance (%s); the units it runs go on; retrying in %.1fs",
                    exc,
                    delay,
                )
                await trio.sleep(delay)


async def _host_unit(
    projector: ResolvedProjector, store: Store, config: ProjectionConfig, ready: Callable[[], None]
) -> None:
    # A unit of a host that does not balance. One stopped on a FATAL failure stays stopped
    # while the others run: the task waits for the host's end instead of ending, since a
    # host whose tasks all ended would return, and a program would start it over.
    await _supervise(projector, store, config, ready)
    await trio.sleep_forever()


def _was_healthy(led_since: float | None, config: ProjectionConfig) -> bool:
    return led_since is not None and trio.current_time() - led_since >= config.restart_reset_after


async def run_projections(
    store: Store,
    projectors: Iterable[object],
    config: ProjectionConfig | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Host several projectors until cancelled: one task per unit, in one nursery.

    A projector is one unit; a partitioned one (``partitions=K``) is K units, each with its
    own lock, checkpoint and failover.

    With ``balance=True`` (the default) the hosts running against the same schema spread the
    units evenly among themselves, with no configuration: each leads at most one unit more
    than any other, units are handed off gracefully (after the batch in flight commits) as
    hosts join and leave, and every unit has one standby on another host. With
    ``balance=False`` every host stands by for every unit. See docs/scale-out.md.

    A standby takes over the moment its leader's session ends (within a second: it blocks
    in the database, it does not poll). A projector that fails restarts with exponential
    backoff (``restart_initial_backoff`` to ``restart_max_backoff``) without disturbing the
    others, logging its traceback once per distinct failure and then one line per retry; one
    that loses its lock goes back to standing by. One whose ``on_error`` makes a failure
    fatal (FATAL, the default, or RETRY out of retries) is not retried: the host stops that
    unit, releases its lock (status shows it ``failed``), logs it once at ERROR and does not
    run it again while it lives; a host standing by for it elsewhere tries it once too. When
    PostgreSQL cannot be reached (a restart, a network cut) each task reconnects on the same
    capped backoff and resumes from its checkpoint, with no operator action. Runs are always
    continuous and always wait for leadership, whatever *config* says.

    ``await nursery.start(run_projections, store, projectors)`` returns once this host's
    first share of the units is running or standing by, or waits for a change of its
    projection's partition count: a unit of a new count (a rolling deploy that splits a
    projection) holds its lock and applies nothing until the hosts running the old count
    have stopped, which may be long after the host started (docs/scale-out.md, "Changing the
    partition count"). Cancelling the host stops every task cleanly: batches in flight roll
    back, every lock is released and every connection closed.

    Args:
        store: the store to run against.
        projectors: `Projector` objects with distinct names.
        config: shared settings; ``continuous`` and ``wait_for_leadership`` are forced on.

    Raises:
        InvalidArgument: *projectors* is not a list (a single projector: wrap it), a
            projector is invalid, or two share a name.
        UnsupportedPooling: with ``balance=True``, a transaction-pooling proxy breaks the
            sessions the host registers and balances with: its lock session (the store's
            ``session_dsn``), so no unit could lead, or a pool that keeps asyncpg's statement
            cache through it; raised instead of retrying.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       Units of partitioned projectors; balancing between hosts.
    .. versionchanged:: 0.3
       A unit waiting for a change of partition count counts as started; a balancing host
       raises `UnsupportedPooling` instead of retrying its registration for ever.
    .. versionchanged:: 0.4
       A FATAL failure stops its unit instead of restarting it with backoff for ever; a
       repeated failure logs one line per retry instead of its traceback each time.
    """
    if isinstance(projectors, str | bytes) or not isinstance(projectors, Iterable):
        raise InvalidArgument(
            f"projectors must be a list of projectors, got {type(projectors).__name__}: "
            "run_projections(store, [projector]) for one"
        )
    projections = [resolve(p) for p in projectors]
    names = [p.name for p in projections]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidArgument(f"projector names must be distinct; repeated: {duplicates}")
    if config is None:
        config = ProjectionConfig()
    elif not isinstance(config, ProjectionConfig):
        raise InvalidArgument(f"config must be a ProjectionConfig, got {type(config).__name__}")
    config = attrs.evolve(config, continuous=True, wait_for_leadership=True)
    resolved = [unit for projection in projections for unit in projection.units()]
    if config.balance:
        try:
            async with trio.open_nursery() as nursery:
                if METRICS.enabled:
                    nursery.start_soon(_report_lag, store, frozenset(u.name for u in resolved))
                balancer = _Balancer({u.name: u for u in resolved}, store, config, nursery)
                await nursery.start(balancer.run)
                logger.info(
                    "host: %d projectors (%d units), balancing with other hosts",
                    len(projections),
                    len(resolved),
                )
                task_status.started()
        except BaseExceptionGroup as group:
            # The balancer's own error (UnsupportedPooling), not a group of one.
            raise_single(group)
        return
    async with trio.open_nursery() as nursery:
        if METRICS.enabled:
            nursery.start_soon(_report_lag, store, frozenset(u.name for u in resolved))
        ready_events = []
        for projector in resolved:
            ready = trio.Event()
            ready_events.append(ready)
            nursery.start_soon(_host_unit, projector, store, config, ready.set, name=projector.name)
        for ready in ready_events:
            await ready.wait()
        logger.info(
            "host: %d projectors (%d units) running or standing by", len(projections), len(resolved)
        )
        task_status.started()
