"""A balancing host running the projectors it is told to, for the scale-out and mixed-set tests
(`tests.helpers.RecordingHosts` starts it).

Usage: python recording_host.py SCHEMA APP_SCHEMA NAME[:PARTITIONS]...  (DSN in EVENTCORE_DSN)

Hosts one projector per NAME (partitioned when ``:PARTITIONS`` is given); each records every
event it applies in APP_SCHEMA.applied through ctx.db, so the record commits with the
checkpoint or not at all. Prints "ready" once running; warnings go to stderr.
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


async def main(schema: str, app: str, specs: list[str]) -> int:
    projectors = []
    for spec in specs:
        name, _, partitions = spec.partition(":")
        projectors.append(recorder(app, name, int(partitions or 1)))
    config = ProjectionConfig(batch_size=20, poll_interval=0.5, balance_interval=0.2)
    return await run_host(
        functools.partial(
            open_postgres_store, os.environ["EVENTCORE_DSN"], schema=schema, migrate=False
        ),
        projectors,
        config,
    )


if __name__ == "__main__":
    sys.exit(trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3:]))
