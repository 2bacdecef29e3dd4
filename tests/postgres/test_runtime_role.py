"""A least-privilege deployment (issue 32): an owner migrates, a runtime role runs the store.

The runtime role gets exactly what ``eventcore-trio migrate --grant ROLE --print`` prints,
applied by the owner. It appends (through the owner's SECURITY DEFINER functions only),
reads, checkpoints and hosts projections; it cannot write events or streams by hand, call
the append functions' parts, choose the transaction id of its events through the settings
they read, or touch another schema. The whole contract suite runs once as such a role.
Version-independent: one server only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import secrets
import uuid
from collections.abc import AsyncIterator

import attrs
import pytest
import trio

from eventcore_trio import (
    ConfigurationError,
    DatabaseError,
    NewEvent,
    RecordedEvent,
    StreamAppend,
    VersionConflict,
)
from eventcore_trio.cli import EXIT_OK, EXIT_USAGE, main
from eventcore_trio.postgres import PostgresStore, _bridge, open_postgres_store, runtime_grants
from eventcore_trio.projection import ProjectionContext, projector, run_projection
from eventcore_trio.testing import (
    BackendHarness,
    PostgresHarness,
    StoreContract,
    dsn_with_credentials,
    read_all,
)

from ..conftest import oldest_server_param

ONE_SERVER = pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
INSUFFICIENT_PRIVILEGE = "42501"


@ONE_SERVER
class TestContractAsRuntimeRole(StoreContract):
    """Every contract of the four protocols holds for a store opened by a runtime role."""

    @pytest.fixture
    def harness(self, postgres_dsn: str) -> BackendHarness:
        """A fresh schema owned by a role of its own; stores open as a runtime role."""
        return PostgresHarness(postgres_dsn, runtime_role=True)


@attrs.frozen
class Deployment:
    """An owner and a runtime role, each with a password, and a schema nobody made yet."""

    schema: str
    owner_dsn: str
    runtime: str
    runtime_dsn: str


@contextlib.asynccontextmanager
async def _connection(dsn: str) -> AsyncIterator[_bridge.Connection]:
    connection = await _bridge.connect(
        dsn, application_name="eventcore-trio test roles", connect_timeout=10.0
    )
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def deployment(postgres_dsn: str) -> Deployment:
    """Two login roles with passwords (so they connect as themselves, whatever the server's
    authentication): an owner that may create schemas, and a runtime role."""
    suffix = uuid.uuid4().hex[:12]
    owner, runtime = f"owner_{suffix}", f"runtime_{suffix}"
    owner_password, runtime_password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)

    async def create() -> None:
        async with _bridge.asyncio_loop(), _connection(postgres_dsn) as connection:
            database = await connection.fetchval("SELECT current_database()")
            await connection.execute(
                f"CREATE ROLE {owner} LOGIN PASSWORD '{owner_password}'; "
                f"CREATE ROLE {runtime} LOGIN PASSWORD '{runtime_password}'; "
                f'GRANT CREATE ON DATABASE "{database}" TO {owner}'
            )

    trio.run(create)
    return Deployment(
        schema=f"app_{suffix}",
        owner_dsn=dsn_with_credentials(postgres_dsn, owner, owner_password),
        runtime=runtime,
        runtime_dsn=dsn_with_credentials(postgres_dsn, runtime, runtime_password),
    )


def _printed_grants(deployment: Deployment) -> str:
    """What ``eventcore-trio migrate --grant ROLE --print`` prints (no database needed)."""
    out = io.StringIO()
    argv = ["migrate", "--schema", deployment.schema, "--grant", deployment.runtime, "--print"]
    with contextlib.redirect_stdout(out):
        assert main(argv) == EXIT_OK
    return out.getvalue()


async def _apply_printed_grants(deployment: Deployment) -> None:
    """The owner applies what ``migrate --grant ROLE --print`` printed, as with psql."""
    async with _bridge.asyncio_loop(), _connection(deployment.owner_dsn) as connection:
        await connection.execute(_printed_grants(deployment))


async def _migrated_and_granted(deployment: Deployment) -> None:
    """The owner migrates and applies the printed grants."""
    async with open_postgres_store(deployment.owner_dsn, schema=deployment.schema):
        pass
    await _apply_printed_grants(deployment)


async def _refused(connection: _bridge.Connection, sql: str, *args: object) -> None:
    with pytest.raises(DatabaseError) as refused:
        await connection.execute(sql, *args)
    assert refused.value.sqlstate == INSUFFICIENT_PRIVILEGE, (sql, refused.value)


@ONE_SERVER
def test_runtime_role_runs_the_store(
    deployment: Deployment,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """As the runtime role: migrate=True is a clear error until the owner migrates, then a
    no-op; appends of every kind, reads, checkpoints and a partitioned projection work,
    without the partition index, which the owner's `eventcore-trio migrate` then names and
    `--partition-index` builds."""
    trio.run(_open_as_runtime_before_the_owner_migrates, deployment)
    owner_migrate = ["migrate", "--dsn", deployment.owner_dsn, "--schema", deployment.schema]
    assert main(owner_migrate) == EXIT_OK
    trio.run(_apply_printed_grants, deployment)
    with caplog.at_level(logging.WARNING, logger="eventcore_trio.postgres"):
        assert not trio.run(_run_as_runtime_role, deployment)
    advice = f"eventcore-trio migrate --schema {deployment.schema} --partition-index 2"
    assert advice in caplog.text
    # The owner's plain migrate names the recorded count without its index and builds
    # nothing the runtime role could have invented (a review found it built an index per
    # count the projections table held); the advice builds it.
    capsys.readouterr()
    assert main(owner_migrate) == EXIT_OK
    assert advice in capsys.readouterr().out
    assert not trio.run(_has_partition_index, deployment)
    assert main([*owner_migrate, "--partition-index", "2"]) == EXIT_OK
    assert trio.run(_has_partition_index, deployment)
    assert advice not in capsys.readouterr().out


async def _open_as_runtime_before_the_owner_migrates(deployment: Deployment) -> None:
    with pytest.raises(ConfigurationError, match="as the schema's owner, or open the store"):
        async with open_postgres_store(deployment.runtime_dsn, schema=deployment.schema):
            pass


async def _run_as_runtime_role(deployment: Deployment) -> bool:
    """Everything a runtime role does; whether the partition index is there after."""
    async with open_postgres_store(deployment.runtime_dsn, schema=deployment.schema) as store:
        await _append_every_way(store)
        position = await store.last_position()
        assert position is not None
        await store.save_checkpoint("manual", position)
        assert await store.load_checkpoint("manual") == position
        applied: list[str] = []

        @projector("orders", partitions=2)
        async def orders(event: RecordedEvent, ctx: ProjectionContext) -> None:
            applied.append(event.stream_id)

        result = await run_projection(store, orders)
        assert result.events_applied == len(applied) == len(await _all(store))
        return await _partition_index(store)


async def _has_partition_index(deployment: Deployment) -> bool:
    async with open_postgres_store(deployment.runtime_dsn, schema=deployment.schema) as store:
        return await _partition_index(store)


async def _append_every_way(store: PostgresStore) -> None:
    await store.append("a", [NewEvent("Placed", {})])
    await store.append_atomic(
        [StreamAppend("b", [NewEvent("Placed", {})]), StreamAppend("c", [NewEvent("Placed", {})])]
    )
    with pytest.raises(VersionConflict):
        await store.append("a", [NewEvent("Placed", {})], expected_version=0)
    async with trio.open_nursery() as nursery:  # group commit: shared statements
        for n in range(12):
            nursery.start_soon(store.append, f"g{n % 4}", [NewEvent("Placed", {})])
    async with store.transaction() as tx:  # an id before the append: the floor's path
        await tx.fetchval("SELECT pg_current_xact_id()")
        await tx.append("a", [NewEvent("Placed", {})])
        await tx.append("b", [NewEvent("Placed", {})])
    async with store.transaction(isolation="repeatable read") as tx:  # announced at BEGIN
        await tx.fetchval("SELECT pg_current_xact_id()")
        await tx.append("a", [NewEvent("Placed", {})])
    assert [e.stream_version for e in await store.read_stream("a")] == [1, 2, 3]


async def _all(store: PostgresStore) -> list[RecordedEvent]:
    return await store.read_events(None, limit=1000)


async def _partition_index(store: PostgresStore) -> bool:
    return bool(
        await store.admin.fetchval(
            "SELECT EXISTS (SELECT FROM pg_indexes WHERE schemaname = $1 "
            "AND indexname = 'events_partition_2_idx')",
            store.schema,
        )
    )


@ONE_SERVER
async def test_runtime_role_cannot_write_events_by_hand_or_touch_other_schemas(
    deployment: Deployment,
) -> None:
    """No write on events or streams, no position drawn, none of the append functions'
    parts, no DDL, and no other store's schema; a malformed call of the append function
    writes nothing."""
    await _migrated_and_granted(deployment)
    other = f"{deployment.schema}_other"
    async with open_postgres_store(deployment.owner_dsn, schema=other):
        pass
    s = f'"{deployment.schema}"'
    async with (
        open_postgres_store(deployment.runtime_dsn, schema=deployment.schema) as store,
        _connection(deployment.runtime_dsn) as connection,
    ):
        await store.append("a", [NewEvent("Placed", {})])
        for sql in (
            f"INSERT INTO {s}.events (tx, stream_id, stream_version, event_id, type, data, "
            "metadata, stream_hash) VALUES (1, 'a', 2, gen_random_uuid(), 'Forged', '{}', "
            "'{}', 0)",
            f"UPDATE {s}.events SET type = 'Forged'",
            f"DELETE FROM {s}.events",
            f"TRUNCATE {s}.events",
            f"INSERT INTO {s}.streams VALUES ('z', 5)",
            f"UPDATE {s}.streams SET version = 9",
            f"DELETE FROM {s}.streams",
            f"TRUNCATE {s}.streams",
            f"SELECT nextval('{s}.events_position_seq')",
            f"SELECT {s}.begin_append(ARRAY['a'])",
            f"SELECT {s}.writer_floor(true)",
            f"SELECT {s}.mark('floor/1/1')",
            f"SELECT * FROM {s}.mark_secret",
            f"ALTER TABLE {s}.events DISABLE TRIGGER events_immutable",
            f"CREATE TABLE {s}.mine (x int)",
            f'SELECT * FROM "{other}".events',
            f"INSERT INTO \"{other}\".subscriptions (subscription_name) VALUES ('x')",
            f"SELECT * FROM \"{other}\".append_events(ARRAY['a'], ARRAY[NULL::bigint], "
            "ARRAY[1], NULL, NULL, NULL, ARRAY['Forged'], ARRAY['{}'::jsonb], NULL)",
        ):
            await _refused(connection, sql)
        # Versions out of step with the events (an offset past the stream's end): refused.
        with pytest.raises(DatabaseError) as malformed:
            await connection.execute(
                f"SELECT * FROM {s}.append_events(ARRAY['a'], ARRAY[NULL::bigint], ARRAY[1], "
                "ARRAY[1], ARRAY[5], NULL, ARRAY['Forged'], ARRAY['{}'::jsonb], NULL)"
            )
        assert malformed.value.sqlstate == "EV004"
        assert [e.type for e in await store.read_stream("a")] == ["Placed"]
        # Nor may it grant itself (or anyone) more: only the owner grants.
        with pytest.raises(ConfigurationError, match="does not own schema"):
            await store.admin.grant_runtime_role(deployment.runtime)


@ONE_SERVER
async def test_settings_set_by_hand_choose_no_transaction_id(deployment: Deployment) -> None:
    """The settings by which a transaction says it keeps a floor, or announced itself at its
    start, count only with a mark the owner's functions made for that very transaction: a
    floor set by hand (a tx far ahead, which would hide the stream's events and hold every
    reader back) is ignored, and so is an announcement set by hand (a tx behind readers)."""
    await _migrated_and_granted(deployment)
    s = deployment.schema
    async with open_postgres_store(deployment.runtime_dsn, schema=s) as store:
        sql, args = store.admin.append_statement([StreamAppend("a", [NewEvent("Placed", {})])])
        async with _connection(deployment.runtime_dsn) as connection:
            # Floors far ahead, in the setting's form and without a mark: ignored.
            far = 1 << 60
            for forged in (f"{far}/{'0' * 64}", str(far)):
                async with connection.transaction():
                    own = await connection.fetchval("SELECT pg_current_xact_id()::text::bigint")
                    await connection.execute(
                        "SELECT set_config($1, $2, true)", f"eventcore_trio.tx_floor_{s}", forged
                    )
                    row = await connection.fetchrow(sql, *args)
                    assert row is not None
                    assert own <= row["last_tx"] < far
            # An announcement set by hand after the transaction had its id: refused.
            for forged in (s, "0" * 64):
                await connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                try:
                    await connection.fetchval("SELECT pg_current_xact_id()")
                    await connection.execute(
                        "SELECT set_config('eventcore_trio.writer', $1, true)", forged
                    )
                    with pytest.raises(DatabaseError) as refused:
                        await connection.fetchrow(sql, *args)
                    assert refused.value.sqlstate == "EV003"
                finally:
                    await connection.rollback()
        assert [e.stream_version for e in await store.read_stream("a")] == [1, 2]


@ONE_SERVER
async def test_a_mark_replayed_after_a_savepoint_places_no_event_behind_a_reader(
    deployment: Deployment,
) -> None:
    """Found by a review of migration 5: a savepoint rolled back takes the writer lock of an
    announcement made in it, but a copy of its mark survives. Written back by hand before
    the transaction takes its id, it made the transaction's later append carry that id,
    which a reader had passed meanwhile (no lock held it back): an event behind the reader.
    Now the append claims a fresh id, whatever the settings say."""
    await _migrated_and_granted(deployment)
    s = deployment.schema
    async with open_postgres_store(deployment.runtime_dsn, schema=s) as store:
        sql, args = store.admin.append_statement([StreamAppend("late", [NewEvent("Late", {})])])
        await store.append("honest", [NewEvent("First", {})])
        async with _connection(deployment.runtime_dsn) as attacker:
            await attacker.execute("BEGIN")
            try:
                await attacker.execute("SAVEPOINT s")
                await attacker.execute(f"SELECT {s}.announce_writer()")
                mark = await attacker.fetchval("SELECT current_setting('eventcore_trio.writer')")
                await attacker.execute("ROLLBACK TO SAVEPOINT s")
                await attacker.execute("SELECT set_config('eventcore_trio.writer', $1, true)", mark)
                await attacker.fetchval("SELECT pg_current_xact_id()")  # its id, now
                # Meanwhile another append, and a reader that reads it.
                await store.append("honest", [NewEvent("Second", {})])
                passed = (await read_all(store))[-1]
                assert passed.type == "Second"
                await attacker.fetchrow(sql, *args)
                await attacker.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    await attacker.execute("ROLLBACK")
                raise
        late = (await store.read_stream("late"))[0]
        # After everything the reader had read, so a reader continuing from there gets it.
        assert late.position > passed.position
        after = await store.read_events(passed.position, limit=10)
        assert [e.type for e in after] == ["Late"]


def test_print_needs_grant(capsys: pytest.CaptureFixture[str]) -> None:
    """``migrate --print`` prints what ``--grant ROLE`` runs, so it needs one; its lines are
    `runtime_grants`, role and schema quoted."""
    assert main(["migrate", "--print"]) == EXIT_USAGE
    assert "--grant ROLE" in capsys.readouterr().err
    assert main(["migrate", "--schema", "shop", "--grant", 'we"ird', "--print"]) == EXIT_OK
    printed = capsys.readouterr().out.splitlines()
    assert printed == runtime_grants('we"ird', schema="shop")
    assert printed[0] == 'GRANT USAGE ON SCHEMA "shop" TO "we""ird";'
