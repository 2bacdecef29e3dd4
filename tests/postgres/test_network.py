"""Network failures between a client and PostgreSQL, made with a real TCP proxy.

`NetworkProxy` stands in for the network: a drop resets every connection (as a failed router
would), a stall stops all bytes until released (as a partition would). While a stall lasts
the server keeps the proxy's side of each connection open, as it keeps a partitioned client's
session until its TCP keepalives give up; the drop at the end plays that moment.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import asyncpg
import pytest
import trio

from eventcore_trio import LeadershipLost, LeadershipUnavailable, NewEvent, StoreConnectionError
from eventcore_trio.postgres import PostgresStore, open_postgres_store
from eventcore_trio.postgres._bridge import translate_error
from eventcore_trio.projection import ProjectionConfig, run_projections
from eventcore_trio.testing import EmbeddedPostgres, PostgresHarness, events, read_all
from eventcore_trio.torture import NetworkProxy
from eventcore_trio.torture._model import EVENT_TYPE, LedgerProjector, app_schema_sql

from ..conftest import oldest_server_param
from ..helpers import eventually, until_it_works


@pytest.fixture
async def proxy(postgres_dsn: str) -> AsyncIterator[NetworkProxy]:
    """A proxy in front of the server under test."""
    async with trio.open_nursery() as nursery:
        proxy = NetworkProxy(postgres_dsn)
        await nursery.start(proxy.serve)
        yield proxy
        nursery.cancel_scope.cancel()


async def test_a_dropped_network_ends_the_sessions_and_the_store_reconnects(
    harness: PostgresHarness, proxy: NetworkProxy
) -> None:
    async with (
        harness.open_store() as direct,
        open_postgres_store(proxy.dsn, schema=harness.schema, max_pool_size=1) as store,
    ):
        await store.append("s-1", events("A", "B", "C"))
        session = await store.admin.fetchval("SELECT pg_backend_pid()")
        assert proxy.drop() >= 1

        async def session_ended() -> bool:
            return not await direct.admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", session
            )

        await eventually(session_ended)
        await until_it_works(store.last_position)
        await store.append("s-1", events("D", "E"), expected_version=3)
        assert [e.stream_version for e in await store.read_stream("s-1")] == [1, 2, 3, 4, 5]


async def test_a_stalled_network_holds_new_connections_until_resumed(
    harness: PostgresHarness, proxy: NetworkProxy
) -> None:
    async with harness.open_store():
        pass
    proxy.stall()
    with pytest.raises(StoreConnectionError):
        async with open_postgres_store(proxy.dsn, schema=harness.schema, connect_timeout=0.5):
            pass
    proxy.resume()
    async with open_postgres_store(proxy.dsn, schema=harness.schema) as store:
        assert await store.last_position() is None


async def test_a_leader_cut_off_stops_and_a_standby_takes_over_when_the_server_frees_the_lock(
    harness: PostgresHarness, proxy: NetworkProxy
) -> None:
    async with (
        harness.open_store() as direct,
        open_postgres_store(proxy.dsn, schema=harness.schema, max_pool_size=2) as cut_off,
        cut_off.try_acquire("ledger") as leadership,
    ):
        async with leadership.open_batch() as batch:
            await batch.db.execute("SELECT 1")
        proxy.stall()
        # The leader notices on its own (its ping times out) and stops: nothing more can be
        # committed through it, whatever the server still thinks.
        with trio.fail_after(10):
            await leadership.wait_lost()
        with pytest.raises(LeadershipLost):
            async with leadership.open_batch():
                pass
        # The server still holds the lock for the partitioned session: no second leader.
        with pytest.raises(LeadershipUnavailable):
            async with direct.try_acquire("ledger"):
                pass
        # The partition ends as keepalives end it: the connection is reset. The server frees
        # the lock and a standby takes it.
        proxy.drop()
        with trio.fail_after(10):
            async with direct.wait_acquire("ledger") as standby:
                assert standby.is_held


async def test_a_host_behind_a_cut_network_resumes_without_losing_or_repeating(
    harness: PostgresHarness, proxy: NetworkProxy, caplog: pytest.LogCaptureFixture
) -> None:
    app = f"{harness.schema}_app"
    config = ProjectionConfig(poll_interval=0.1, restart_initial_backoff=0.05)
    async with harness.open_store() as direct:
        await direct.admin.execute(app_schema_sql(harness.schema, app))
        try:
            async with (
                open_postgres_store(proxy.dsn, schema=harness.schema, connect_timeout=1) as host,
                trio.open_nursery() as nursery,
            ):
                await nursery.start(run_projections, host, [LedgerProjector(app)], config)
                for round_ in range(3):
                    for n in range(5):
                        await direct.append(
                            f"acct-{n}", [_posted(1)] * 2 if round_ else [_posted(1)]
                        )
                    proxy.drop()
                # A longer cut: the leader gives up its lock, new connections time out, and
                # the host reports the database as away (a warning), not a projector failure.
                proxy.stall()

                async def reported_away() -> bool:
                    return any("cannot reach PostgreSQL" in r.message for r in caplog.records)

                await eventually(reported_away, within=30)
                proxy.drop()
                proxy.resume()
                await direct.append("acct-0", [_posted(1)])
                expected = len(await read_all(direct))

                async def all_applied() -> bool:
                    return bool(
                        await direct.admin.fetchval(f'SELECT count(*) FROM "{app}".applied')
                        == expected
                    )

                await eventually(all_applied, within=30)
                nursery.cancel_scope.cancel()
            applied = await direct.admin.fetchrow(
                f'SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM "{app}".applied'
            )
            assert applied is not None
            assert applied["n"] == applied["d"] == expected
            failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert not failures, [r.getMessage() for r in failures]
        finally:
            await direct.admin.execute(f'DROP SCHEMA "{app}" CASCADE')


def _posted(amount: int) -> NewEvent:
    return NewEvent(EVENT_TYPE, {"amount": amount})


async def test_a_pooled_connection_whose_session_is_killed_reads_as_closed(
    store: PostgresStore,
) -> None:
    # asyncpg hands a pooled connection back to its pool the moment its session ends, and
    # every call on it then raises; the bridge must answer "closed", not raise.
    async with store.admin.acquire() as connection:
        await connection.begin()
        await store.admin.execute("SELECT pg_terminate_backend($1)", connection.backend_pid)
        with trio.fail_after(10):
            while not connection.is_closed():  # noqa: ASYNC110
                await trio.sleep(0.01)
        await connection.rollback()  # does not raise on a session that is gone
        connection.terminate()


def test_a_session_ending_between_statements_is_a_connection_error() -> None:
    # asyncpg reports a statement sent after the server's FATAL message, but before the socket
    # closed, as an internal "another operation is in progress" error: it must reach callers
    # as the connection error it is.
    raw = asyncpg.exceptions.InternalClientError(
        "cannot switch to state 15; another operation (2) is in progress"
    )
    translated = translate_error(raw)
    assert isinstance(translated, StoreConnectionError)
    assert "did not run" in str(translated)


def _firewall() -> str | None:
    # iptables (the legacy backend, which works in this kernel without nftables) as root.
    if os.geteuid() != 0:
        return None
    return shutil.which("iptables-legacy") or shutil.which("iptables")


@contextmanager
def _blackhole(port: int) -> Iterator[None]:
    """Drop every TCP packet to and from *port* on loopback: a real, silent partition."""
    firewall = _firewall()
    assert firewall is not None
    rules = [
        ["INPUT", "-i", "lo", "-p", "tcp", side, str(port), "-j", "DROP"]
        for side in ("--dport", "--sport")
    ]
    for rule in rules:
        subprocess.run([firewall, "-I", *rule], check=True)
    try:
        yield
    finally:
        for rule in rules:
            subprocess.run([firewall, "-D", *rule], check=True)


# Keepalives, TCP_USER_TIMEOUT and the server's connection check behave alike on every
# supported version; at about 17 s, this runs on one server (the oldest under test).
@pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
async def test_silently_partitioned_leaders_give_up_and_the_server_frees_their_locks(
    own_server: EmbeddedPostgres,
) -> None:
    """A silent partition: one leader idle, another waiting on a long statement.

    Unlike a proxy, a firewall leaves keepalive probes unanswered on both sides. Each leader
    must give up on its own (the idle one by its ping; the other by client-side keepalives,
    since its ping then waits its turn), and the server must end both sessions, the busy one
    without waiting for its statement (``client_connection_check_interval``), so that
    standbys take over. With the kernel's defaults neither happens for minutes. The two
    leaders, each in a store of its own, are cut off by one partition: they wait out the
    same timers once.
    """
    if _firewall() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run as root with iptables installed (see .ci/run)")
        pytest.skip("needs root and iptables to make a silent partition")
    # The observer connects over the Unix socket, which the partition does not touch (with
    # the server's password, as over TCP).
    server = urllib.parse.urlsplit(own_server.dsn)
    observer_dsn = urllib.parse.urlunsplit(
        server._replace(
            netloc=server.netloc.rpartition("@")[0] + "@",
            query=f"host={own_server.socket_dir}&port={own_server.port}",
        )
    )
    async with (
        open_postgres_store(own_server.dsn, connect_timeout=2) as idle_store,
        open_postgres_store(own_server.dsn, connect_timeout=2) as busy_store,
        open_postgres_store(observer_dsn) as observer,
        idle_store.try_acquire("idle") as idle,
        busy_store.try_acquire("busy") as busy,
        trio.open_nursery() as nursery,
    ):
        outcome: list[BaseException] = []

        async def long_batch() -> None:
            try:
                async with busy.open_batch() as batch:
                    await batch.db.execute("SELECT pg_sleep(120)")
            except LeadershipLost as exc:
                outcome.append(exc)

        async def sleeping() -> bool:
            return bool(
                await observer.admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE pid = $1 AND wait_event = 'PgSleep'",
                    busy.backend_pid,
                )
            )

        async def standby_took_over(name: str) -> bool:
            try:
                async with observer.try_acquire(name):
                    return True
            except LeadershipUnavailable:
                return False

        nursery.start_soon(long_batch)
        await eventually(sleeping)
        with _blackhole(own_server.port):
            # Both bounds are keepalive-sized (about 15 s); far below the minutes that the
            # kernel's defaults, or the statement's 120 s, would take.
            given_up_by = trio.current_time() + 45
            for moment, leadership in (("idle", idle), ("mid-statement", busy)):
                with trio.move_on_at(given_up_by):
                    await leadership.wait_lost()
                assert not leadership.is_held, f"the {moment} leader never gave up"
            await eventually(lambda: standby_took_over("idle"), within=45)
            await eventually(lambda: standby_took_over("busy"), within=45)
        assert len(outcome) == 1, "the busy leader's batch did not end in LeadershipLost"
