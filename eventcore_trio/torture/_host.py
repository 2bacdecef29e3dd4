"""A torture host process: ``python -m eventcore_trio.torture._host DSN SCHEMA APP NAME``.

Hosts the ledger projection with `run_projections`, through whatever network the torture run
put in front of it. If the store cannot be opened (the server is down, the network is cut) it
tries again with capped exponential backoff. Prints "ready" once running or standing by;
stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import trio

from .._concurrency import run_program
from .._errors import StoreConnectionError
from ..postgres import DSN_ENVIRONMENT_VARIABLE, open_postgres_store
from ..projection import ProjectionConfig, run_projections
from ._model import LedgerProjector

logger = logging.getLogger("eventcore_trio.torture.host")

# Short backoffs: the torture run measures how fast hosts come back, and a real deployment
# would tune these the same way for a small fleet.
CONFIG = ProjectionConfig(
    batch_size=200,
    poll_interval=0.25,
    restart_initial_backoff=0.1,
    restart_max_backoff=2.0,
    # Faults come every few seconds here; a host that led through one is healthy.
    restart_reset_after=2.0,
    read_max_backoff=1.0,
)
OPEN_BACKOFF_CAP = 2.0


async def host(dsn: str, schema: str, app: str, name: str) -> None:
    """Host the ledger projection until cancelled, reopening the store when it cannot open."""
    ready = False
    backoff = 0.1
    while True:
        try:
            async with (
                open_postgres_store(
                    dsn, schema=schema, migrate=False, application_name=name, connect_timeout=2.0
                ) as store,
                trio.open_nursery() as nursery,
            ):
                await nursery.start(run_projections, store, [LedgerProjector(app)], CONFIG)
                backoff = 0.1
                if not ready:
                    ready = True
                    print("ready", flush=True)
        except StoreConnectionError as exc:
            logger.warning("%s: cannot open the store (%s); retrying in %.1fs", name, exc, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, OPEN_BACKOFF_CAP)


async def main(dsn: str, schema: str, app: str, name: str) -> None:
    """Run `host` until SIGTERM or SIGINT."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(host, dsn, schema, app, name)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    # The DSN comes from the environment (see run_ready_process), never the command line.
    schema, app, name = sys.argv[1:4]
    run_program(main, os.environ[DSN_ENVIRONMENT_VARIABLE], schema, app, name)
