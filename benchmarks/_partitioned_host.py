"""The partitioned benchmark's host: python -m benchmarks._partitioned_host SCHEMA NAME.

The DSN comes in EVENTCORE_DSN. Hosts projector NAME in 4 partitions, one upsert per event
into SCHEMA.balances_NAME through ctx.db (the transactional style of catch_up_transactional),
balancing its units with the other hosts of the run.
"""

import functools
import os
import sys

import trio

from eventcore_trio import RecordedEvent, open_postgres_store
from eventcore_trio.postgres import DSN_ENVIRONMENT_VARIABLE
from eventcore_trio.projection import ProjectionConfig, ProjectionContext, projector, run_host

PARTITIONS = 4


async def main(dsn: str, schema: str, name: str) -> int:
    sql = (
        f'INSERT INTO "{schema}"."balances_{name}" (account, total) VALUES ($1, $2) '
        f'ON CONFLICT (account) DO UPDATE SET total = "balances_{name}".total + excluded.total'
    )

    @projector(name, partitions=PARTITIONS)
    async def upsert(event: RecordedEvent, ctx: ProjectionContext) -> None:
        await ctx.db.execute(sql, event.stream_id, event.data["amount"])

    return await run_host(
        functools.partial(open_postgres_store, dsn, schema=schema, migrate=False),
        [upsert],
        ProjectionConfig(batch_size=500, balance_interval=0.2),
        on_ready=lambda: None,
    )


if __name__ == "__main__":
    sys.exit(
        trio.run(
            main,
            os.environ[DSN_ENVIRONMENT_VARIABLE],
            sys.argv[1],
            sys.argv[2],
            restrict_keyboard_interrupt_to_checkpoints=True,
        )
    )
