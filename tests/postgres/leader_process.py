"""A leader in its own process, for tests that kill it: acquire, report, then wait forever.

Usage: python leader_process.py SCHEMA NAME (the DSN in EVENTCORE_DSN)
"""

import os
import sys

import trio

from eventcore_trio import open_postgres_store


async def main(dsn: str, schema: str, name: str) -> None:
    async with open_postgres_store(dsn, schema=schema) as store, store.try_acquire(name) as lead:
        print(f"acquired {lead.backend_pid}", flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, os.environ["EVENTCORE_DSN"], sys.argv[1], sys.argv[2])
