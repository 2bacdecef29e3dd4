"""`live_hosts` on PostgreSQL: a host counts while the server holds its membership lock's
session, so a host whose session is ended from outside (a crash, a lost network, an
operator) drops out without a heartbeat timeout; the contract suite covers the rest."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from eventcore_trio.postgres import PostgresStore
from eventcore_trio.testing import PostgresHarness

from ..helpers import eventually


@pytest.fixture
async def store(postgres_dsn: str) -> AsyncIterator[PostgresStore]:
    async with PostgresHarness(postgres_dsn).open_store() as store:
        assert isinstance(store, PostgresStore)
        yield store


async def test_a_host_whose_session_ended_is_not_listed(store: PostgresStore) -> None:
    """Terminating a host's membership session drops it from `live_hosts` while its row is
    still in the table (an operator's read deletes nothing); the other host stays."""
    hosts_table = f'"{store.schema}".hosts'
    async with store.register_host() as staying, store.register_host() as killed:
        assert {h.host_id for h in await store.live_hosts()} == {staying.host_id, killed.host_id}
        session = await store.admin.fetchval(
            f"SELECT backend_pid FROM {hosts_table} WHERE host_id = $1", killed.host_id
        )
        assert await store.admin.fetchval("SELECT pg_terminate_backend($1)", session)

        async def gone() -> bool:
            return [h.host_id for h in await store.live_hosts()] == [staying.host_id]

        await eventually(gone)
        assert await store.admin.fetchval(
            f"SELECT count(*) FROM {hosts_table} WHERE host_id = $1", killed.host_id
        )
