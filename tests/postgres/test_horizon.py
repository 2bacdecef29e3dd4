"""The read horizon waits for event writers only (docs/postgres.md, "The read horizon")."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from eventcore_trio import (
    DatabaseError,
    NewEvent,
    Position,
    ProjectionContext,
    ProjectionStatus,
    RecordedEvent,
    StreamAppend,
    open_postgres_store,
    projector,
    run_projection,
)
from eventcore_trio.postgres import PostgresStore, _bridge
from eventcore_trio.postgres._bridge import Connection
from eventcore_trio.postgres._dsn import normalize_dsn
from eventcore_trio.testing import EmbeddedPostgres, read_all

from ..helpers import eventually


@asynccontextmanager
async def open_transaction(
    store: PostgresStore, *, isolation: str = "READ COMMITTED"
) -> AsyncIterator[Connection]:
    """A transaction on a connection of its own that has written a row (so it holds an
    id), held open for the block and committed at its end."""
    async with store.admin.connection("unrelated writer") as connection:
        await connection.execute("CREATE TEMP TABLE IF NOT EXISTS scratch (n int)")
        async with connection.transaction():
            await connection.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
            await connection.execute("INSERT INTO scratch VALUES (1)")
            yield connection


async def append_in(connection: Connection, store: PostgresStore, stream: str, n: int) -> None:
    sql, args = store.admin.append_statement([StreamAppend(stream, [NewEvent("E", {"n": n})])])
    await connection.fetchrow(sql, *args)


async def numbers(store: PostgresStore) -> list[tuple[str, int]]:
    return [(e.stream_id, e.data["n"]) for e in await read_all(store)]


async def status_after_run(store: PostgresStore) -> list[ProjectionStatus]:
    """Run a projection over what it can read, then the store's status."""

    @projector("view")
    async def view(event: RecordedEvent, ctx: ProjectionContext) -> None:
        pass

    await run_projection(store, view)
    return await store.projection_status()


class TestUnrelatedTransactions:
    """Transactions that write no events do not hold readers back."""

    async def test_a_write_transaction_in_the_same_database(self, store: PostgresStore) -> None:
        """An open transaction with an id: events committed after it are read at once, and
        counted in no lag."""
        async with open_transaction(store):
            await store.append("s", [NewEvent("E", {"n": 1})])
            assert await numbers(store) == [("s", 1)]
            assert await store.last_position() is not None
            [status] = await status_after_run(store)
            assert status.lag_events == 0
            assert status.held_back_by is None

    async def test_a_write_transaction_in_another_database(
        self, store: PostgresStore, postgres_dsn: str
    ) -> None:
        """The same for a transaction in another database of the cluster."""
        name = f"other_{uuid.uuid4().hex[:8]}"
        await store.admin.execute(f"CREATE DATABASE {name}")
        try:
            uri = urllib.parse.urlsplit(normalize_dsn(postgres_dsn))
            other = urllib.parse.urlunsplit(uri._replace(path=f"/{name}"))
            connection = await _bridge.connect(
                other, application_name="other database", connect_timeout=10
            )
            try:
                async with connection.transaction():
                    assert await connection.fetchval("SELECT current_database()") == name
                    await connection.execute("CREATE TABLE t (n int); INSERT INTO t VALUES (1)")
                    await store.append("s", [NewEvent("E", {"n": 1})])
                    assert await numbers(store) == [("s", 1)]
            finally:
                await connection.close()
        finally:
            await store.admin.execute(f"DROP DATABASE {name}")


class TestWritersHoldReadersBack:
    """An open transaction that appends events holds back what commits after it, and its
    own events are read when it commits, never skipped."""

    async def test_an_open_append_holds_back_later_events(self, store: PostgresStore) -> None:
        """Events committed after an open append wait for it; then all come, in order."""
        async with store.admin.connection("held writer") as held, held.transaction():
            await append_in(held, store, "held", 1)
            await store.append("later", [NewEvent("E", {"n": 2})])
            assert await numbers(store) == []
            [status] = await status_after_run(store)
            assert status.lag_events == 1
            assert status.held_back_by is not None
            assert status.held_back_by.application_name == "held writer"
        assert await numbers(store) == [("held", 1), ("later", 2)]

    async def test_a_writer_that_had_its_id_before_appending(self, store: PostgresStore) -> None:
        """A transaction that wrote its own rows first, then appends: events committed by
        others meanwhile are read (it was not yet a writer), and its own, committed late,
        come after them for a reader that already passed those: never skipped, each
        stream in order."""
        async with open_transaction(store) as late:
            await store.append("shared", [NewEvent("E", {"n": 1})])
            await store.append("other", [NewEvent("E", {"n": 2})])
            first = await store.read_events(None, limit=100)
            assert [(e.stream_id, e.data["n"]) for e in first] == [("shared", 1), ("other", 2)]
            await append_in(late, store, "shared", 3)
            await store.append("after", [NewEvent("E", {"n": 4})])
            # Now an announced writer: nothing after the reader's cursor until it commits.
            assert await store.read_events(first[-1].position, limit=100) == []
        rest = await store.read_events(first[-1].position, limit=100)
        assert [(e.stream_id, e.data["n"]) for e in rest] == [("shared", 3), ("after", 4)]
        everything = await numbers(store)
        assert everything == [("shared", 1), ("other", 2), ("shared", 3), ("after", 4)]
        assert [e.stream_version for e in await store.read_stream("shared")] == [1, 2]

    async def test_repeatable_read_writers_must_announce_themselves(
        self, store: PostgresStore
    ) -> None:
        """At REPEATABLE READ a transaction that wrote first cannot append: a clear error,
        nothing written."""
        async with open_transaction(store, isolation="REPEATABLE READ") as late:
            with pytest.raises(DatabaseError, match="READ COMMITTED") as raised:
                await append_in(late, store, "s", 1)
            assert raised.value.sqlstate == "EV003"
        assert await numbers(store) == []


class TestCheckpointsAtOpenWriters:
    """A position the store produced is never taken for one ahead of it, even while the
    transaction that wrote it is open."""

    async def test_positions_of_appends_not_yet_committed(self, store: PostgresStore) -> None:
        """Positions of appends in open transactions (one that wrote first, whose tx is a
        floor above its own id and above the snapshot's xmax, and an outbox transaction):
        saved as checkpoints from another session they are accepted, load back, and status
        does not flag them, before and after the commits."""
        saved: dict[str, Position] = {}
        async with open_transaction(store) as late, store.transaction() as outbox:
            await store.append("other", [NewEvent("E", {"n": 1})])  # the xmax passes late's id
            sql, args = store.admin.append_statement([StreamAppend("late", [NewEvent("E", {})])])
            row = await late.fetchrow(sql, *args)
            assert row is not None
            saved["late"] = Position(row["last_tx"], row["last_position"])
            position = (await outbox.append("outbox", [NewEvent("E", {})])).position
            assert position is not None
            saved["outbox"] = position
            for _ in range(2):
                for name, position in saved.items():
                    await store.save_checkpoint(name, position)
                    assert await store.load_checkpoint(name) == position
                status = await store.projection_status()
                assert [s.checkpoint_ahead for s in status] == [False, False]
        for name, position in saved.items():
            assert await store.load_checkpoint(name) == position
        assert not any(s.checkpoint_ahead for s in await store.projection_status())


async def test_the_horizon_reads_no_locks_when_nothing_is_held_back(
    store: PostgresStore,
) -> None:
    """With no open transaction, the horizon is the snapshot's xmin and held_back is false."""
    await store.append("s", [NewEvent("E", {})])
    await eventually(lambda: _not_held(store))


async def _not_held(store: PostgresStore) -> bool:
    row = await store.admin.fetchrow(f'SELECT * FROM "{store.schema}".read_horizon()')
    assert row is not None
    return not row["held_back"]


OUTBOX_WRITERS = Path(__file__).parent / "outbox_writers_process.py"


async def test_outbox_writers_that_write_first_never_make_a_follower_skip(
    store: PostgresStore, postgres_dsn: str
) -> None:
    """Bounded stress: two processes, each with four outbox writers that write a row of
    their own before appending and a plain appender, and three followers paging
    ``read_events`` from cursors of their own (small pages, so that page ends fall between
    late commits): every follower is given every event exactly once, each stream in order."""
    await store.admin.execute(f'CREATE TABLE "{store.schema}".scratch (n int)')
    processes, writers, transactions = 2, 4, 60
    followed: list[list[RecordedEvent]] = [[], [], []]
    done = trio.Event()

    async def follow(seen: list[RecordedEvent], page_size: int) -> None:
        cursor = None
        while True:
            # Whether the writers had finished before this read began: an empty read that
            # began earlier may predate their last commits.
            finished = done.is_set()
            page = await store.read_events(cursor, limit=page_size)
            seen.extend(page)
            if page:
                cursor = page[-1].position
            elif finished:
                return
            else:
                with trio.move_on_after(0.05):
                    await store.wait_for_events()

    env = {**os.environ, "EVENTCORE_DSN": postgres_dsn}
    argv = [sys.executable, str(OUTBOX_WRITERS), store.schema, str(writers), str(transactions)]
    async with trio.open_nursery() as nursery:
        for seen, page_size in zip(followed, (3, 7, 50), strict=True):
            nursery.start_soon(follow, seen, page_size)
        with trio.fail_after(120):
            async with trio.open_nursery() as writing:
                for _ in range(processes):
                    writing.start_soon(functools.partial(trio.run_process, argv, env=env))
        done.set()
    committed = await read_all(store)
    assert len(committed) == processes * (writers + 1) * transactions
    for seen in followed:
        assert [e.event_id for e in seen] == [e.event_id for e in committed]
        streams: dict[str, list[int]] = {}
        for event in seen:
            streams.setdefault(event.stream_id, []).append(event.data["n"])
        assert all(ns == list(range(transactions)) for ns in streams.values())


class TestAnIdBeforeItsLock:
    """PostgreSQL makes a new transaction id visible to snapshots (the proc array) a moment
    before its lock appears in ``pg_locks`` (``AssignTransactionId``: ``GetNewTransactionId``,
    then ``XactLockTableInsert``). A writer in that moment is still counted: the horizon
    stays at or below every running id of its snapshot that no lock accounts for."""

    @pytest.fixture
    def gdb(self) -> str:
        path = shutil.which("gdb")
        if path is None or os.geteuid() != 0:
            message = "needs gdb and root, to stop a server backend at XactLockTableInsert"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        return path

    async def test_a_plain_append_paused_between_its_id_and_its_lock(
        self, store: PostgresStore, gdb: str, tmp_path: Path
    ) -> None:
        """T, a plain append, is held by gdb after it has an id but before its lock is
        inserted; U, with a later id, commits; a reader reads U: it must not pass T's id."""
        await store.append("warm", [NewEvent("Warm", {})])
        (warm,) = await store.read_events(None, limit=10)
        cursor = warm.position
        returned: list[str] = []
        async with store.admin.connection("paused writer T") as writer:
            await writer.execute("SELECT 1")
            commands = tmp_path / "commands.gdb"
            commands.write_text(
                "set pagination off\nset confirm off\n"
                f"attach {writer.backend_pid}\n"
                "break XactLockTableInsert\n"
                "commands 1\n"
                f"  shell touch {tmp_path}/hit; "
                f"while [ ! -f {tmp_path}/go ]; do sleep 0.02; done\n"
                "  delete\n  detach\n  quit\nend\n"
                f"shell touch {tmp_path}/ready\n"
                "continue\n"
            )
            debugger = await trio.lowlevel.open_process(
                [gdb, "-nx", "-batch", "-x", str(commands)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                await eventually(functools.partial(trio.Path(tmp_path / "ready").exists))
                sql, args = store.admin.append_statement([StreamAppend("t", [NewEvent("T", {})])])
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(functools.partial(writer.fetchrow, sql, *args))
                    await eventually(functools.partial(trio.Path(tmp_path / "hit").exists))
                    # T has an id (the proc array shows it) and the writer lock, but no lock
                    # on its id yet.
                    assert await store.admin.fetchval(
                        "SELECT backend_xid IS NOT NULL FROM pg_stat_activity WHERE pid = $1",
                        writer.backend_pid,
                    )
                    await store.append("u", [NewEvent("U", {})])
                    page = await store.read_events(cursor, limit=10)
                    returned += [event.stream_id for event in page]
                    cursor = page[-1].position if page else cursor
                    await trio.Path(tmp_path / "go").touch()
            finally:
                await trio.Path(tmp_path / "go").touch()
                with trio.move_on_after(30):
                    await debugger.wait()
                debugger.kill()
        returned += [event.stream_id for event in await read_all(store, after=cursor)]
        assert sorted(returned) == ["t", "u"]


class TestEveryEventBecomesReadable:
    """Fact 4 of the argument: once a writer and every older transaction have ended, its
    events are readable, without waiting for anybody else to commit (the system may be
    quiet: no NOTIFY, no other writer)."""

    @staticmethod
    async def readable(store: PostgresStore, stream: str) -> bool:
        return any(event.stream_id == stream for event in await read_all(store))

    async def test_a_read_only_check_then_an_append_after_a_write(
        self, store: PostgresStore
    ) -> None:
        """A transaction writes a row of its own, a later transaction commits, it checks a
        stream's version with an append of no events (which keeps no floor), then appends:
        its event is readable as soon as it commits."""
        await store.admin.execute(f'CREATE TABLE "{store.schema}".orders (id int)')
        await store.append("warm", [NewEvent("Warm", {})])
        async with (
            store.admin.connection("writer") as writer,
            store.admin.connection("other") as other,
        ):
            await writer.execute(f'BEGIN; INSERT INTO "{store.schema}".orders VALUES (1)')
            await other.execute(f'CREATE TABLE "{store.schema}".unrelated (n int)')
            sql, args = store.admin.append_statement(
                [StreamAppend("limit", [], expected_version=0)]
            )
            await writer.fetchrow(sql, *args)
            sql, args = store.admin.append_statement(
                [StreamAppend("order", [NewEvent("OrderPlaced", {})])]
            )
            await writer.fetchrow(sql, *args)
            await writer.execute("COMMIT")
        # Nothing else commits from here on: a stuck event would stay stuck.
        assert await self.readable(store, "order")

    async def test_an_outbox_process_that_dies_after_its_commit(
        self, store: PostgresStore, postgres_dsn: str
    ) -> None:
        """The same through store.transaction(), in a process that exits right after the
        COMMIT, before its store can send the notification that would also have moved the
        horizon along."""
        await store.admin.execute(f'CREATE TABLE "{store.schema}".orders (id int)')
        await store.append("warm", [NewEvent("Warm", {})])
        script = (
            "import os, sys, trio\n"
            "from eventcore_trio import NewEvent, StreamAppend, open_postgres_store\n"
            "async def main(dsn, schema):\n"
            "    async with open_postgres_store(dsn, schema=schema, migrate=False) as store:\n"
            "        async with store.admin.connection('other') as other:\n"
            "            async with store.transaction() as tx:\n"
            "                await tx.execute(f'INSERT INTO \"{schema}\".orders VALUES (1)')\n"
            "                await other.execute(f'CREATE TABLE \"{schema}\".unrelated (n int)')\n"
            "                check = StreamAppend('limit', [], expected_version=0)\n"
            "                await tx.append_atomic([check])\n"
            "                await tx.append('order', [NewEvent('OrderPlaced', {})])\n"
            "            os._exit(0)\n"
            "trio.run(main, os.environ['EVENTCORE_DSN'], sys.argv[1])\n"
        )
        env = {**os.environ, "EVENTCORE_DSN": postgres_dsn}
        await trio.run_process([sys.executable, "-c", script, store.schema], env=env)
        assert len(await store.read_stream("order")) == 1
        assert await self.readable(store, "order")


async def test_a_reader_on_a_hot_standby_reads_below_the_xmin(
    own_server: EmbeddedPostgres,
) -> None:
    """A store opened on a hot standby (advisory locks are not replicated, so its lock view
    shows no writers) reads with the xmin rule alone: an append open on the primary holds
    the standby's reader back, and its event is read once it commits."""
    standby = EmbeddedPostgres.standby_of(own_server)
    await trio.to_thread.run_sync(standby.start)
    try:
        async with open_postgres_store(own_server.dsn, schema="hs") as primary:
            await primary.append("warm", [NewEvent("Warm", {})])

            async def replayed() -> bool:
                lsn = await primary.admin.fetchval("SELECT pg_current_wal_lsn()")
                session = await _bridge.connect(
                    standby.dsn, application_name="replay check", connect_timeout=10
                )
                try:
                    return bool(
                        await session.fetchval("SELECT pg_last_wal_replay_lsn() >= $1", lsn)
                    )
                finally:
                    await session.close()

            await eventually(replayed)
            async with open_postgres_store(standby.dsn, schema="hs", migrate=False) as replica:
                assert await replica.admin.fetchval("SELECT pg_is_in_recovery()")
                (warm,) = await replica.read_events(None, limit=10)
                cursor = warm.position
                returned: list[str] = []
                async with primary.admin.connection("open writer") as writer:
                    await writer.execute("BEGIN")
                    sql, args = primary.admin.append_statement(
                        [StreamAppend("t", [NewEvent("T", {})])]
                    )
                    await writer.fetchrow(sql, *args)
                    await primary.append("u", [NewEvent("U", {})])
                    await eventually(replayed)
                    page = await replica.read_events(cursor, limit=10)
                    returned += [event.stream_id for event in page]
                    cursor = page[-1].position if page else cursor
                    await writer.execute("COMMIT")
                await eventually(replayed)
                returned += [e.stream_id for e in await read_all(replica, after=cursor)]
        assert returned == ["t", "u"]
    finally:
        await trio.to_thread.run_sync(standby.cleanup)
