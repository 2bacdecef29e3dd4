"""Transfers between accounts: in this process (`transfers`) or in another one.

    python -m tests.commands.transfer_process SCHEMA SEED COUNT [--cache] ACCOUNTS...

with the DSN in EVENTCORE_DSN (it may hold a password: never on a command line), prints
one JSON object: done, refused, exhausted and retried transfers, and with --cache the
number of events its state cache folded. `run_in_process` runs it and returns that object.
"""

import json
import os
import random
import sys
from pathlib import Path

import trio

from eventcore_trio import (
    RetriesExhausted,
    RetryPolicy,
    StateCache,
    Store,
    open_postgres_store,
)
from eventcore_trio.demo import random_transfer

ROOT = Path(__file__).parent.parent.parent


async def transfers(
    store: Store, accounts: list[str], seed: int, count: int, cache: StateCache | None
) -> dict[str, int]:
    """*count* random transfers between *accounts*; what became of them."""
    rng = random.Random(seed)
    report = {"done": 0, "refused": 0, "exhausted": 0, "retried": 0}
    policy = RetryPolicy(max_attempts=100, max_backoff=0.02)
    for _ in range(count):
        try:
            attempts = await random_transfer(
                store, accounts, rng, most=40, retry=policy, cache=cache
            )
        except RetriesExhausted:
            report["exhausted"] += 1
        else:
            if attempts is None:
                report["refused"] += 1
            else:
                report["done"] += 1
                report["retried"] += attempts - 1
    if cache is not None:
        report["events_folded"] = cache.stats.events_folded
    return report


async def run_in_process(
    dsn: str, schema: str, seed: int, count: int, accounts: list[str], *, cache: bool
) -> dict[str, int]:
    """`transfers` in a process of its own (with a cache of its own when *cache*)."""
    flag = ["--cache"] if cache else []
    completed = await trio.run_process(
        [
            sys.executable,
            "-m",
            "tests.commands.transfer_process",
            schema,
            str(seed),
            str(count),
            *flag,
            *accounts,
        ],
        capture_stdout=True,
        cwd=ROOT,
        env={**os.environ, "EVENTCORE_DSN": dsn},
    )
    report: dict[str, int] = json.loads(completed.stdout)
    return report


async def main(dsn: str, schema: str, seed: int, count: int, args: list[str]) -> None:
    cache = StateCache() if args[0] == "--cache" else None
    accounts = args[1:] if cache is not None else args
    async with open_postgres_store(dsn, schema=schema) as store:
        report = await transfers(store, accounts, seed, count, cache)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    dsn = os.environ["EVENTCORE_DSN"]
    trio.run(main, dsn, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
