"""An application that embeds a PostgreSQL store under a plain ``trio.run`` (as the README's
quickstart does), for the Ctrl-C test.

Usage: python embedding_process.py SCHEMA (the DSN in EVENTCORE_DSN)

Four tasks append and one reads, in a loop, until SIGINT; prints "ready" once the store is
open. The application passes nothing special to ``trio.run``: whatever frame the interrupt
lands in, the process must end by it, in order, with no crash, no hang and no server session
left.
"""

import faulthandler
import os
import signal
import sys

import trio

from eventcore_trio import NewEvent, open_postgres_store


async def main(dsn: str, schema: str) -> None:
    async with open_postgres_store(dsn, schema=schema, application_name=schema) as store:
        print("ready", flush=True)
        async with trio.open_nursery() as nursery:

            async def writer(k: int) -> None:
                n = 0
                while True:
                    await store.append(f"s-{k}", [NewEvent("E", {"n": n})])
                    n += 1

            async def reader() -> None:
                cursor = None
                while True:
                    page = await store.read_events(cursor, limit=100)
                    if page:
                        cursor = page[-1].position

            for k in range(4):
                nursery.start_soon(writer, k)
            nursery.start_soon(reader)


if __name__ == "__main__":
    # The test asks for a traceback of a process that does not end (SIGUSR1).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    trio.run(main, os.environ["EVENTCORE_DSN"], sys.argv[1])
