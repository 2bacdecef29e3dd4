"""A reactor host in its own process, for kill -9 tests.

Usage: python reactor_process.py SCHEMA SLOW_SECONDS (the DSN in EVENTCORE_DSN)

Hosts the reactor "reactor": for every "Paid" event it appends one "Reacted" event to the
stream "reaction-<stream>" through ctx.append (so the reaction commits with the checkpoint,
or not at all), then sleeps SLOW_SECONDS, so batches are long and a kill lands mid-batch.
Prints "ready" once the host is running or standing by.
"""

import functools
import os
import sys

import trio

from eventcore_trio import NewEvent, RecordedEvent, open_postgres_store
from eventcore_trio.projection import ProjectionConfig, ProjectionContext, projector, run_host


async def main(dsn: str, schema: str, slow: float) -> int:
    @projector("reactor", event_types=["Paid"])
    async def react(event: RecordedEvent, ctx: ProjectionContext) -> None:
        await ctx.append(f"reaction-{event.stream_id}", [NewEvent("Reacted", {})])
        await trio.sleep(slow)

    config = ProjectionConfig(batch_size=5, poll_interval=0.5)
    return await run_host(
        functools.partial(open_postgres_store, dsn, schema=schema), [react], config
    )


if __name__ == "__main__":
    trio.run(main, os.environ["EVENTCORE_DSN"], sys.argv[1], float(sys.argv[2]))
