"""PostgreSQL-specific behaviour of the event store: visibility, schema, errors, NOTIFY."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trio
import trio_asyncio

from eventcore_trio import (
    AuthenticationFailed,
    ClusterMismatch,
    ConfigurationError,
    DatabaseError,
    DatabaseNotFound,
    EventFilter,
    NewEvent,
    RecordedEvent,
    SchemaVersionError,
    StoreClosed,
    StoreConnectionError,
    StreamAppend,
    UnsupportedPooling,
    open_postgres_store,
)
from eventcore_trio.postgres import LATEST_SCHEMA_VERSION, PostgresStore, _bridge
from eventcore_trio.postgres._bridge import translate_error
from eventcore_trio.postgres._reads import ReadQueries, read_page
from eventcore_trio.testing import PostgresHarness, events, follow_until, read_all

from ..conftest import oldest_server_param
from ..helpers import eventually


class _Rollback(Exception):
    pass


class TestGapFreeReads:
    """read_events never skips a committed event, whatever the commit order."""

    async def test_random_commit_delays_and_rollbacks_never_skip(
        self, store: PostgresStore, postgres_dsn: str
    ) -> None:
        """Writers that commit late or roll back at random never make a polling reader skip,
        half of them holding a transaction id before they append, with an unrelated
        transaction open all along."""
        rng = random.Random(20261127)
        writers, appends_per_writer = 6, 30
        committed: set[uuid.UUID] = set()
        rolled_back: set[uuid.UUID] = set()
        seen: list[RecordedEvent] = []
        writers_done = trio.Event()

        async def writer(w: int) -> None:
            connection = await _bridge.connect(
                postgres_dsn, application_name="late-writer", connect_timeout=10
            )
            try:
                for n in range(appends_per_writer):
                    ids = [uuid.uuid4() for _ in range(rng.randint(1, 3))]
                    rollback = rng.random() < 0.2
                    try:
                        async with connection.transaction():
                            if w % 2:
                                # An id before the append (rows of its own first): the
                                # late-announcer path of the read horizon.
                                await connection.execute("SELECT pg_current_xact_id()")
                            sql, args = store.admin.append_statement(
                                [
                                    StreamAppend(
                                        f"w{w}",
                                        [NewEvent("E", {"n": n}, event_id=i) for i in ids],
                                    )
                                ]
                            )
                            await connection.fetchrow(sql, *args)
                            # The position is drawn; hold the commit back a while.
                            await trio.sleep(rng.random() * 0.02)
                            if rollback:
                                raise _Rollback
                    except _Rollback:
                        rolled_back.update(ids)
                    else:
                        committed.update(ids)
            finally:
                await connection.close()

        async with (
            store.admin.connection("unrelated") as unrelated,
            unrelated.transaction(),
        ):
            # A transaction with an id, open throughout, that writes no events: readers do
            # not wait for it (the read horizon), and nothing is skipped past it either.
            await unrelated.execute("SELECT pg_current_xact_id()")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(follow_until, store, writers_done, seen, limit=5))
                async with trio.open_nursery() as writing:
                    for w in range(writers):
                        writing.start_soon(writer, w)
                writers_done.set()

        seen_ids = [e.event_id for e in seen]
        assert len(seen_ids) == len(set(seen_ids)), "an event was read twice"
        assert set(seen_ids) == committed, "a committed event was skipped"
        assert not set(seen_ids) & rolled_back
        assert [e.position for e in seen] == sorted(e.position for e in seen)
        assert rolled_back, "the scenario should include rollbacks"

    async def test_open_transaction_holds_readers_back(
        self, store: PostgresStore, harness: PostgresHarness
    ) -> None:
        """Events committed after an open append are invisible until that append ends."""
        await store.append("a", events("Before"))
        async with harness.hold_commit(store, "late", events("Late")):
            await store.append("b", events("After"))
            assert [e.type for e in await read_all(store)] == ["Before"]
        assert [e.type for e in await read_all(store)] == ["Before", "Late", "After"]

    async def test_a_transaction_that_ends_between_the_read_and_the_horizon(
        self, store: PostgresStore
    ) -> None:
        """An unrelated transaction with an id, open when the page statement takes its
        snapshot (so a committed event lies above that xmin) and ended before the horizon
        statement (which then finds nothing held back): the page must still hold the
        event. Before, it came back empty, and a projection woken by the event's
        notification waited for its next poll (the flaky wake test on a shared server)."""
        await store.append("a", events("Before"))
        before = await store.last_position()
        async with store.admin.connection("unrelated") as unrelated:
            await unrelated.execute("BEGIN")
            await unrelated.execute("SELECT pg_current_xact_id()")
            await store.append("b", events("Committed"))
            pool = store._pool
            statements: list[str] = []

            class EndsAfterTheFirstRead:
                async def fetch(self, sql: str, *args: object) -> list[Any]:
                    rows = await pool.fetch(sql, *args)
                    statements.append(sql)
                    if len(statements) == 1:
                        await unrelated.execute("COMMIT")
                    return rows

                async def fetchrow(self, sql: str, *args: object) -> Any:
                    statements.append(sql)
                    return await pool.fetchrow(sql, *args)

            rows = await read_page(
                EndsAfterTheFirstRead(),  # type: ignore[arg-type]
                ReadQueries(store.schema),
                before,
                10,
                None,
            )
        assert len(statements) == 3  # the page, the horizon, the page on to it
        assert [row["type"] for row in rows] == ["Committed"]

    async def test_a_caught_up_read_pays_no_third_statement(self, store: PostgresStore) -> None:
        """A reader whose cursor is the newest event, with nothing held back: the empty
        page and the horizon statement, and no read on to the horizon (an idle poll)."""
        await store.append("a", events("Only"))
        newest = await store.last_position()
        pool = store._pool
        statements: list[str] = []

        class Counted:
            async def fetch(self, sql: str, *args: object) -> list[Any]:
                statements.append(sql)
                return await pool.fetch(sql, *args)

            async def fetchrow(self, sql: str, *args: object) -> Any:
                statements.append(sql)
                return await pool.fetchrow(sql, *args)

        async with store.admin.connection("unrelated") as unrelated:
            # An open transaction with an id: the page statement must ask for the horizon.
            await unrelated.execute("BEGIN")
            await unrelated.execute("SELECT pg_current_xact_id()")
            rows = await read_page(Counted(), ReadQueries(store.schema), newest, 10, None)  # type: ignore[arg-type]
            await unrelated.execute("ROLLBACK")
        assert rows == []
        assert len(statements) == 2


class TestPerStreamOrder:
    """In the global order, each stream's events come in version order."""

    async def test_an_append_that_waits_for_a_stream_gets_a_later_position(
        self, store: PostgresStore
    ) -> None:
        """W1 appends to A, M and S, and waits for M (held by W0) after it has locked A;
        meanwhile W2 appends to S. W1's event of S has the higher version, so it must come
        later in read_events too, although W1 began writing first."""
        for stream in ("a-stream", "m-stream", "s-stream"):
            await store.append(stream, events("Opened"))
        sql, args = store.admin.append_statement([StreamAppend("m-stream", events("Held"))])
        async with store.admin.connection("holder of m") as holder, trio.open_nursery() as n:
            await holder.begin()
            await holder.fetchrow(sql, *args)  # W0 holds m-stream
            done = trio.Event()

            async def w1() -> None:
                await store.append_atomic(
                    [StreamAppend(s, events("W1")) for s in ("a-stream", "m-stream", "s-stream")]
                )
                done.set()

            n.start_soon(w1)
            await eventually(lambda: _waits_for_a_lock(store))
            await store.append("s-stream", events("W2"))  # s-stream is free: W2 goes first
            await holder.commit()
            with trio.fail_after(10):
                await done.wait()
        assert [e.type for e in await store.read_stream("s-stream")] == ["Opened", "W2", "W1"]
        in_order = [e for e in await read_all(store) if e.stream_id == "s-stream"]
        assert [e.stream_version for e in in_order] == [1, 2, 3], "versions out of order"


async def _waits_for_a_lock(store: PostgresStore) -> bool:
    waiting = await store.admin.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted")
    return bool(waiting)


class TestAppend:
    """Appends on PostgreSQL."""

    async def test_crossing_multi_stream_appends_do_not_deadlock(
        self, store: PostgresStore
    ) -> None:
        """Concurrent atomic appends over the same streams in any order all succeed."""
        streams = [f"acc-{n}" for n in range(4)]

        async def transfer(n: int) -> None:
            rng = random.Random(n)
            for _ in range(10):
                chosen = rng.sample(streams, 3)
                await store.append_atomic([StreamAppend(s, events("T")) for s in chosen])

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for n in range(8):
                    nursery.start_soon(transfer, n)
        total = 0
        for stream in streams:
            total += len(await store.read_stream(stream))
        assert total == 8 * 10 * 3

    async def test_events_are_immutable(self, store: PostgresStore) -> None:
        """The database refuses UPDATE, DELETE and TRUNCATE on the events table."""
        await store.append("s", events("A"))
        for statement in (
            f"UPDATE \"{store.schema}\".events SET type = 'B'",
            f'DELETE FROM "{store.schema}".events',
            f'TRUNCATE "{store.schema}".events',
        ):
            with pytest.raises(DatabaseError, match="immutable"):
                await store.admin.execute(statement)
        assert [e.type for e in await read_all(store)] == ["A"]

    async def test_notify_on_commit_only(self, store: PostgresStore, postgres_dsn: str) -> None:
        """A committed append notifies listeners; a rolled-back one does not."""
        listener = await _bridge.connect(
            postgres_dsn, application_name="listener", connect_timeout=10
        )
        try:
            async with listener.listen(store.notify_channel) as notifications:
                writer = await _bridge.connect(
                    postgres_dsn, application_name="writer", connect_timeout=10
                )

                async def rolled_back_append() -> None:
                    async with writer.transaction():
                        sql, args = store.admin.append_statement([StreamAppend("s", events("E"))])
                        await writer.fetchrow(sql, *args)
                        raise _Rollback

                try:
                    with pytest.raises(_Rollback):
                        await rolled_back_append()
                finally:
                    await writer.close()
                await store.append("s", events("E"))
                with trio.fail_after(5):
                    await notifications.receive()
                # Only the committed append notified: nothing else is queued.
                await store.append("t", events("E"))
                with trio.fail_after(5):
                    await notifications.receive()
                with pytest.raises(trio.WouldBlock):
                    notifications.receive_nowait()
        finally:
            await listener.close()

    async def test_a_store_closing_right_after_asking_for_a_notification_still_sends_it(
        self, harness: PostgresHarness, postgres_dsn: str
    ) -> None:
        """notify_appended() sends from a background task; closing the store sends a
        pending notification instead of dropping it with the task."""
        async with _bridge.asyncio_loop():
            listener = await _bridge.connect(
                postgres_dsn, application_name="listener", connect_timeout=10
            )
            try:
                async with harness.open_store() as store:
                    channel = store.notify_channel
                async with listener.listen(channel) as notifications:
                    async with harness.open_store() as store:
                        store.admin.notify_appended()
                    with trio.fail_after(5):
                        await notifications.receive()
            finally:
                await listener.close()

    async def test_appends_committed_by_hand_notify_when_asked(
        self, store: PostgresStore, postgres_dsn: str
    ) -> None:
        """An append made with admin.append_statement wakes readers on notify_appended()."""
        listener = await _bridge.connect(
            postgres_dsn, application_name="listener", connect_timeout=10
        )
        try:
            async with listener.listen(store.notify_channel) as notifications:
                sql, args = store.admin.append_statement([StreamAppend("s", events("E"))])
                async with store.admin.acquire() as connection, connection.transaction():
                    await connection.fetchrow(sql, *args)
                with pytest.raises(trio.WouldBlock):
                    notifications.receive_nowait()
                store.admin.notify_appended()
                with trio.fail_after(5):
                    await notifications.receive()
        finally:
            await listener.close()

    async def test_large_append_is_one_statement(self, store: PostgresStore) -> None:
        """A thousand events append in one call and read back in order."""
        batch = [NewEvent("E", {"n": n}) for n in range(1000)]
        result = await store.append("big", batch, expected_version=0)
        assert result.stream_versions == {"big": 1000}
        stream = await store.read_stream("big")
        assert [e.data["n"] for e in stream] == list(range(1000))


class TestIndexes:
    """read_events with each filter is served by an index."""

    @pytest.mark.parametrize(
        "event_filter",
        [
            None,
            EventFilter(event_types=["T3"]),
            EventFilter(stream_prefix="s-1"),
            EventFilter(stream_pattern="s-1*"),
        ],
        ids=["none", "types", "prefix", "pattern"],
    )
    async def test_read_plans_use_an_index(
        self, store: PostgresStore, event_filter: EventFilter | None
    ) -> None:
        """EXPLAIN of the read query shows an index scan, not a sequential scan."""
        for n in range(20):
            await store.append_atomic(
                [StreamAppend(f"s-{n}-{k}", events(*[f"T{k}"] * 50)) for k in range(10)]
            )
        await store.admin.execute(f'ANALYZE "{store.schema}".events')
        # The very statement read_events sends (built by the store's read path), explained.
        sql, args = ReadQueries(store.schema).read_events(None, 100, event_filter)
        plan = "\n".join(r["QUERY PLAN"] for r in await store.admin.fetch("EXPLAIN " + sql, *args))
        assert len(await store.read_events(None, limit=100, filter=event_filter)) > 0
        assert "Index" in plan, plan
        assert "Seq Scan" not in plan, plan


class TestOpening:
    """open_postgres_store: options, errors, migrations."""

    async def test_inside_an_existing_trio_asyncio_loop(self, postgres_dsn: str) -> None:
        """An application that already runs trio_asyncio.open_loop() can open a store."""
        async with (
            trio_asyncio.open_loop(),
            open_postgres_store(postgres_dsn, schema=f"t_{uuid.uuid4().hex[:12]}") as store,
        ):
            await store.append("s", events("A"))
            assert len(await store.read_stream("s")) == 1

    async def test_concurrent_migrations(self, postgres_dsn: str) -> None:
        """Several stores migrating one fresh schema at once all succeed, once."""
        schema = f"t_{uuid.uuid4().hex[:12]}"
        opened = 0

        async def open_one() -> None:
            nonlocal opened
            async with open_postgres_store(postgres_dsn, schema=schema, max_pool_size=1):
                opened += 1

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(open_one)
        assert opened == 6
        async with open_postgres_store(postgres_dsn, schema=schema) as store:
            versions = await store.admin.fetch(
                f'SELECT version FROM "{schema}".schema_migrations ORDER BY version'
            )
        assert [r["version"] for r in versions] == list(range(1, LATEST_SCHEMA_VERSION + 1))

    async def test_migrate_false_refuses_missing_schema(self, postgres_dsn: str) -> None:
        """Without migrate, a missing schema raises SchemaVersionError saying what to run."""
        with pytest.raises(SchemaVersionError, match="eventcore-trio migrate"):
            async with open_postgres_store(
                postgres_dsn, schema=f"t_{uuid.uuid4().hex[:12]}", migrate=False
            ):
                pytest.fail("opened a store without a schema")

    async def test_migrate_false_accepts_current_schema(self, harness: PostgresHarness) -> None:
        """Without migrate, a current schema opens normally."""
        async with harness.open_store():
            pass
        async with open_postgres_store(harness.dsn, schema=harness.schema, migrate=False) as s:
            assert await s.read_events(None, limit=1) == []

    async def test_newer_schema_is_refused(self, harness: PostgresHarness) -> None:
        """A schema written by a newer library version is refused, and left untouched."""
        async with harness.open_store() as store:
            await store.append("s", events("A"))
            await store.admin.execute(
                f"INSERT INTO \"{store.schema}\".schema_migrations VALUES (999, '9.9')"
            )
        for migrate in (True, False):
            with pytest.raises(SchemaVersionError, match="newer"):
                async with open_postgres_store(harness.dsn, schema=harness.schema, migrate=migrate):
                    pytest.fail("opened a newer schema")
        async with _bridge.asyncio_loop():
            connection = await _bridge.connect(
                harness.dsn, application_name="check", connect_timeout=10
            )
            try:
                count = await connection.fetchval(f'SELECT count(*) FROM "{harness.schema}".events')
                newest = await connection.fetchval(
                    f'SELECT max(version) FROM "{harness.schema}".schema_migrations'
                )
            finally:
                await connection.close()
        assert (count, newest) == (1, 999)

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"schema": "Bad-Schema"}, "schema"),
            ({"schema": 'x"; DROP TABLE y; --'}, "schema"),
            ({"schema": "pg_app"}, "reserves for system schemas"),
            ({"min_pool_size": 0}, "min_pool_size"),
            ({"max_pool_size": "2"}, "max_pool_size"),
            ({"min_pool_size": 5, "max_pool_size": 2}, "must not exceed"),
            ({"connect_timeout": 0}, "connect_timeout"),
            ({"connect_timeout": float("nan")}, "connect_timeout"),
            ({"connect_timeout": float("inf")}, "connect_timeout"),
            ({"statement_cache_size": -1}, "statement_cache_size"),
            ({"application_name": "app\x00name"}, "application_name"),
            ({"session_dsn": "mysql://x"}, "session_dsn"),
        ],
    )
    async def test_invalid_options(
        self, postgres_dsn: str, kwargs: dict[str, object], message: str
    ) -> None:
        """Invalid options raise ConfigurationError naming the option."""
        with pytest.raises(ConfigurationError, match=message):
            async with open_postgres_store(postgres_dsn, **kwargs):  # type: ignore[arg-type]
                pytest.fail("opened with an invalid option")

    @pytest.mark.parametrize(
        ("dsn", "message"),
        [
            (
                "postgresql://postgres@127.0.0.1:notaport/postgres",
                "a port after the host's colon that is not a number",
            ),
            ("host=127.0.0.1 port=notaport", "port='notaport'"),
            ("postgresql://postgres@127.0.0.1:5432/post\x00gres", "NUL"),
            ("host=127.0.0.1 dbname='unterminated", "keyword string"),
            ("mysql://root@localhost/db", "scheme 'mysql'"),
            ("", "empty"),
            ("postgresql://postgres@127.0.0.1/postgres?connect_timeout=5", "connect_timeout="),
            ("host=127.0.0.1 keepalives_idle=5", "keepalives_idle="),
        ],
    )
    async def test_malformed_dsn(self, dsn: str, message: str) -> None:
        """A malformed DSN is a ConfigurationError naming the problem, before any I/O."""
        with pytest.raises(ConfigurationError, match=message):
            async with open_postgres_store(dsn):
                pytest.fail("opened with a malformed DSN")

    @pytest.mark.parametrize(
        ("parameter", "message"),
        [
            ("no_such_setting=1", 'unrecognized configuration parameter "no_such_setting"'),
            ("statement_timeout=soon", 'invalid value for parameter "statement_timeout"'),
        ],
    )
    async def test_a_dsn_setting_the_server_refuses(
        self, postgres_dsn: str, parameter: str, message: str
    ) -> None:
        """A query parameter that the server refuses as a setting is a ConfigurationError
        naming it (it was a DatabaseError); a DatabaseError of the block stays one."""
        dsn = postgres_dsn + ("&" if "?" in postgres_dsn else "?") + parameter
        with pytest.raises(ConfigurationError, match=message):
            async with open_postgres_store(dsn):
                pytest.fail("opened with a setting the server refuses")
        with pytest.raises(DatabaseError) as raised:
            async with open_postgres_store(postgres_dsn) as store:
                await store.admin.execute("SET no_such_setting = 1")
        assert not isinstance(raised.value, ConfigurationError)

    async def test_libpq_keyword_dsn(self, postgres_dsn: str) -> None:
        """A libpq keyword string (as psql takes) works like the equivalent URI."""
        parts = urllib.parse.urlsplit(postgres_dsn)
        keywords = (
            f"host={parts.hostname} port={parts.port} dbname='{parts.path.lstrip('/')}' "
            f"user={parts.username} application_name='it\\'s'"
        )
        if parts.password:
            keywords += f" password='{urllib.parse.unquote(parts.password)}'"
        async with open_postgres_store(keywords, schema=f"t_{uuid.uuid4().hex[:12]}") as store:
            await store.append("s", events("A"))
            async with store.try_acquire("p") as leadership:
                assert leadership.is_held

    async def test_no_dsn(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without a DSN or EVENTCORE_DSN, the error says how to give one."""
        monkeypatch.delenv("EVENTCORE_DSN", raising=False)
        with pytest.raises(ConfigurationError, match="EVENTCORE_DSN"):
            async with open_postgres_store():
                pytest.fail("opened without a DSN")

    async def test_dsn_from_environment(
        self, monkeypatch: pytest.MonkeyPatch, postgres_dsn: str
    ) -> None:
        """EVENTCORE_DSN is used when no DSN is passed."""
        monkeypatch.setenv("EVENTCORE_DSN", postgres_dsn)
        async with open_postgres_store(schema=f"t_{uuid.uuid4().hex[:12]}") as store:
            assert await store.read_events(None, limit=1) == []

    async def test_unreachable_server(self) -> None:
        """A server that is not listening raises StoreConnectionError."""
        with trio.socket.socket() as sock:
            await sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with pytest.raises(StoreConnectionError, match="reachable"):
            async with open_postgres_store(f"postgresql://postgres@127.0.0.1:{port}/postgres"):
                pytest.fail("connected to nothing")

    async def test_unknown_role(self, postgres_dsn: str) -> None:
        """A role the server does not know raises AuthenticationFailed."""
        parts = urllib.parse.urlsplit(postgres_dsn)
        # Keep the password (the embedded server's): the role, not the password, is unknown.
        password = f":{parts.password}" if parts.password else ""
        host = parts.netloc.rpartition("@")[2]
        dsn = urllib.parse.urlunsplit(parts._replace(netloc=f"no_such_role{password}@{host}"))
        with pytest.raises(AuthenticationFailed, match="DSN"):
            async with open_postgres_store(dsn):
                pytest.fail("connected as an unknown role")

    async def test_missing_database(self, postgres_dsn: str) -> None:
        """A database that does not exist raises DatabaseNotFound."""
        dsn = postgres_dsn.rsplit("/", 1)[0] + "/no_such_database"
        with pytest.raises(DatabaseNotFound, match="createdb"):
            async with open_postgres_store(dsn):
                pytest.fail("connected to a missing database")

    async def test_closed_store_refuses_calls(self, harness: PostgresHarness) -> None:
        """A store used after its block raises StoreClosed."""
        async with harness.open_store() as store:
            pass
        with pytest.raises(StoreClosed):
            await store.read_events(None, limit=1)


class TestCallsInFlightWhenTheStoreCloses:
    """No crossing into asyncio outlives the store's loop: calls still in flight in tasks
    that outlive the store (started from inside its block into an outer nursery, so they
    inherited its loop) are cancelled before the loop closes, and end with StoreClosed."""

    async def test_a_statement_in_flight_in_an_outer_task(self, harness: PostgresHarness) -> None:
        """A held connection runs a 3 s statement under a deadline that expires after the
        store has closed: the task gets StoreClosed at the close, and the deadline firing
        later is harmless (before: TrioInternalError, "Event loop is closed")."""
        outcome: list[BaseException] = []
        running = trio.Event()

        async def slow(store: PostgresStore) -> None:
            with trio.move_on_after(1.5):
                try:
                    async with store.admin.connection("slow") as connection:
                        running.set()
                        await connection.fetchval("SELECT pg_sleep(3)")
                except StoreClosed as exc:
                    outcome.append(exc)
                # The deadline is still ahead: wait for it, past the store's close.
                await trio.sleep_forever()

        async with trio.open_nursery() as outer, harness.open_store() as store:
            outer.start_soon(slow, store)
            await running.wait()

            async def sleeping() -> bool:
                return bool(
                    await store.admin.fetchval(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE application_name = 'slow' AND query LIKE '%pg_sleep%'"
                    )
                )

            await eventually(sleeping)
        assert len(outcome) == 1
        assert "in flight" in str(outcome[0])

    async def test_a_call_after_the_loop_closed_is_refused(self, harness: PostgresHarness) -> None:
        """A connection kept past its store's block refuses calls with StoreClosed."""
        async with harness.open_store() as store, store.admin.acquire() as connection:
            pass
        with pytest.raises(StoreClosed):
            await connection.fetchval("SELECT 1")


class TestAsyncioErrors:
    """Errors that asyncio reports with nobody awaiting them do not bring the store down."""

    async def test_orphan_asyncio_error_is_logged_not_raised(
        self, harness: PostgresHarness, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An unretrieved asyncio exception (as a cancelled connect leaves) is only logged."""
        caplog.set_level("DEBUG", logger="eventcore_trio.postgres")
        # Bounded: without the handler, the loop's crash leaves the store hanging.
        with trio.fail_after(20):
            await self._provoke(harness)
        assert any("no caller awaited" in r.getMessage() for r in caplog.records)

    @staticmethod
    async def _provoke(harness: PostgresHarness) -> None:
        async with harness.open_store() as store:
            loop = trio_asyncio.current_loop.get()
            loop.call_exception_handler(
                {"message": "Future exception was never retrieved", "exception": OSError("x")}
            )
            await store.append("s", events("StillWorks"))
            assert [e.type for e in await store.read_stream("s")] == ["StillWorks"]


class TestClusterIdentity:
    """A checkpoint from another cluster is refused, never silently reused."""

    async def test_checkpoint_from_another_cluster(self, store: PostgresStore) -> None:
        """After a restore onto another cluster, load_checkpoint raises ClusterMismatch."""
        position = (await store.append("s", events("A"))).position
        assert position is not None
        await store.save_checkpoint("p", position)
        assert await store.load_checkpoint("p") == position
        await store.admin.execute(
            f'UPDATE "{store.schema}".subscriptions SET system_identifier = $1',
            "1234567890",
        )
        with pytest.raises(ClusterMismatch, match="Reset the projection"):
            await store.load_checkpoint("p")


class TestErrorTranslation:
    """Driver errors that a pooler or a server timeout causes get their own, actionable type."""

    @pytest.mark.parametrize(
        "raw",
        [
            asyncpg.exceptions.DuplicatePreparedStatementError(
                'prepared statement "__asyncpg_stmt_1__" already exists'
            ),
            asyncpg.exceptions.InvalidSQLStatementNameError(
                'prepared statement "__asyncpg_stmt_5__" does not exist'
            ),
        ],
    )
    def test_lost_prepared_statements_point_at_transaction_pooling(self, raw: Exception) -> None:
        """42P05 and 26000 on asyncpg's own statements say: statement_cache_size=0."""
        translated = translate_error(raw)
        assert isinstance(translated, UnsupportedPooling)
        assert "statement_cache_size=0" in str(translated)

    def test_a_refused_startup_parameter_is_a_configuration_error(self) -> None:
        """08P01 "unsupported startup parameter" is configuration, not "retry later"."""
        raw = asyncpg.exceptions.ProtocolViolationError(
            "unsupported startup parameter: tcp_keepalives_idle"
        )
        translated = translate_error(raw)
        assert isinstance(translated, ConfigurationError)
        assert not isinstance(translated, StoreConnectionError)
        assert "ignore_startup_parameters" in str(translated)

    def test_a_cancelled_statement_is_not_a_lost_connection(self) -> None:
        """57014 is a DatabaseError on a live session; 57P01 (shutdown) is a lost connection."""
        cancelled = translate_error(asyncpg.exceptions.QueryCanceledError("canceling statement"))
        assert isinstance(cancelled, DatabaseError)
        assert cancelled.sqlstate == "57014"
        shutdown = translate_error(asyncpg.exceptions.AdminShutdownError("terminating"))
        assert isinstance(shutdown, StoreConnectionError)


EMBEDDING = Path(__file__).parent / "embedding_process.py"


class TestCtrlC:
    """Ctrl-C never crashes an application that embeds a store, whatever ``trio.run`` is
    given: SIGINT may land in any frame, asyncpg's protocol callbacks included."""

    RUNS = 30
    AT_ONCE = 6

    @pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
    async def test_sigint_at_random_moments_under_load(self, postgres_dsn: str) -> None:
        """Thirty embeddings under load (six at a time), each interrupted at a random
        moment: every one ends by the interrupt (KeyboardInterrupt out of trio.run), none
        crashes or hangs, and none leaves a server session behind. Before the asyncio
        callbacks were KI-protected: 1 segfault and 1 hang in 10."""
        rng = random.Random()
        outcomes: list[tuple[int, str]] = []

        async def one(n: int) -> None:
            schema = f"ctrl_c_{n}"
            process = await trio.lowlevel.open_process(
                [sys.executable, str(EMBEDDING), schema],
                env={**os.environ, "EVENTCORE_DSN": postgres_dsn},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
            assert process.stdout is not None
            assert process.stderr is not None
            try:
                with trio.fail_after(60):
                    started = b""
                    while not started.endswith(b"ready\n"):
                        chunk = await process.stdout.receive_some()
                        assert chunk, "the embedding exited before it was ready"
                        started += chunk
                await trio.sleep(rng.uniform(0.2, 1.5))
                process.send_signal(signal.SIGINT)
                errors = b""
                with trio.move_on_after(20) as waiting:
                    async for chunk in process.stderr:
                        errors += chunk
                    await process.wait()
                if waiting.cancelled_caught:
                    # Where it is stuck: faulthandler's traceback on SIGUSR1.
                    process.send_signal(signal.SIGUSR1)
                    with trio.move_on_after(2):
                        async for chunk in process.stderr:
                            errors += chunk
                    outcomes.append((n, f"hang: {errors[-3000:].decode(errors='replace')}"))
                    return
                # Ended by the interrupt: KeyboardInterrupt left trio.run, and Python
                # exits by SIGINT (a shell shows 130); or, when the signal landed in the
                # application's own code in one of its tasks (Trio raises it wherever
                # unprotected code runs), in a group of nothing but KeyboardInterrupt.
                if process.returncode != -signal.SIGINT and not (
                    process.returncode == 1 and _only_interrupted(errors)
                ):
                    outcomes.append((n, f"exit {process.returncode}: {errors[-800:]!r}"))
            finally:
                process.kill()
                await process.wait()
                await process.stdout.aclose()
                await process.stderr.aclose()

        limit = trio.CapacityLimiter(self.AT_ONCE)

        async def limited(n: int) -> None:
            async with limit:
                await one(n)

        async with trio.open_nursery() as nursery:
            for n in range(self.RUNS):
                nursery.start_soon(limited, n)
        assert outcomes == []
        async with open_postgres_store(postgres_dsn, schema="ctrl_c_check") as store:

            async def sessions_left() -> int:
                return int(
                    await store.admin.fetchval(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE application_name LIKE 'ctrl\\_c\\_%' "
                        "AND application_name <> 'ctrl_c_check'"
                    )
                )

            # A session ends on the server a moment after its client's socket closes.
            await eventually(lambda: _none(sessions_left))


async def _none(count: Callable[[], Awaitable[int]]) -> bool:
    return await count() == 0


def _only_interrupted(stderr: bytes) -> bool:
    """Whether every exception a traceback on *stderr* names is KeyboardInterrupt (or a
    group of them)."""
    names = re.findall(
        r"^[ |+-]*([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Group)\w*)(?::|$)",
        stderr.decode(errors="replace"),
        re.MULTILINE,
    )
    return bool(names) and set(names) <= {
        "KeyboardInterrupt",
        "BaseExceptionGroup",
        "ExceptionGroup",
    }
