"""Appends as fast as it can until Ctrl-C, for the test that interrupts it.

Usage: python busy_process.py SCHEMA (the DSN in EVENTCORE_DSN). Prints "busy" once appends
are flowing, and "interrupted" (exit 130) when KeyboardInterrupt comes out of the run.
"""

import os
import sys

import trio

from eventcore_trio import NewEvent, open_postgres_store
from eventcore_trio._tools._processes import run_program


async def main(dsn: str, schema: str) -> None:
    async with open_postgres_store(dsn, schema=schema) as store, trio.open_nursery() as nursery:

        async def append_forever(stream: str) -> None:
            while True:
                await store.append(stream, [NewEvent("Tick", {})])

        for n in range(4):
            nursery.start_soon(append_forever, f"s-{n}")
        await store.append("started", [NewEvent("Tick", {})])
        print("busy", flush=True)


if __name__ == "__main__":
    try:
        run_program(main, os.environ["EVENTCORE_DSN"], sys.argv[1])
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
