"""catch_up_partitioned: one transactional projection in 4 partitions over 1, 2, 4 hosts.

Each configuration rebuilds a fresh projection of the same events: the host processes are
launched together and the clock runs from their launch until every partition's checkpoint
has reached the last event of its partition, so the figure includes starting the processes
and the moments before the later hosts join and the units are handed over to them.
"""

from __future__ import annotations

import sys
import time

import trio

from eventcore_trio import EventFilter, Partition, Position, open_postgres_store
from eventcore_trio.postgres import DSN_ENVIRONMENT_VARIABLE, PostgresStore
from eventcore_trio.testing import run_ready_process

from ._partitioned_host import PARTITIONS


async def _done(store: PostgresStore, targets: dict[str, Position | None]) -> bool:
    rows = await store.admin.fetch(
        f'SELECT subscription_name, tx, position FROM "{store.schema}".subscriptions '
        "WHERE subscription_name = ANY($1::text[]) AND tx IS NOT NULL",
        list(targets),
    )
    reached = {r["subscription_name"]: Position(r["tx"], r["position"]) for r in rows}
    return all(
        target is None or (unit in reached and reached[unit] >= target)
        for unit, target in targets.items()
    )


async def catch_up_partitioned(dsn: str, schema: str, hosts: int, name: str) -> float:
    """Events/s for a rebuild of projection *name* (4 partitions) by *hosts* processes."""
    async with open_postgres_store(dsn, schema=schema, migrate=False) as store:
        await store.admin.execute(
            f'CREATE TABLE "{schema}"."balances_{name}" '
            "(account text PRIMARY KEY, total bigint NOT NULL)"
        )
        events = await store.admin.fetchval(f'SELECT count(*) FROM "{schema}".events')
        targets: dict[str, Position | None] = {}
        for index in range(PARTITIONS):
            partition = Partition(index, PARTITIONS)
            targets[f"{name}[{partition}]"] = await store.last_position(
                EventFilter(partition=partition)
            )
        argv = [sys.executable, "-m", "benchmarks._partitioned_host", schema, name]
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(hosts):
                nursery.start_soon(
                    lambda: run_ready_process(argv, ready=b"", env={DSN_ENVIRONMENT_VARIABLE: dsn})
                )
            with trio.fail_after(600):
                while not await _done(store, targets):  # noqa: ASYNC110  (other processes)
                    await trio.sleep(0.05)
            elapsed = time.perf_counter() - started
            nursery.cancel_scope.cancel()
        return int(events) / elapsed
