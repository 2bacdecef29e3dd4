"""`run_projections`: the host that runs many projectors, one task each, in one nursery."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import attrs
import trio

from .._errors import InvalidArgument, LeadershipLost, StoreConnectionError
from .._protocols import Store
from ._config import ProjectionConfig
from ._metrics import METRICS
from ._projector import ResolvedProjector, resolve
from ._runner import run_led

logger = logging.getLogger("eventcore_trio.host")


async def _supervise(
    projector: ResolvedProjector,
    store: Store,
    config: ProjectionConfig,
    ready: trio.Event,
) -> None:
    # One projector's life in the host: stand by, lead, and after a failure start over after
    # a backoff. A lost lock is not a failure: go straight back to standing by, unless the
    # lock keeps being lost soon after it is taken (then the same backoff applies, since the
    # cause, whatever it is, repeats). The backoff starts over only once a run has been
    # healthy for restart_reset_after seconds.
    failures = 0
    while True:
        stood_by = False
        led_since: float | None = None

        def standing_by() -> None:
            nonlocal stood_by
            stood_by = True
            ready.set()

        try:
            async with store.wait_acquire(projector.name, on_standby=standing_by) as leadership:
                led_since = trio.current_time()
                if stood_by:
                    METRICS.failover(projector.name)
                    logger.info("projector %s: took over after standing by", projector.name)
                await run_led(projector, store, leadership, config, on_running=ready.set)
        except LeadershipLost as exc:
            if _was_healthy(led_since, config):
                failures = 0
            failures += 1
            if failures == 1:
                logger.warning("projector %s: %s; standing by again", projector.name, exc)
                continue
            delay = config.restart_backoff(failures - 1)
            logger.warning(
                "projector %s: %s; lost %d times in a row, standing by again in %.1fs",
                projector.name,
                exc,
                failures,
                delay,
            )
            await trio.sleep(delay)
        except Exception as exc:
            # Any error, ours or the projector's: this projector restarts; the others go on.
            if _was_healthy(led_since, config):
                failures = 0
            failures += 1
            delay = config.restart_backoff(failures)
            if isinstance(exc, StoreConnectionError):
                # The database went away (a restart, the network): not the projector's
                # fault, so no traceback; reconnect on the same capped backoff.
                logger.warning(
                    "projector %s: cannot reach PostgreSQL (%s); reconnecting in %.1fs",
                    projector.name,
                    exc,
                    delay,
                )
            else:
                logger.error(
                    "projector %s failed (%s: %s); restarting in %.1fs",
                    projector.name,
                    type(exc).__name__,
                    exc,
                    delay,
                    exc_info=exc,
                )
            ready.set()
            await trio.sleep(delay)


def _was_healthy(led_since: float | None, config: ProjectionConfig) -> bool:
    return led_since is not None and trio.current_time() - led_since >= config.restart_reset_after


async def run_projections(
    store: Store,
    projectors: Iterable[object],
    config: ProjectionConfig | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Host several projectors until cancelled: one task each, in one nursery.

    Each task stands by while another process leads its projector and takes over the moment
    that leader's session ends (within a second: the standby blocks in the database, it does
    not poll). A projector that fails restarts with exponential backoff
    (``restart_initial_backoff`` to ``restart_max_backoff``) without disturbing the others;
    one that loses its lock goes back to standing by. When PostgreSQL cannot be reached (a
    restart, a network cut) each task reconnects on the same capped backoff and resumes from
    its checkpoint, with no operator action. Runs are always continuous and always
    wait for leadership, whatever *config* says.

    ``await nursery.start(run_projections, store, projectors)`` returns once every projector
    is running or standing by. Cancelling the host stops every task cleanly: batches in
    flight roll back, every lock is released and every connection closed.

    Args:
        store: the store to run against.
        projectors: `Projector` objects with distinct names.
        config: shared settings; ``continuous`` and ``wait_for_leadership`` are forced on.

    Raises:
        InvalidArgument: a projector is invalid, or two share a name.

    .. versionadded:: 0.1
    """
    resolved = [resolve(p) for p in projectors]
    names = [p.name for p in resolved]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidArgument(f"projector names must be distinct; repeated: {duplicates}")
    if config is None:
        config = ProjectionConfig()
    elif not isinstance(config, ProjectionConfig):
        raise InvalidArgument(f"config must be a ProjectionConfig, got {type(config).__name__}")
    config = attrs.evolve(config, continuous=True, wait_for_leadership=True)
    async with trio.open_nursery() as nursery:
        ready_events = []
        for projector in resolved:
            ready = trio.Event()
            ready_events.append(ready)
            nursery.start_soon(_supervise, projector, store, config, ready, name=projector.name)
        for ready in ready_events:
            await ready.wait()
        logger.info("host: %d projectors running or standing by", len(resolved))
        task_status.started()
