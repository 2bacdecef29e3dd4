"""Fixtures for the PostgreSQL backend's own tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from eventcore_trio._tools._embedded import bundled_bindir
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.testing import EmbeddedPostgres, PostgresHarness


@pytest.fixture
def harness(postgres_dsn: str) -> PostgresHarness:
    """A fresh schema on the server under test."""
    return PostgresHarness(postgres_dsn)


@pytest.fixture
async def store(harness: PostgresHarness) -> AsyncIterator[PostgresStore]:
    """A store on a fresh schema."""
    async with harness.open_store() as store:
        yield store


@pytest.fixture
def own_server(postgres_server: EmbeddedPostgres | str) -> Iterator[EmbeddedPostgres]:
    """A durable server of the version under test that this test alone may stop and crash."""
    bindir = postgres_server.bindir if isinstance(postgres_server, EmbeddedPostgres) else None
    # Durable settings: a crash must not lose committed data, as it would with fsync off.
    server = EmbeddedPostgres(bindir or bundled_bindir())
    server.start()
    try:
        yield server
    finally:
        server.cleanup()
