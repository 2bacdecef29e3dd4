"""A balancing host in its own process, for the scale-out tests.

Usage: python scale_out_host.py SCHEMA APP_SCHEMA PARTITIONS  (DSN in EVENTCORE_DSN)

Hosts six plain projectors ("plain-0".."plain-5") and one partitioned projector ("wide",
PARTITIONS partitions); each records every event it applies in APP_SCHEMA.applied through
ctx.db, so the record commits with the checkpoint or not at all. Prints "ready" once
running.
"""

import functools
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


def recorder(app: str, name: str, partitions: int) -> object:
    @projector(name, partitions=partitions)
    async def record(event: RecordedEvent, ctx: ProjectionContext) -> None:
        await ctx.db.execute(
            f'INSERT INTO "{app}".applied (projection, partition, partitions, stream_id, version, '
            "event_id, pid) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            name,
            ctx.partition,
            ctx.partitions,
            event.stream_id,
            event.stream_version,
            event.event_id,
            os.getpid(),
        )

    return record


async def main(schema: str, app: str, partitions: int) -> int:
    projectors = [recorder(app, f"plain-{i}", 1) for i in range(6)]
    projectors.append(recorder(app, "wide", partitions))
    config = ProjectionConfig(batch_size=20, poll_interval=0.5, balance_interval=0.2)
    return await run_host(
        functools.partial(
            open_postgres_store, os.environ["EVENTCORE_DSN"], schema=schema, migrate=False
        ),
        projectors,
        config,
    )


if __name__ == "__main__":
    sys.exit(trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3])))
