"""store.transaction(): the application's rows and events in one transaction it controls."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from eventcore_trio import (
    DatabaseError,
    EventEncodeError,
    InvalidArgument,
    NewEvent,
    ProjectionConfig,
    ProjectionContext,
    RecordedEvent,
    StreamAppend,
    VersionConflict,
    projector,
    run_projection,
    wait_for_projections,
)
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.testing import read_all


async def orders_table(store: PostgresStore) -> str:
    table = f'"{store.schema}".orders'
    await store.admin.execute(f"CREATE TABLE {table} (id text PRIMARY KEY, total int)")
    return table


async def stored(store: PostgresStore) -> list[tuple[str, str]]:
    return [(e.stream_id, e.type) for e in await read_all(store)]


class TestOutbox:
    """Rows and events commit together, or neither does."""

    async def test_rows_and_events_commit_together(self, store: PostgresStore) -> None:
        """Both are there after the block, the events in order and versioned."""
        table = await orders_table(store)
        async with store.transaction() as tx:
            await tx.execute(f"INSERT INTO {table} VALUES ($1, $2)", "o1", 30)
            first = await tx.append("order-o1", [NewEvent("OrderPlaced", {})], expected_version=0)
            second = await tx.append_atomic(
                [StreamAppend("order-o1", [NewEvent("OrderPriced", {})], expected_version=1)]
            )
            assert await tx.fetchval(f"SELECT total FROM {table} WHERE id = 'o1'") == 30
        assert await store.admin.fetchval(f"SELECT count(*) FROM {table}") == 1
        events = await read_all(store)
        assert [(e.type, e.stream_version) for e in events] == [
            ("OrderPlaced", 1),
            ("OrderPriced", 2),
        ]
        assert first.position == events[0].position
        assert second.position == events[1].position

    async def test_an_error_in_the_block_rolls_back_both(self, store: PostgresStore) -> None:
        """An exception leaves neither rows nor events."""
        table = await orders_table(store)

        async def declined() -> None:
            async with store.transaction() as tx:
                await tx.execute(f"INSERT INTO {table} VALUES ('o1', 1)")
                await tx.append("order-o1", [NewEvent("OrderPlaced", {})])
                raise RuntimeError("payment declined")

        with pytest.raises(RuntimeError):
            await declined()
        assert await store.admin.fetchval(f"SELECT count(*) FROM {table}") == 0
        assert await stored(store) == []

    async def test_a_conflict_caught_in_the_block_still_commits_nothing(
        self, store: PostgresStore
    ) -> None:
        """A stale expected version: VersionConflict; the block cannot commit even if it
        caught it, and says so."""
        table = await orders_table(store)
        await store.append("order-o1", [NewEvent("OrderPlaced", {})])

        async def caught() -> None:
            async with store.transaction() as tx:
                await tx.execute(f"INSERT INTO {table} VALUES ('o1', 1)")
                with pytest.raises(VersionConflict):
                    await tx.append("order-o1", [NewEvent("Again", {})], expected_version=0)
                with pytest.raises(DatabaseError, match="can only roll back"):
                    await tx.execute("SELECT 1")

        with pytest.raises(DatabaseError, match="nothing was committed"):
            await caught()
        assert await store.admin.fetchval(f"SELECT count(*) FROM {table}") == 0
        assert await stored(store) == [("order-o1", "OrderPlaced")]

    async def test_a_cancelled_block_commits_nothing(self, store: PostgresStore) -> None:
        """Cancelled from outside mid-block: rolled back, and the store goes on."""
        with trio.move_on_after(0.2):
            async with store.transaction() as tx:
                await tx.append("s", [NewEvent("E", {})])
                await trio.sleep_forever()
        assert await stored(store) == []
        await store.append("s", [NewEvent("E", {})])
        assert await stored(store) == [("s", "E")]

    async def test_a_key_that_is_not_a_str_is_refused_before_anything_is_sent(
        self, store: PostgresStore
    ) -> None:
        """EventEncodeError (1 and "1" would become one key) before the statement is sent:
        the transaction stays usable, and only what the block went on to write commits."""
        table = await orders_table(store)
        async with store.transaction() as tx:
            await tx.execute(f"INSERT INTO {table} VALUES ('o1', 1)")
            with pytest.raises(EventEncodeError, match=r"1 \(int\) in data\['lines'\]"):
                await tx.append(
                    "order-o1", [NewEvent("OrderPlaced", {"lines": {1: "a", "1": "b"}})]
                )
            await tx.append("order-o1", [NewEvent("OrderPlaced", {"lines": {"1": "b"}})])
        assert await store.admin.fetchval(f"SELECT count(*) FROM {table}") == 1
        assert [e.data for e in await read_all(store)] == [{"lines": {"1": "b"}}]

    async def test_bad_isolation_is_refused(self, store: PostgresStore) -> None:
        """An unknown isolation level is an InvalidArgument before anything runs."""
        with pytest.raises(InvalidArgument, match="isolation"):
            async with store.transaction(isolation="chaos"):  # type: ignore[arg-type]
                pass


class TestOutboxAndReaders:
    """Readers never skip an outbox transaction's events, and are woken when it commits."""

    @pytest.mark.parametrize("isolation", ["read committed", "repeatable read"])
    async def test_an_id_long_before_appending(self, store: PostgresStore, isolation: str) -> None:
        """The transaction writes its rows first (an id), others append and are read, then
        it appends and commits late: its events come after theirs for a reader that already
        passed them, and each stream stays in order. (At REPEATABLE READ it appends to a
        stream of its own: one another transaction moved after its snapshot is a
        serialization failure, SQLSTATE 40001, as for any row at that level.)"""
        mine = "shared" if isolation == "read committed" else "mine"
        table = await orders_table(store)
        async with store.transaction(isolation=isolation) as tx:  # type: ignore[arg-type]
            await tx.execute(f"INSERT INTO {table} VALUES ('o1', 1)")
            await store.append("shared", [NewEvent("Other", {})])
            passed = await store.read_events(None, limit=10)
            if isolation == "read committed":
                # Not yet a writer: the reader goes past the other append.
                assert [e.stream_id for e in passed] == ["shared"]
            else:
                # Announced when it began: readers wait for it from then on.
                assert passed == []
            await tx.append(mine, [NewEvent("Mine", {})])
            await store.append("later", [NewEvent("Later", {})])
            cursor = passed[-1].position if passed else None
            assert await store.read_events(cursor, limit=10) == []
        assert await store.admin.fetchval(f"SELECT count(*) FROM {table}") == 1
        rest = await store.read_events(cursor, limit=10)
        seen = [*passed, *rest]
        # At either level, an append after the transaction's own writes carries an id
        # claimed when it appends: after the others' (at REPEATABLE READ too, where the
        # announcement at BEGIN already held readers back).
        expected = [("shared", "Other"), (mine, "Mine"), ("later", "Later")]
        assert [(e.stream_id, e.type) for e in seen] == expected
        assert [e.type for e in await store.read_stream(mine)][-1] == "Mine"

    async def test_readers_are_woken_when_it_commits(self, store: PostgresStore) -> None:
        """A projection that only polls once a minute applies the events at once."""
        applied: list[str] = []

        @projector("outbox-view")
        async def view(event: RecordedEvent, ctx: ProjectionContext) -> None:
            applied.append(event.type)

        config = ProjectionConfig(continuous=True, poll_interval=60)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_projection, store, view, config)
            async with store.transaction() as tx:
                result = await tx.append("s", [NewEvent("Woken", {})])
            await wait_for_projections(store, [view], result, timeout=20)
            assert applied == ["Woken"]
            nursery.cancel_scope.cancel()

    async def test_readers_are_woken_when_the_commit_is_cancelled(
        self, store: PostgresStore
    ) -> None:
        """A cancellation that lands on a COMMIT which goes through all the same: the block
        raises Cancelled, the outcome is in doubt, and readers are woken: a projection that
        only polls once a minute applies the events at once."""
        # The COMMIT waits for a synchronous standby that does not exist, until it is
        # cancelled; PostgreSQL then keeps the commit ("the transaction has already
        # committed locally"). Only this transaction waits: the server runs with
        # synchronous_commit off, and the transaction turns it on for itself.
        table = await orders_table(store)
        await store.admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        await store.admin.execute("SELECT pg_reload_conf()")
        applied: list[str] = []

        @projector("outbox-view")
        async def view(event: RecordedEvent, ctx: ProjectionContext) -> None:
            applied.append(event.type)

        try:
            config = ProjectionConfig(continuous=True, poll_interval=60)
            async with trio.open_nursery() as nursery:
                await nursery.start(run_projection, store, view, config)
                with trio.CancelScope() as scope:
                    async with store.transaction() as tx:
                        await tx.execute("SET LOCAL synchronous_commit = on")
                        await tx.execute(f"INSERT INTO {table} VALUES ('o1', 1)")
                        result = await tx.append("s", [NewEvent("InDoubt", {})])
                        scope.deadline = trio.current_time() + 0.3
                assert scope.cancelled_caught
                assert await store.admin.fetchval(f"SELECT count(*) FROM {table}") == 1
                await wait_for_projections(store, [view], result, timeout=20)
                assert applied == ["InDoubt"]
                nursery.cancel_scope.cancel()
        finally:
            await store.admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
            await store.admin.execute("SELECT pg_reload_conf()")


async def test_a_prepared_transaction_holds_up_no_later_append(
    store: PostgresStore, postgres_dsn: str
) -> None:
    """Found by a review of migration 6: the id a transaction that wrote first claims for its
    append was a row per session, and a prepared transaction of the session kept it locked,
    so the session's next such append waited for COMMIT PREPARED (for ever, when that was to
    come from the same session), and at REPEATABLE READ failed with 40001 once it came."""
    from eventcore_trio.postgres import _bridge

    table = await orders_table(store)
    sql, args = store.admin.append_statement([StreamAppend("p", [NewEvent("Prepared", {})])])
    later, later_args = store.admin.append_statement([StreamAppend("q", [NewEvent("Late", {})])])
    gid = f"eventcore-{store.schema}"
    connection = await _bridge.connect(
        postgres_dsn, application_name="prepared", connect_timeout=10.0
    )
    try:
        await connection.execute("BEGIN")
        await connection.execute(f"INSERT INTO {table} VALUES ('o1', 1)")
        await connection.fetchrow(sql, *args)
        await connection.execute(f"PREPARE TRANSACTION '{gid}'")
        with trio.fail_after(10):
            # READ COMMITTED: the next write-then-append of the same session.
            await connection.execute("BEGIN")
            await connection.execute(f"INSERT INTO {table} VALUES ('o2', 2)")
            await connection.fetchrow(later, *later_args)
            await connection.execute("COMMIT")
            # REPEATABLE READ, announced at its start, with the prepared one committed by
            # another session between its snapshot and its append.
            await connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            await connection.execute(f'SELECT "{store.schema}".announce_writer()')
            await connection.execute(f"INSERT INTO {table} VALUES ('o3', 3)")
            await store.admin.execute(f"COMMIT PREPARED '{gid}'")
            await connection.fetchrow(later, *later_args)
            await connection.execute("COMMIT")
    finally:
        if await store.admin.fetchval("SELECT count(*) FROM pg_prepared_xacts WHERE gid = $1", gid):
            await store.admin.execute(f"ROLLBACK PREPARED '{gid}'")
        await connection.close()
    assert [e.type for e in await store.read_stream("q")] == ["Late", "Late"]
    assert [e.type for e in await store.read_stream("p")] == ["Prepared"]
