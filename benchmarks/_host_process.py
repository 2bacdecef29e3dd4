"""The failover benchmark's projector host: python -m benchmarks._host_process SCHEMA.

The DSN comes in EVENTCORE_DSN.

Hosts the no-op projector "failover"; each applied event is recorded (through ctx.db, with the
checkpoint) with the host's pid and the database clock, so takeover time can be measured.
"""

import functools
import os
import sys

import trio

from eventcore_trio import RecordedEvent, open_postgres_store
from eventcore_trio.postgres import DSN_ENVIRONMENT_VARIABLE
from eventcore_trio.projection import ProjectionConfig, ProjectionContext, projector, run_host


async def main(dsn: str, schema: str) -> int:
    @projector("failover")
    async def record(event: RecordedEvent, ctx: ProjectionContext) -> None:
        await ctx.db.execute(
            f'INSERT INTO "{schema}".applied (applied_by) VALUES ($1)', os.getpid()
        )

    return await run_host(
        functools.partial(open_postgres_store, dsn, schema=schema),
        [record],
        ProjectionConfig(poll_interval=0.5),
    )


if __name__ == "__main__":
    sys.exit(
        trio.run(
            main,
            os.environ[DSN_ENVIRONMENT_VARIABLE],
            sys.argv[1],
            restrict_keyboard_interrupt_to_checkpoints=True,
        )
    )
