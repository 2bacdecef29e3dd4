"""Outbox writers in a process of their own, for the read horizon's stress test.

Usage: python outbox_writers_process.py SCHEMA WRITERS TRANSACTIONS (the DSN in EVENTCORE_DSN)

Runs WRITERS concurrent outbox transactions (`store.transaction()`, READ COMMITTED) that
each write a row of their own first, so that they hold a transaction id before they append
(the late writers of docs/postgres.md, "The read horizon"), and one plain appender beside
them; each makes TRANSACTIONS appends, then the process exits 0.
"""

import os
import random
import sys

import trio

from eventcore_trio import NewEvent, open_postgres_store
from eventcore_trio._tools._processes import run_program


async def main(dsn: str, schema: str, writers: int, transactions: int) -> int:
    async with open_postgres_store(dsn, schema=schema, max_pool_size=writers + 2) as store:
        pid = os.getpid()

        async def outbox(w: int) -> None:
            rng = random.Random(f"{pid}/{w}")
            for n in range(transactions):
                async with store.transaction() as tx:
                    await tx.execute(f'INSERT INTO "{schema}".scratch VALUES ($1)', n)
                    # A moment with an id and no announcement: readers run meanwhile.
                    await trio.sleep(rng.uniform(0, 0.003))
                    await tx.append(f"outbox-{pid}-{w}", [NewEvent("E", {"n": n})])
                    await trio.sleep(rng.uniform(0, 0.003))

        async def plain() -> None:
            for n in range(transactions):
                await store.append(f"plain-{pid}", [NewEvent("E", {"n": n})])

        async with trio.open_nursery() as nursery:
            for w in range(writers):
                nursery.start_soon(outbox, w)
            nursery.start_soon(plain)
    return 0


if __name__ == "__main__":
    schema, writers, transactions = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sys.exit(run_program(main, os.environ["EVENTCORE_DSN"], schema, writers, transactions))
