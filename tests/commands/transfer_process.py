"""Transfers from another process.

    python -m tests.commands.transfer_process DSN SCHEMA SEED COUNT [--cache] ACCOUNTS...

Prints one JSON object: done, refused, exhausted and retried transfers, and with --cache the
number of events its state cache folded.
"""

import json
import random
import sys

import trio

from eventcore_trio import RetriesExhausted, RetryPolicy, StateCache, execute, open_postgres_store
from eventcore_trio.demo import InsufficientFunds, Transfer, registry


async def main(dsn: str, schema: str, seed: int, count: int, args: list[str]) -> None:
    cache = StateCache() if args[0] == "--cache" else None
    accounts = args[1:] if cache is not None else args
    rng = random.Random(seed)
    done = refused = exhausted = retried = 0
    policy = RetryPolicy(max_attempts=100, max_backoff=0.02)
    async with open_postgres_store(dsn, schema=schema) as store:
        for _ in range(count):
            source, target = rng.sample(accounts, 2)
            try:
                result = await execute(
                    store,
                    Transfer(source, target, rng.randint(1, 40)),
                    registry=registry,
                    retry=policy,
                    cache=cache,
                )
            except InsufficientFunds:
                refused += 1
            except RetriesExhausted:
                exhausted += 1
            else:
                done += 1
                retried += result.attempts - 1
    report = {"done": done, "refused": refused, "exhausted": exhausted, "retried": retried}
    if cache is not None:
        report["events_folded"] = cache.stats.events_folded
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
