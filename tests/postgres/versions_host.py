"""A balancing host running one version of the projection "totals", for the tests of versions
under real processes (tests/postgres/test_versions_processes.py).

Usage: python versions_host.py SCHEMA VERSION:PARTITIONS:BATCH_SIZE  (DSN in EVENTCORE_DSN)

Version *N* of "totals" keeps, per stream, a running total of the ``amount`` of each event
times *N* (so two versions differ), and records every event it applies, with its position,
this process's pid and the server's clock, in ``applied``, whose primary key is the event id:
an event applied twice fails its batch. Both tables are unqualified: they live in the
version's read-model schema, which its setup hook fills. Prints "ready" once running.
"""

import functools
import os
import sys

from eventcore_trio import Database, RecordedEvent, open_postgres_store
from eventcore_trio._positions import position_parts
from eventcore_trio._tools._processes import run_program
from eventcore_trio.projection import (
    ProjectionConfig,
    ProjectionContext,
    projector,
    run_host,
)

#: The projection both versions are versions of.
NAME = "totals"


async def setup(db: Database) -> None:
    """The version's tables, in its read-model schema (first on the batch's search_path)."""
    await db.execute(
        "CREATE TABLE IF NOT EXISTS totals (stream_id text PRIMARY KEY, total bigint NOT NULL, "
        "last_version bigint NOT NULL); "
        "CREATE TABLE IF NOT EXISTS applied (event_id uuid PRIMARY KEY, stream_id text NOT NULL, "
        "stream_version bigint NOT NULL, tx bigint NOT NULL, position bigint NOT NULL, "
        "pid int NOT NULL, applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )


def totals(version: int, partitions: int) -> object:
    """Version *version* of "totals" in *partitions* partitions."""

    @projector(NAME, version=version, partitions=partitions, setup=setup)
    async def apply(event: RecordedEvent, ctx: ProjectionContext) -> None:
        tx, position = position_parts(event.position)
        # Queued: sent with the batch's other writes, in one round trip per batch.
        ctx.db.queue(
            "INSERT INTO applied (event_id, stream_id, stream_version, tx, position, pid) "
            "VALUES ($1, $2, $3, $4, $5, $6)",
            event.event_id,
            event.stream_id,
            event.stream_version,
            tx,
            position,
            os.getpid(),
        )
        ctx.db.queue(
            "INSERT INTO totals AS t (stream_id, total, last_version) VALUES ($1, $2, $3) "
            "ON CONFLICT (stream_id) DO UPDATE SET total = t.total + EXCLUDED.total, "
            "last_version = EXCLUDED.last_version",
            event.stream_id,
            event.data["amount"] * version,
            event.stream_version,
        )

    return apply


async def main(schema: str, spec: str) -> int:
    version, partitions, batch_size = map(int, spec.split(":"))
    config = ProjectionConfig(batch_size=batch_size, poll_interval=0.2, balance_interval=0.2)
    return await run_host(
        functools.partial(
            open_postgres_store, os.environ["EVENTCORE_DSN"], schema=schema, migrate=False
        ),
        [totals(version, partitions)],
        config,
    )


if __name__ == "__main__":
    sys.exit(run_program(main, sys.argv[1], sys.argv[2]))
