"""`run_host`: the one projector-host program (`eventcore-trio run`, demo, torture, benchmarks).

Every process whose job is to host projectors behaves the same way, so the resilience that
the torture run proves is the resilience of the host users run:

* it opens the store with capped exponential backoff while the database cannot be reached
  (a host started before its database comes up waits for it instead of exiting);
* it announces readiness once every projector runs or stands by;
* SIGINT and SIGTERM stop it cleanly (batches roll back, locks are released, connections
  close), and it reports which: 130 for SIGINT, as shells do for Ctrl-C, 0 for SIGTERM.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Final

import trio

from .._errors import AuthenticationFailed, DatabaseNotFound, StoreConnectionError
from .._protocols import Store
from .._util import raise_single
from ._config import ProjectionConfig
from ._host import run_projections

logger = logging.getLogger("eventcore_trio.host")

EXIT_OK: Final = 0
EXIT_INTERRUPTED: Final = 130  # as shells report a SIGINT
OPEN_INITIAL_BACKOFF: Final = 0.1


async def run_host(
    open_store: Callable[[], AbstractAsyncContextManager[Store]],
    projectors: Sequence[object],
    config: ProjectionConfig | None = None,
    *,
    on_ready: Callable[[], None] = lambda: print("ready", flush=True),
    on_stop: Callable[[signal.Signals], None] | None = None,
    open_backoff_cap: float = 5.0,
) -> int:
    """Host *projectors* as a program does, until SIGINT or SIGTERM; return its exit code.

    What `eventcore-trio run` does, for your own host programs: open the store (again and
    again with capped backoff while the database cannot be reached), run `run_projections`,
    call *on_ready* once, and on SIGINT or SIGTERM stop everything cleanly. Returns 130 after
    SIGINT (as shells report Ctrl-C) and 0 after SIGTERM. Start Trio with
    ``restrict_keyboard_interrupt_to_checkpoints=True`` around it, or a Ctrl-C that arrives
    before the signal handler is installed may land anywhere.

    Example::

        async def main() -> int:
            return await run_host(
                functools.partial(open_postgres_store, dsn), [my_projector]
            )

        sys.exit(trio.run(main, restrict_keyboard_interrupt_to_checkpoints=True))

    Args:
        open_store: opens the store (called again after the database was unreachable).
        projectors: what to host, as for `run_projections`.
        config: as for `run_projections`.
        on_ready: called once, when `run_projections` has started: this host's share of
            the units runs, stands by or waits for a change of partition count.
        on_stop: called with the signal that stops the host, before it stops.
        open_backoff_cap: the longest wait between attempts to open the store.

    Raises:
        AuthenticationFailed: the database refused the credentials (waiting will not help).
        DatabaseNotFound: the database does not exist.
        InvalidArgument: a projector or the config is invalid.
        UnsupportedPooling: lock sessions go through a transaction-pooling proxy (see
            `run_projections`); waiting will not help.

    .. versionadded:: 0.2
    .. versionchanged:: 0.3
       Raises `UnsupportedPooling` instead of retrying for ever behind transaction pooling.
    """
    stopped_by = signal.SIGTERM
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    _host_forever, open_store, projectors, config, on_ready, open_backoff_cap
                )
                async for received in signals:
                    stopped_by = signal.Signals(received)
                    if on_stop is not None:
                        on_stop(stopped_by)
                    nursery.cancel_scope.cancel()
                    break
    except BaseExceptionGroup as group:
        # The host task's own error (a bad DSN, an invalid projector), not a group of one.
        raise_single(group)
    return EXIT_INTERRUPTED if stopped_by == signal.SIGINT else EXIT_OK


async def _host_forever(
    open_store: Callable[[], AbstractAsyncContextManager[Store]],
    projectors: Sequence[object],
    config: ProjectionConfig | None,
    on_ready: Callable[[], None],
    open_backoff_cap: float,
) -> None:
    ready = False
    backoff = OPEN_INITIAL_BACKOFF
    while True:
        try:
            async with open_store() as store, trio.open_nursery() as nursery:
                await nursery.start(run_projections, store, projectors, config)
                backoff = OPEN_INITIAL_BACKOFF
                if not ready:
                    ready = True
                    on_ready()
        except (AuthenticationFailed, DatabaseNotFound):
            # Waiting will not fix credentials or a database name.
            raise
        except StoreConnectionError as exc:
            logger.warning("cannot open the store (%s); retrying in %.1fs", exc, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, open_backoff_cap)
