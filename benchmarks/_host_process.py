"""A projector host for the failover benchmark: python -m benchmarks._host_process DSN SCHEMA.

Hosts the no-op projector "failover"; each applied event is recorded (through ctx.db, with the
checkpoint) with the host's pid and the database clock, so takeover time can be measured.
"""

import os
import sys

import trio

from eventcore_trio import RecordedEvent, open_postgres_store
from eventcore_trio.postgres import DSN_ENVIRONMENT_VARIABLE
from eventcore_trio.projection import (
    ProjectionConfig,
    ProjectionContext,
    projector,
    run_projections,
)


async def main(dsn: str, schema: str) -> None:
    @projector("failover")
    async def record(event: RecordedEvent, ctx: ProjectionContext) -> None:
        await ctx.db.execute(
            f'INSERT INTO "{schema}".applied (applied_by) VALUES ($1)', os.getpid()
        )

    async with open_postgres_store(dsn, schema=schema) as store, trio.open_nursery() as nursery:
        await nursery.start(run_projections, store, [record], ProjectionConfig(poll_interval=0.5))
        print("ready", flush=True)


if __name__ == "__main__":
    trio.run(main, os.environ[DSN_ENVIRONMENT_VARIABLE], sys.argv[1])
