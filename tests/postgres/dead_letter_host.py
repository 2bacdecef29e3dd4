"""A host of a partitioned projector that skips bad events, for the dead-letter tests.

Usage: python dead_letter_host.py SCHEMA APP_SCHEMA PARTITIONS  (DSN in EVENTCORE_DSN)

Hosts "wide" with PARTITIONS partitions: it skips (dead-letters) every event whose data says
``"bad": true`` and records every other event it applies in APP_SCHEMA.applied through
ctx.db, so the record commits with the checkpoint or not at all. Prints "ready" once running.
The test imports `wide` to replay the dead letters with the fixed code.
"""

import functools
import os
import sys

import trio

from eventcore_trio import RecordedEvent, open_postgres_store
from eventcore_trio.projection import (
    FailureStrategy,
    ProjectionConfig,
    ProjectionContext,
    projector,
    run_host,
)


def wide(app: str, partitions: int, *, skip_bad: bool) -> object:
    """The projector "wide": *skip_bad* is the broken code, without it the fixed code."""

    @projector("wide", partitions=partitions, on_error=lambda failure: FailureStrategy.SKIP)
    async def record(event: RecordedEvent, ctx: ProjectionContext) -> None:
        if skip_bad and event.data.get("bad"):
            raise ValueError(f"cannot apply {event.stream_id} v{event.stream_version} yet")
        await ctx.db.execute(
            f'INSERT INTO "{app}".applied (event_id, stream_id, partition, partitions, pid) '
            "VALUES ($1, $2, $3, $4, $5)",
            event.event_id,
            event.stream_id,
            ctx.partition,
            ctx.partitions,
            os.getpid(),
        )

    return record


async def main(schema: str, app: str, partitions: int) -> int:
    config = ProjectionConfig(batch_size=10, poll_interval=0.5, balance_interval=0.2)
    return await run_host(
        functools.partial(
            open_postgres_store, os.environ["EVENTCORE_DSN"], schema=schema, migrate=False
        ),
        [wide(app, partitions, skip_bad=True)],
        config,
    )


if __name__ == "__main__":
    sys.exit(trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3])))
