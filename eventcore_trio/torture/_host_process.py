"""A torture host process: ``python -m eventcore_trio.torture._host_process SCHEMA APP NAME``.

Hosts the ledger projections through whatever network the torture run put in front of it (the
DSN comes in ``EVENTCORE_DSN``), with the host program every other host uses
(`run_host`): if the store cannot be opened (the server is down, the network is cut)
it tries again with capped exponential backoff; it prints "ready" once running or standing by
and stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

from .._tools._processes import run_program
from ..postgres import DSN_ENVIRONMENT_VARIABLE, open_postgres_store
from ..projection import ProjectionConfig, run_host
from ._model import projectors

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


async def main(dsn: str, schema: str, app: str, name: str) -> int:
    """Host the ledger projection until SIGTERM or SIGINT, reopening the store when it cannot
    open (the same host program as `eventcore-trio run`)."""
    return await run_host(
        functools.partial(
            open_postgres_store,
            dsn,
            schema=schema,
            migrate=False,
            application_name=name,
            connect_timeout=2.0,
        ),
        projectors(app),
        CONFIG,
        open_backoff_cap=OPEN_BACKOFF_CAP,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    # The DSN comes from the environment (see run_ready_process), never the command line.
    schema, app, name = sys.argv[1:4]
    sys.exit(run_program(main, os.environ[DSN_ENVIRONMENT_VARIABLE], schema, app, name))
