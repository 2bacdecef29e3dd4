"""Transfers from another process: python transfer_process.py DSN SCHEMA SEED COUNT ACCOUNTS...

Prints one line: "<done> <refused> <exhausted> <retried>".
"""

import random
import sys

import trio

from eventcore_trio import RetriesExhausted, RetryPolicy, execute, open_postgres_store
from eventcore_trio.demo import InsufficientFunds, Transfer, registry


async def main(dsn: str, schema: str, seed: int, count: int, accounts: list[str]) -> None:
    rng = random.Random(seed)
    done = refused = exhausted = retried = 0
    policy = RetryPolicy(max_attempts=50)
    async with open_postgres_store(dsn, schema=schema) as store:
        for _ in range(count):
            source, target = rng.sample(accounts, 2)
            try:
                result = await execute(
                    store,
                    Transfer(source, target, rng.randint(1, 40)),
                    registry=registry,
                    retry=policy,
                )
            except InsufficientFunds:
                refused += 1
            except RetriesExhausted:
                exhausted += 1
            else:
                done += 1
                retried += result.attempts > 1
    print(done, refused, exhausted, retried, flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
