"""The backend contract suite, run against PostgreSQL (every server version under test)."""

import pytest

from eventcore_trio.testing import BackendHarness, PostgresHarness, StoreContract


class TestPostgresStore(StoreContract):
    """Every contract of the four protocols holds for `open_postgres_store`."""

    @pytest.fixture
    def harness(self, postgres_dsn: str) -> BackendHarness:
        """A fresh schema on the server under test."""
        return PostgresHarness(postgres_dsn)
