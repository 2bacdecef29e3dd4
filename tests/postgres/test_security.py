"""No other role's code runs inside the store (issue 32, "search_path hijacking").

PostgreSQL prefers a function or operator of the exact argument types from any schema on the
caller's search_path over pg_catalog's polymorphic one (CVE-2018-1058). A role with nothing
but CONNECT and CREATE on ``public`` (the default on PostgreSQL 13 and 14, and on clusters
upgraded from them) plants such look-alikes of every built-in the store's functions and its
client SQL resolve by type, each of which first draws from a sequence (``nextval`` is never
rolled back, so a call is recorded even if its transaction fails) and then does what the
built-in would. The store is then driven through all its paths as the schema's owner; the
sequence must never be drawn from.

Each run uses a database of its own, so the look-alikes reach no other test.
Version-independent: one server only. See also test_runtime_role.py (least privilege).
"""

from __future__ import annotations

import secrets
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from eventcore_trio import NewEvent, RecordedEvent, Snapshot, StreamAppend, VersionConflict
from eventcore_trio.postgres import PostgresStore, _bridge
from eventcore_trio.projection import (
    FailureStrategy,
    ProjectionConfig,
    ProjectionContext,
    projector,
    replay_dead_letters,
    run_projection,
    run_projections,
)
from eventcore_trio.testing import PostgresHarness, dsn_with_credentials, wait_caught_up

from ..conftest import oldest_server_param

pytestmark = pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)

# Each look-alike: its signature in public, what it returns, and the built-in call it makes
# ($n its arguments). Exact argument types of the calls in the store's functions and SQL.
_FUNCTIONS = [
    ("unnest(text[])", "SETOF text", "pg_catalog.unnest($1)"),
    ("unnest(bigint[])", "SETOF bigint", "pg_catalog.unnest($1)"),
    ("unnest(integer[])", "SETOF integer", "pg_catalog.unnest($1)"),
    ("unnest(uuid[])", "SETOF uuid", "pg_catalog.unnest($1)"),
    ("unnest(jsonb[])", "SETOF jsonb", "pg_catalog.unnest($1)"),
    ("array_length(text[], integer)", "integer", "pg_catalog.array_length($1, $2)"),
    ("array_length(bigint[], integer)", "integer", "pg_catalog.array_length($1, $2)"),
    ("array_position(text[], text)", "integer", "pg_catalog.array_position($1, $2)"),
    ("array_fill(bigint, integer[])", "bigint[]", "pg_catalog.array_fill($1, $2)"),
    ("cardinality(bigint[])", "integer", "pg_catalog.cardinality($1)"),
    (
        "generate_subscripts(text[], integer)",
        "SETOF integer",
        "pg_catalog.generate_subscripts($1, $2)",
    ),
    ("format(text, text, bigint, bigint)", "text", "pg_catalog.format($1, $2, $3, $4)"),
    (
        "json_build_object(text, text, text, bigint, text, bigint)",
        "json",
        "pg_catalog.json_build_object($1, $2, $3, $4, $5, $6)",
    ),
    ("convert_to(text, text)", "bytea", "pg_catalog.convert_to($1, $2::name)"),
    # A parameter of unknown type prefers float8, the numeric category's preferred type,
    # over pg_catalog's bigint: the client's untyped lock keys.
    (
        "pg_try_advisory_lock(double precision)",
        "boolean",
        "pg_catalog.pg_try_advisory_lock($1::bigint)",
    ),
    ("pg_advisory_lock(double precision)", "void", "pg_catalog.pg_advisory_lock($1::bigint)"),
    (
        "pg_advisory_xact_lock(double precision)",
        "void",
        "pg_catalog.pg_advisory_xact_lock($1::bigint)",
    ),
    (
        "pg_advisory_xact_lock_shared(double precision)",
        "void",
        "pg_catalog.pg_advisory_xact_lock_shared($1::bigint)",
    ),
    (
        "pg_terminate_backend(double precision)",
        "boolean",
        "pg_catalog.pg_terminate_backend($1::int)",
    ),
]
# Operators: left and right types, result, and the built-in function (array ||, text ||
# something else, bigint % int).
_OPERATORS = [
    ("||", "text[]", "text", "text[]", "pg_catalog.array_append($1, $2)"),
    ("||", "bigint[]", "bigint", "bigint[]", "pg_catalog.array_append($1, $2)"),
    ("||", "integer[]", "integer", "integer[]", "pg_catalog.array_append($1, $2)"),
    ("||", "boolean[]", "boolean", "boolean[]", "pg_catalog.array_append($1, $2)"),
    ("||", "text", "bigint", "text", "pg_catalog.textcat($1, $2::text)"),
    ("||", "text", "integer", "text", "pg_catalog.textcat($1, $2::text)"),
    ("%", "bigint", "integer", "bigint", "pg_catalog.int8mod($1, $2)"),
]
_AGGREGATES = [("text", "text[]"), ("bigint", "bigint[]")]


def _plant_sql() -> str:
    """The attacker's objects in public; every one draws from public.tripwire first."""
    statements = []
    for signature, returns, call in _FUNCTIONS:
        statements.append(
            f"CREATE FUNCTION public.{signature} RETURNS {returns} LANGUAGE sql AS "
            f"$$ SELECT nextval('public.tripwire'); SELECT {call} $$"
        )
    for number, (op, left, right, returns, call) in enumerate(_OPERATORS):
        # IMMUTABLE, as an attacker would declare it, so that an index may use it too.
        statements.append(
            f"CREATE FUNCTION public.trip_op_{number}({left}, {right}) RETURNS {returns} "
            "LANGUAGE sql IMMUTABLE AS "
            f"$$ SELECT nextval('public.tripwire'); SELECT {call} $$"
        )
        statements.append(
            f"CREATE OPERATOR public.{op} (LEFTARG = {left}, RIGHTARG = {right}, "
            f"FUNCTION = public.trip_op_{number})"
        )
    for element, state in _AGGREGATES:
        statements.append(
            f"CREATE FUNCTION public.trip_agg_{element}({state}, {element}) RETURNS {state} "
            "LANGUAGE sql AS $$ SELECT nextval('public.tripwire'); "
            "SELECT pg_catalog.array_append($1, $2) $$"
        )
        statements.append(
            f"CREATE AGGREGATE public.array_agg({element}) "
            f"(SFUNC = public.trip_agg_{element}, STYPE = {state})"
        )
    return ";\n".join(statements)


@asynccontextmanager
async def _connection(dsn: str) -> AsyncIterator[_bridge.Connection]:
    connection = await _bridge.connect(
        dsn, application_name="eventcore-trio test security", connect_timeout=10.0
    )
    try:
        yield connection
    finally:
        await connection.close()


@asynccontextmanager
async def _planted_database(postgres_dsn: str) -> AsyncIterator[str]:
    """A database of its own in which a role with CREATE on public planted look-alikes;
    yields the superuser's DSN to it."""
    database = f"sec_{uuid.uuid4().hex[:12]}"
    attacker, password = f"attacker_{uuid.uuid4().hex[:12]}", secrets.token_urlsafe(24)
    admin = postgres_dsn  # a superuser
    async with _bridge.asyncio_loop():
        async with _connection(admin) as connection:
            await connection.execute(f"CREATE DATABASE {database}")
            await connection.execute(f"CREATE ROLE {attacker} LOGIN PASSWORD '{password}'")
        owner_dsn = _with_database(admin, database)
        try:
            async with _connection(owner_dsn) as connection:
                # As on a cluster upgraded from PostgreSQL 13 or 14: anyone may create in
                # public. The tripwire is a sequence every role may draw from.
                await connection.execute(
                    f"GRANT CREATE ON SCHEMA public TO {attacker}; "
                    "CREATE SEQUENCE public.tripwire; "
                    "GRANT USAGE, SELECT, UPDATE ON SEQUENCE public.tripwire TO PUBLIC"
                )
            attacker_dsn = dsn_with_credentials(owner_dsn, attacker, password)
            async with _connection(attacker_dsn) as connection:
                await connection.execute(_plant_sql())
            async with _connection(owner_dsn) as connection:
                # They are live: the owner's unqualified call runs one (then count afresh).
                await connection.execute("SELECT cardinality(ARRAY[1, 2]::bigint[])")
                assert await connection.fetchval("SELECT is_called FROM public.tripwire")
                await connection.execute("SELECT setval('public.tripwire', 1, false)")
            yield owner_dsn
        finally:
            async with _connection(admin) as connection:
                await connection.execute(f"DROP DATABASE {database} WITH (FORCE)")
                await connection.execute(f"DROP ROLE {attacker}")


def _with_database(dsn: str, database: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{database}"))


async def _tripped(store: PostgresStore) -> int:
    # is_called is false until the first nextval: then last_value counts the calls.
    row = await store.admin.fetchrow("SELECT last_value, is_called FROM public.tripwire")
    assert row is not None
    return int(row["last_value"]) if row["is_called"] else 0


async def _drive(store: PostgresStore, harness: PostgresHarness) -> None:
    """Every path of the store: appends of every kind, reads, the held-back read horizon,
    checkpoints, a partitioned projection with dead letters, its split and replay, a
    balancing host, snapshots, status and reset."""
    await store.append("a", [NewEvent("Placed", {"n": 1})])
    await store.append_atomic(
        [StreamAppend("b", [NewEvent("Placed", {})]), StreamAppend("c", [NewEvent("Bad", {})])]
    )
    with pytest.raises(VersionConflict):
        await store.append("a", [NewEvent("Placed", {})], expected_version=0)
    # Group commit: concurrent appends share append_many, one of them refused there.
    outcomes: list[object] = []

    async def append(stream: str, expected: int | None) -> None:
        try:
            outcomes.append(
                await store.append(stream, [NewEvent("Placed", {})], expected_version=expected)
            )
        except VersionConflict as exc:
            outcomes.append(exc)

    async with trio.open_nursery() as nursery:
        for n in range(16):
            nursery.start_soon(append, f"g{n % 5}", 99 if n == 7 else None)
    assert sum(isinstance(o, VersionConflict) for o in outcomes) == 1
    # The outbox: after a write of its own at READ COMMITTED (a fresh floor, then the kept
    # one), and announced at its start at REPEATABLE READ.
    async with store.transaction() as tx:
        await tx.fetchval("SELECT pg_current_xact_id()")
        await tx.append("a", [NewEvent("Placed", {})])
        await tx.append("b", [NewEvent("Placed", {})])
    async with store.transaction(isolation="repeatable read") as tx:
        await tx.fetchval("SELECT pg_current_xact_id()")
        await tx.append("a", [NewEvent("Placed", {})])
    # Reads held back by an open writer (the read horizon): nothing after it shows.
    async with harness.hold_commit(store, "late", [NewEvent("Late", {})]):
        await store.append("after", [NewEvent("Placed", {})])
        assert all(e.stream_id != "after" for e in await store.read_events(None, limit=100))
        await store.last_position()
    assert (await store.read_events(None, limit=100))[-1].stream_id == "after"
    assert len(await store.read_stream("a")) == 3
    position = await store.last_position()
    assert position is not None
    await store.save_checkpoint("manual", position)
    assert await store.load_checkpoint("manual") == position

    # A partitioned projection that skips "Bad" events into dead letters, split from 2 to
    # 4 partitions (dead letters move), replayed, then hosted by a balancing host.
    failing = True

    @projector("sec", partitions=2, on_error=lambda failure: FailureStrategy.SKIP)
    async def two(event: RecordedEvent, ctx: ProjectionContext) -> None:
        if event.type == "Bad" and failing:
            raise ValueError("bad")

    await run_projection(store, two)
    assert len(await store.dead_letters("sec")) == 1
    await store.set_partitions("sec", 4)

    @projector("sec", partitions=4)
    async def four(event: RecordedEvent, ctx: ProjectionContext) -> None:
        pass

    failing = False
    assert (await replay_dead_letters(store, four)).replayed == 1
    await store.append("d", [NewEvent("Placed", {})])
    async with trio.open_nursery() as nursery:
        await nursery.start(run_projections, store, [four], ProjectionConfig(balance_interval=0.1))
        await wait_caught_up(store, [four])
        assert len(await store.projection_status()) == 5  # and the manual checkpoint
        nursery.cancel_scope.cancel()
    await store.reset_projection("sec")

    first, second = (await store.read_stream("a"))[:2]
    for event in (first, second):  # the second replaces the first: its event is checked
        await store.write_snapshot(
            Snapshot(
                "a",
                "Account",
                1,
                event.stream_version,
                {"n": 1},
                event_id=event.event_id,
                event_recorded_at=event.recorded_at,
            )
        )
    assert await store.read_snapshot("a", "Account") is not None
    await store.read_stream_from_snapshot("a", "Account")
    assert await store.delete_snapshots("a") == 1


async def test_look_alikes_in_public_never_run(postgres_dsn: str) -> None:
    """Look-alikes of every built-in the store resolves by type, planted in public by
    another role, are never called: not by the migrations, the append functions, the read
    horizon, nor the client's SQL."""
    async with _planted_database(postgres_dsn) as dsn:
        harness = PostgresHarness(dsn)
        async with harness.open_store() as store:
            # Code that the look-alikes broke (before the fix) counts only after the count.
            failure: Exception | None = None
            try:
                with trio.fail_after(60):
                    await _drive(store, harness)
            except Exception as exc:
                failure = exc
            calls = await _tripped(store)
            assert calls == 0, f"look-alikes planted in public ran {calls} times"
            if failure is not None:
                raise failure
