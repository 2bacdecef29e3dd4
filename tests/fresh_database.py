"""A database of its own on the test server, for tests that look at a whole database (every
schema in it), as a newcomer's would be: the tutorial's, and `run`'s hint about schemas."""

from __future__ import annotations

import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from eventcore_trio import open_postgres_store
from eventcore_trio.postgres import normalize_dsn


async def _admin(dsn: str, statement: str) -> None:
    # Any schema of the server's own database does; CREATE and DROP DATABASE run outside a
    # transaction, which admin.execute without arguments does.
    async with open_postgres_store(dsn, schema="admin") as store:
        await store.admin.execute(statement)


@contextmanager
def fresh_database(dsn: str, prefix: str) -> Iterator[str]:
    """Create a database named *prefix* and a random suffix on *dsn*'s server; yield its DSN
    (the same credentials); drop it on the way out, whoever is still connected."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    trio.run(_admin, dsn, f"CREATE DATABASE {name}")
    try:
        uri = urllib.parse.urlsplit(normalize_dsn(dsn))
        yield urllib.parse.urlunsplit(uri._replace(path=f"/{name}"))
    finally:
        trio.run(_admin, dsn, f"DROP DATABASE {name} WITH (FORCE)")
