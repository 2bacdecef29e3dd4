"""Fixtures for the PostgreSQL backend's own tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from eventcore_trio.postgres import PostgresStore
from eventcore_trio.testing import PostgresHarness


@pytest.fixture
def harness(postgres_dsn: str) -> PostgresHarness:
    """A fresh schema on the server under test."""
    return PostgresHarness(postgres_dsn)


@pytest.fixture
async def store(harness: PostgresHarness) -> AsyncIterator[PostgresStore]:
    """A store on a fresh schema."""
    async with harness.open_store() as store:
        yield store
