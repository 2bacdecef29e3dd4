"""The Trio-side connection pool: reuse, bounds, and never handing out a session in doubt."""

from __future__ import annotations

import datetime
import decimal
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import trio
import trio.testing

from eventcore_trio import DatabaseError, StoreConnectionError
from eventcore_trio.postgres import PostgresStore, _bridge
from eventcore_trio.postgres._pool import Pool, open_pool

from ..helpers import eventually, until_it_works

APPLICATION = "eventcore-trio pool test"


@pytest.fixture
async def pool(postgres_dsn: str) -> AsyncIterator[Pool]:
    """A pool of at most two connections."""
    async with (
        _bridge.asyncio_loop(),
        open_pool(
            postgres_dsn,
            min_size=1,
            max_size=2,
            application_name=APPLICATION,
            connect_timeout=10,
        ) as pool,
    ):
        yield pool


async def _pid(pool: Pool) -> int:
    return int(await pool.fetchval("SELECT pg_backend_pid()"))


async def _session_exists(pool: Pool, pid: int) -> bool:
    return bool(await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid))


async def test_statements_reuse_one_session(pool: Pool) -> None:
    first = await _pid(pool)
    assert [await _pid(pool) for _ in range(5)] == [first] * 5


async def test_an_error_from_the_server_keeps_the_session(pool: Pool) -> None:
    before = await _pid(pool)
    with pytest.raises(DatabaseError):
        await pool.execute("SELECT * FROM no_such_table")
    assert await _pid(pool) == before


async def test_callers_beyond_the_maximum_wait_for_a_connection(pool: Pool) -> None:
    release = trio.Event()
    third_acquired = trio.Event()
    pids: list[int] = []

    async def hold(acquired: trio.Event) -> None:
        async with pool.acquire() as connection:
            pids.append(int(await connection.fetchval("SELECT pg_backend_pid()")))
            acquired.set()
            await release.wait()

    async with trio.open_nursery() as nursery:
        holders = [trio.Event(), trio.Event()]
        for acquired in holders:
            nursery.start_soon(hold, acquired)
        for acquired in holders:
            await acquired.wait()
        nursery.start_soon(hold, third_acquired)
        await trio.testing.wait_all_tasks_blocked()
        assert not third_acquired.is_set()
        release.set()
        await third_acquired.wait()
    # The third used one of the two sessions again.
    assert len(set(pids)) == 2
    assert pids[2] in pids[:2]


async def test_a_cancelled_statement_is_cancelled_and_its_session_serves_again(
    pool: Pool,
) -> None:
    """Cancelling a statement in flight cancels it on the server; the session is reused once
    it is idle again, never while the statement still runs."""
    before = await _pid(pool)
    with trio.move_on_after(0.2) as scope:
        await pool.fetchval("SELECT pg_sleep(30)")
    assert scope.cancelled_caught
    with trio.fail_after(5):
        assert await _pid(pool) == before
        assert not await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' "
            "AND state = 'active' AND pid <> pg_backend_pid()"
        )


async def test_a_session_left_in_a_transaction_is_not_reused(pool: Pool) -> None:
    async with pool.acquire() as connection:
        before = int(await connection.fetchval("SELECT pg_backend_pid()"))
        await connection.begin()
    assert await _pid(pool) != before


async def test_a_block_cancelled_around_begin_never_leaves_a_transaction_behind(
    pool: Pool, postgres_dsn: str
) -> None:
    """Blocks cancelled at moments around their BEGIN: whatever the server got, no session
    the pool keeps is inside that transaction."""
    observer = await _bridge.connect(postgres_dsn, application_name="observer", connect_timeout=10)
    try:
        for step in range(30):
            with trio.move_on_after(step * 0.0002):
                async with pool.acquire() as connection:
                    await connection.begin()
                    await connection.execute("SELECT pg_sleep(0.01)")
            kept = [connection.backend_pid for connection in pool._idle]
            states = await observer.fetch(
                "SELECT state FROM pg_stat_activity WHERE pid = ANY($1::int[])", kept
            )
            assert [row["state"] for row in states] == ["idle"] * len(kept)
    finally:
        await observer.close()


async def test_an_error_in_the_callers_block_keeps_an_idle_session(pool: Pool) -> None:
    class Boom(Exception):
        pass

    pids: list[int] = []

    async def use_then_fail() -> None:
        async with pool.acquire() as connection:
            pids.append(int(await connection.fetchval("SELECT pg_backend_pid()")))
            raise Boom

    with pytest.raises(Boom):
        await use_then_fail()
    assert await _pid(pool) == pids[0]


async def test_a_session_the_server_ended_is_replaced(pool: Pool, postgres_dsn: str) -> None:
    before = await _pid(pool)
    killer = await _bridge.connect(postgres_dsn, application_name="killer", connect_timeout=10)
    try:
        assert await killer.fetchval("SELECT pg_terminate_backend($1)", before)
    finally:
        await killer.close()
    # At most one call learns of the loss (StoreConnectionError); then a new session serves.
    await until_it_works(lambda: _pid(pool))
    assert await _pid(pool) != before


async def test_closing_ends_every_session(postgres_dsn: str) -> None:
    async with _bridge.asyncio_loop():
        async with open_pool(
            postgres_dsn,
            min_size=2,
            max_size=2,
            application_name=f"{APPLICATION} closing",
            connect_timeout=10,
        ) as pool:
            pids = {await _pid(pool)}
            async with pool.acquire() as one, pool.acquire() as two:
                pids |= {
                    int(await one.fetchval("SELECT pg_backend_pid()")),
                    int(await two.fetchval("SELECT pg_backend_pid()")),
                }
            assert len(pids) == 2
        observer = await _bridge.connect(
            postgres_dsn, application_name="observer", connect_timeout=10
        )
        try:

            async def gone() -> bool:
                return not await observer.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", list(pids)
                )

            await eventually(gone)
        finally:
            await observer.close()


async def test_an_unreachable_server_is_a_connection_error() -> None:
    async with _bridge.asyncio_loop():
        with pytest.raises(StoreConnectionError):
            async with open_pool(
                "postgresql://nobody@127.0.0.1:9/none",
                min_size=1,
                max_size=1,
                application_name=APPLICATION,
                connect_timeout=2,
            ):
                pass


async def test_a_pooled_statement_is_a_checkpoint_and_a_cancelled_caller_runs_nothing(
    pool: Pool,
) -> None:
    """A free slot is taken without a scheduling round of its own, yet the call stays a
    checkpoint, and a caller already cancelled neither runs its statement nor costs the
    session."""
    before = await _pid(pool)
    with trio.testing.assert_checkpoints():
        await pool.fetchval("SELECT 1")
    with trio.CancelScope() as scope:
        scope.cancel()
        await pool.fetchval("SELECT set_config('eventcore.pool_test', 'ran', false)")
    assert scope.cancelled_caught
    assert not await pool.fetchval("SELECT current_setting('eventcore.pool_test', true)")
    assert await _pid(pool) == before


async def test_a_cancelled_store_call_is_cancelled(store: PostgresStore) -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        await store.admin.fetchval("SELECT 1")
    assert scope.cancelled_caught
    with trio.testing.assert_checkpoints():
        assert await store.admin.fetchval("SELECT 1") == 1


async def test_a_caller_cancelled_while_waiting_for_a_slot_leaves_the_bound_intact(
    pool: Pool,
) -> None:
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(_hold, pool, release)
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.1) as waiting:
            await pool.fetchval("SELECT 1")
        assert waiting.cancelled_caught
        release.set()
    async with pool.acquire() as one, pool.acquire() as two:
        assert one is not two
        assert not pool._slots.value


async def _hold(pool: Pool, release: trio.Event) -> None:
    async with pool.acquire() as connection:
        await connection.fetchval("SELECT 1")
        await release.wait()


# One value per array type the bridge teaches asyncpg, and the SQL type to send it as.
_ARRAYS: dict[int, tuple[str, list[object]]] = {
    1000: ("bool[]", [True, False, None]),
    1005: ("int2[]", [1, -2]),
    1007: ("int4[]", [1, 2, None]),
    1016: ("int8[]", [2**40, -1]),
    1021: ("float4[]", [1.5]),
    1022: ("float8[]", [2.25, -0.5]),
    1231: ("numeric[]", [decimal.Decimal("1.10")]),
    1015: ("varchar[]", ["a", "b,c"]),
    1182: ("date[]", [datetime.date(2026, 12, 6)]),
    1115: ("timestamp[]", [datetime.datetime(2026, 12, 6, 1, 2, 3)]),
    1185: ("timestamptz[]", [datetime.datetime(2026, 12, 6, 1, 2, 3, tzinfo=datetime.UTC)]),
    2951: ("uuid[]", [uuid.UUID(int=7)]),
    199: ("json[]", ['{"a": 1}']),
    3807: ("jsonb[]", ['{"a": 1}']),
}


@pytest.fixture
def introspected(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The type OIDs asyncpg asks the server about from now on, one list per question."""
    asked: list[object] = []
    original = asyncpg.Connection._introspect_types

    async def spy(self: asyncpg.Connection, *args: object) -> object:
        asked.append(args[0])
        return await original(self, *args)

    monkeypatch.setattr(asyncpg.Connection, "_introspect_types", spy)
    return asked


async def test_arrays_of_builtin_types_need_no_introspection(
    pool: Pool, introspected: list[object]
) -> None:
    """A new connection knows these arrays without asking the server (the first append of a
    connection, or a new leader's first statement, would pay a catalog query), and encodes
    and decodes them as asyncpg's own introspection would."""
    assert set(_ARRAYS) == set(_bridge.BUILTIN_ARRAYS)
    async with pool.acquire() as connection:
        for oid, (sql_type, value) in _ARRAYS.items():
            row = await connection.fetchrow(
                f"SELECT $1::{sql_type} AS value, pg_typeof($1::{sql_type})::oid AS oid", value
            )
            assert row is not None
            assert (row["oid"], row["value"]) == (oid, value)
    assert introspected == []


async def test_arrays_with_nulls_dimensions_and_no_elements_without_a_statement_cache(
    postgres_dsn: str, introspected: list[object]
) -> None:
    """On a connection without a statement cache (as behind a transaction pooler): NULL
    elements, two and three dimensions, empty arrays and NULL arrays go both ways as
    asyncpg's own introspection would have them, and nothing is introspected."""
    cases: list[tuple[str, object, str | None]] = [
        ("int4[]", [[1, 2], [3, None]], "{{1,2},{3,NULL}}"),
        ("int8[]", [], "{}"),
        ("int8[]", [[]], "{}"),
        ("int8[]", None, None),
        ("int2[]", [[[1]], [[2]]], "{{{1}},{{2}}}"),
        ("bool[]", [None, True], "{NULL,t}"),
        ("varchar[]", ["a,b", None, "", "NULL", '"q"'], '{"a,b",NULL,"","NULL","\\"q\\""}'),
        ("jsonb[]", ['{"a": [1, 2]}', None], '{"{\\"a\\": [1, 2]}",NULL}'),
        ("uuid[]", [[uuid.UUID(int=1)], [None]], None),
        ("numeric[]", [decimal.Decimal("1.10"), None], "{1.10,NULL}"),
    ]
    async with _bridge.asyncio_loop():
        connection = await _bridge.connect(
            postgres_dsn, application_name="arrays", connect_timeout=10, statement_cache_size=0
        )
        try:
            for sql_type, value, text in cases:
                row = await connection.fetchrow(
                    f"SELECT $1::{sql_type} AS value, $1::{sql_type}::text AS text", value
                )
                assert row is not None
                expected = [] if value == [[]] else value
                assert row["value"] == expected, sql_type
                if text is not None:
                    assert row["text"] == text, sql_type
            row = await connection.fetchrow(
                "SELECT '{{1,2},{3,4}}'::int8[] AS a, '{}'::jsonb[] AS b, ARRAY[NULL]::uuid[] AS c"
            )
            assert row is not None
            assert (row["a"], row["b"], row["c"]) == ([[1, 2], [3, 4]], [], [None])
        finally:
            await connection.close()
        assert introspected == []
