"""A projector host in its own process, for failover tests.

Usage: python host_process.py SCHEMA APP_SCHEMA LOGFILE [SLOW_SECONDS] (the DSN in EVENTCORE_DSN)

Hosts the transactional projector "ledger", which records every Deposited event it applies in
APP_SCHEMA.applied through ctx.db (so the record commits with the checkpoint, or not at all).
Prints "ready" once the host is running or standing by.
"""

import functools
import logging
import os
import sys

import trio

from eventcore_trio import RecordedEvent, open_postgres_store
from eventcore_trio.projection import (
    ProjectionConfig,
    ProjectionContext,
    projector,
    run_host,
)


async def main(dsn: str, schema: str, app_schema: str, logfile: str, slow: float) -> int:
    logging.basicConfig(
        filename=logfile,
        level=logging.INFO,
        format=f"%(created).3f {os.getpid()} %(name)s %(levelname)s %(message)s",
    )

    @projector("ledger", event_types=["Deposited"])
    async def ledger(event: RecordedEvent, ctx: ProjectionContext) -> None:
        if slow:
            await trio.sleep(slow)
        await ctx.db.execute(
            f'INSERT INTO "{app_schema}".applied (event_id, tx, seq, applied_by) '
            "VALUES ($1, $2, $3, $4)",
            event.event_id,
            *map(int, str(event.position).split(":")),
            os.getpid(),
        )

    config = ProjectionConfig(batch_size=5 if slow else 50, poll_interval=0.5)
    return await run_host(
        functools.partial(open_postgres_store, dsn, schema=schema), [ledger], config
    )


if __name__ == "__main__":
    trio.run(
        main,
        os.environ["EVENTCORE_DSN"],
        sys.argv[1],
        sys.argv[2],
        sys.argv[3],
        float(sys.argv[4]) if len(sys.argv) > 4 else 0.0,
    )
