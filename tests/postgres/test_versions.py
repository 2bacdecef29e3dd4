"""Projection versions on PostgreSQL (issue 27): what only this backend has.

The read-model schema of each version and the batch's ``search_path``, migration 7's
backfill, the serving row claimed by two sessions at once, the atomic switch, retire and
reset dropping a version's schema, and ``read_model_schema``. The contract tests
(`eventcore_trio.testing`) cover the rules both backends share.
"""

from __future__ import annotations

import uuid

import pytest
import trio

from eventcore_trio import (
    ConfigurationError,
    EventFilter,
    InvalidArgument,
    NewEvent,
    Position,
    ProjectionNotFound,
    ProjectionRunning,
    ProjectionState,
    open_postgres_store,
)
from eventcore_trio._partitions import Partition, partition_of
from eventcore_trio._positions import position_parts
from eventcore_trio._versions import VersionRole, read_model_schema_name
from eventcore_trio.postgres import PostgresLeadership, PostgresStore, _bridge
from eventcore_trio.postgres._pool import open_pool
from eventcore_trio.postgres._schema import _apply_migrations
from eventcore_trio.testing import PostgresHarness

from ..helpers import eventually


async def _schema_exists(store: PostgresStore, schema: str) -> bool:
    return bool(
        await store.admin.fetchval(
            "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)", schema
        )
    )


async def _write_read_model(store: PostgresStore, unit: str, value: str) -> None:
    # One read-model batch of *unit*: an unqualified table, created and written to.
    async with store.try_acquire(unit) as leadership:
        assert isinstance(leadership, PostgresLeadership)
        async with leadership.open_batch(read_model=True) as batch:
            await batch.db.execute("CREATE TABLE IF NOT EXISTS rm (v text PRIMARY KEY)")
            await batch.db.execute("INSERT INTO rm VALUES ($1)", value)


class TestReadModelSchema:
    """open_batch(read_model=True): a schema per version, first on the batch's search_path."""

    async def test_unqualified_names_land_in_the_versions_schema(
        self, store: PostgresStore
    ) -> None:
        """Two versions write the same unqualified table name, each into its own schema; the
        session's own path is back after the batch."""
        await _write_read_model(store, "orders", "one")
        await _write_read_model(store, "orders@v2[1/2]", "two")
        for version, value in ((1, "one"), (2, "two")):
            schema = read_model_schema_name(store.schema, "orders", version)
            rows = await store.admin.fetch(f'SELECT v FROM "{schema}".rm')
            assert [row["v"] for row in rows] == [value]
        async with store.try_acquire("orders") as leadership:
            assert isinstance(leadership, PostgresLeadership)
            async with leadership.open_batch(read_model=True) as batch:
                inside = await batch.db.fetchval("SELECT current_setting('search_path')")
            async with leadership.open_batch() as batch:
                plain = await batch.db.fetchval("SELECT current_setting('search_path')")
        schema = read_model_schema_name(store.schema, "orders", 1)
        assert inside.startswith(f'"{schema}", ')
        assert schema not in plain

    async def test_a_batch_without_statements_creates_the_schema_only(
        self, store: PostgresStore
    ) -> None:
        """The schema exists from the first read-model batch on, even one that wrote
        nothing (the setup hook then runs in it); a plain batch creates none."""
        schema = read_model_schema_name(store.schema, "quiet", 1)
        async with store.try_acquire("quiet") as leadership:
            assert isinstance(leadership, PostgresLeadership)
            async with leadership.open_batch():
                pass
            assert not await _schema_exists(store, schema)
            async with leadership.open_batch(read_model=True):
                pass
        assert await _schema_exists(store, schema)

    async def test_read_model_schema_follows_the_serving_version(
        self, store: PostgresStore
    ) -> None:
        """Unknown until a version runs, and while the serving version has no schema (no
        setup hook); then the serving version's schema, also after a switch by hand."""
        with pytest.raises(ProjectionNotFound, match="no version of projection 'orders'"):
            await store.read_model_schema("orders")
        assert await store.version_role("orders", 1) is VersionRole.SERVING
        with pytest.raises(ProjectionNotFound, match="no read-model schema"):
            await store.read_model_schema("orders")
        await _write_read_model(store, "orders", "one")
        assert await store.read_model_schema("orders") == read_model_schema_name(
            store.schema, "orders", 1
        )
        await _write_read_model(store, "orders@v2", "two")
        await store.save_checkpoint("orders@v2", await _last(store))
        await store.serve_version("orders", 2)
        assert await store.read_model_schema("orders") == read_model_schema_name(
            store.schema, "orders", 2
        )
        with pytest.raises(InvalidArgument, match="version"):
            await store.read_model_schema("orders@v2")


async def _last(store: PostgresStore) -> Position:
    if await store.last_position() is None:
        await store.append(f"s-{uuid.uuid4().hex[:6]}", [NewEvent("A", {})])
    position = await store.last_position()
    assert position is not None
    return position


class TestServingRow:
    """version_role: the first version asked about serves, whoever asks at once."""

    async def test_two_sessions_claiming_at_once(self, harness: PostgresHarness) -> None:
        """While one session's claim for version 2 is uncommitted, another asking about
        version 1 waits for it, then reads it: version 2 serves, one switch is recorded."""
        roles: list[VersionRole] = []
        async with harness.open_store() as store, harness.open_store() as other:

            async def ask() -> None:
                roles.append(await other.version_role("orders", 1))

            async def waiting() -> bool:
                return bool(
                    await store.admin.fetchval(
                        "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE "
                        "wait_event_type = 'Lock' AND query LIKE '%serving_versions%' "
                        "AND pid <> pg_backend_pid())"
                    )
                )

            async with store.admin.acquire() as connection:
                # The claim of another host, held uncommitted while this one asks.
                await connection.begin()
                try:
                    await connection.execute(
                        f'INSERT INTO "{store.schema}".serving_versions (name, version) '
                        "VALUES ('orders', 2)"
                    )
                    await connection.execute(
                        f'INSERT INTO "{store.schema}".version_switches (name, to_version, '
                        "reason) VALUES ('orders', 2, 'first')"
                    )
                    with trio.fail_after(10):
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(ask)
                            await eventually(waiting)
                            assert roles == []
                            await connection.commit()
                finally:
                    if connection.in_transaction():
                        await connection.rollback()
            assert roles == [VersionRole.SUPERSEDED]
            assert await other.version_role("orders", 2) is VersionRole.SERVING
            switches = await store.version_switches("orders")
            assert [(s.from_version, s.to_version, s.reason) for s in switches] == [
                (None, 2, "first")
            ]

    async def test_many_hosts_asking_at_once_record_one_first(
        self, harness: PostgresHarness
    ) -> None:
        """Stores asking about different versions of fresh projections at once: each
        projection gets exactly one serving version and one "first" switch."""
        names = [f"p{i}" for i in range(8)]
        async with harness.open_store() as a, harness.open_store() as b:
            seen: dict[tuple[str, int], VersionRole] = {}

            async def ask(store: PostgresStore, name: str, version: int) -> None:
                seen[name, version] = await store.version_role(name, version)

            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(ask, a, name, 1)
                    nursery.start_soon(ask, b, name, 2)
            for name in names:
                switches = await a.version_switches(name)
                assert len(switches) == 1
                winner = switches[0].to_version
                assert await a.serving_version(name) == winner
                assert seen[name, winner] is VersionRole.SERVING
                loser = 3 - winner
                expected = VersionRole.SUPERSEDED if loser == 1 else VersionRole.BUILDING
                assert seen[name, loser] is expected


class TestSwitch:
    """switch_if_caught_up: checked and recorded in one transaction."""

    async def test_switches_once_every_unit_caught_up(self, store: PostgresStore) -> None:
        """Behind on one partition: still building. Caught up on both: serving, the switch
        records the greatest checkpoint, version 1 is superseded and shown so."""
        # An "A" event in each of two partitions.
        streams = {partition_of(f"s-{i}", 2).index: f"s-{i}" for i in range(64)}
        for stream in streams.values():
            await store.append(stream, [NewEvent("A", {}), NewEvent("B", {})])
        last = await _last(store)
        assert await store.version_role("orders", 1) is VersionRole.SERVING
        await store.save_checkpoint("orders", last)
        units = [
            (f"orders@v2[{i}/2]", EventFilter(event_types={"A"}, partition=Partition(i, 2)))
            for i in range(2)
        ]
        assert await store.version_role("orders", 2) is VersionRole.BUILDING
        # One unit caught up, the other has applied nothing although events match.
        await store.save_checkpoint(units[0][0], last)
        assert await store.switch_if_caught_up("orders", 2, units) is VersionRole.BUILDING
        await store.save_checkpoint(units[1][0], last)
        assert await store.switch_if_caught_up("orders", 2, units) is VersionRole.SERVING
        assert await store.version_role("orders", 1) is VersionRole.SUPERSEDED
        switch = (await store.version_switches("orders"))[-1]
        assert (switch.from_version, switch.to_version, switch.reason) == (1, 2, "caught-up")
        assert switch.position == last
        status = {(r.name, r.version, r.partition): r for r in await store.projection_status()}
        old = status["orders", 1, None]
        assert (old.serving, old.state) == (False, ProjectionState.SUPERSEDED)
        new = status["orders", 2, 0]
        assert new.serving
        assert new.state is not ProjectionState.SUPERSEDED
        assert new.unit == "orders@v2[0/2]"

    async def test_a_unit_with_no_checkpoint_and_no_match_is_caught_up(
        self, store: PostgresStore
    ) -> None:
        """A filter no event matches: nothing to apply, so a version without checkpoints
        takes over, with no position."""
        await store.append("a-1", [NewEvent("A", {})])
        assert await store.version_role("orders", 1) is VersionRole.SERVING
        units = [("orders@v2", EventFilter(event_types={"Nothing"}))]
        assert await store.switch_if_caught_up("orders", 2, units) is VersionRole.SERVING
        assert (await store.version_switches("orders"))[-1].position is None

    async def test_a_checkpoint_ahead_of_the_store_is_not_caught_up(
        self, store: PostgresStore
    ) -> None:
        """A checkpoint beyond every position (restored from elsewhere) never counts as
        caught up, although no event follows it."""
        last = await _last(store)
        assert await store.version_role("orders", 1) is VersionRole.SERVING
        await store.admin.execute(
            f'INSERT INTO "{store.schema}".subscriptions (subscription_name, tx, position) '
            "VALUES ('orders@v2', $1, $2)",
            position_parts(last)[0] + 1_000_000,
            position_parts(last)[1],
        )
        units = [("orders@v2", EventFilter())]
        assert await store.switch_if_caught_up("orders", 2, units) is VersionRole.BUILDING

    async def test_units_of_another_version_are_refused(self, store: PostgresStore) -> None:
        """A unit list naming another version's units is a typed error."""
        with pytest.raises(InvalidArgument, match="not a unit of version 2"):
            await store.switch_if_caught_up("orders", 2, [("orders", EventFilter())])


class TestRetireAndReset:
    """retire_version and reset_projection drop the version's read-model schema."""

    async def test_retire_drops_everything_of_the_version(self, store: PostgresStore) -> None:
        """Serving version refused; a led unit refused; then rows, dead letters' unit,
        count and schema gone, the version withdrawn for good, and unknown afterwards."""
        last = await _last(store)
        assert await store.version_role("orders", 1) is VersionRole.SERVING
        await store.save_checkpoint("orders", last)
        await _write_read_model(store, "orders@v2[0/2]", "two")
        await store.save_checkpoint("orders@v2[0/2]", last)
        await store.admin.execute(
            f"INSERT INTO \"{store.schema}\".projections (name, partitions) VALUES ('orders@v2', 2)"
        )
        await store.serve_version("orders", 2)
        with pytest.raises(InvalidArgument, match="switch to another version first"):
            await store.retire_version("orders", 2)
        await store.serve_version("orders", 1)
        assert await store.version_role("orders", 2) is VersionRole.WITHDRAWN
        async with store.try_acquire("orders@v2[1/2]"):
            with pytest.raises(ProjectionRunning):
                await store.retire_version("orders", 2)
        await store.retire_version("orders", 2)
        schema = read_model_schema_name(store.schema, "orders", 2)
        assert not await _schema_exists(store, schema)
        left = await store.admin.fetchval(
            f'SELECT count(*) FROM "{store.schema}".subscriptions '
            "WHERE subscription_name LIKE 'orders@v2%'"
        )
        assert left == 0
        assert await store.recorded_partitions("orders") == 1
        assert await store.admin.fetchval(
            f"SELECT withdrawn FROM \"{store.schema}\".serving_versions WHERE name = 'orders'"
        ) == [2]
        assert await store.version_role("orders", 2) is VersionRole.WITHDRAWN
        with pytest.raises(ProjectionNotFound):
            await store.retire_version("orders", 2)
        with pytest.raises(ProjectionNotFound):
            await store.serve_version("orders", 2)
        assert await store.load_checkpoint("orders") == last

    async def test_reset_drops_the_schema_of_a_whole_projection(self, store: PostgresStore) -> None:
        """A whole reset drops the version's schema; one partition's reset leaves it."""
        await _write_read_model(store, "orders@v3[0/2]", "x")
        await store.save_checkpoint("orders@v3[0/2]", await _last(store))
        await store.admin.execute(
            f"INSERT INTO \"{store.schema}\".projections (name, partitions) VALUES ('orders@v3', 2)"
        )
        schema = read_model_schema_name(store.schema, "orders", 3)
        await store.reset_projection("orders@v3[0/2]")
        assert await _schema_exists(store, schema)
        await store.reset_projection("orders@v3")
        assert not await _schema_exists(store, schema)


class TestMigration:
    """Migration 7 on a schema an older library (version 6) left, with projections."""

    async def test_projections_that_ran_before_serve_version_1(self, postgres_dsn: str) -> None:
        """Every projection with checkpoint rows or a recorded count serves version 1 (its
        partition suffix stripped), with a "first" switch at its greatest checkpoint; the
        rows themselves stay; a new version then builds beside it."""
        schema = f"t_{uuid.uuid4().hex[:12]}"
        async with _bridge.asyncio_loop():
            async with open_pool(
                postgres_dsn, min_size=1, max_size=1, application_name="m", connect_timeout=10
            ) as pool:
                assert await _apply_migrations(pool, schema, 6) == 6
                await pool.execute(
                    f'INSERT INTO "{schema}".subscriptions (subscription_name, tx, position) '
                    "VALUES ('orders', 5, 7), ('parts[0/2]', 9, 3), ('parts[1/2]', 9, 4), "
                    "('idle', NULL, NULL); "
                    f'INSERT INTO "{schema}".projections (name, partitions) '
                    "VALUES ('parts', 2), ('counted', 1)"
                )
            async with open_postgres_store(postgres_dsn, schema=schema) as store:
                for name in ("orders", "parts", "counted", "idle"):
                    assert await store.serving_version(name) == 1
                served = await store.admin.fetch(
                    f'SELECT name, version FROM "{schema}".serving_versions ORDER BY name'
                )
                assert [(r["name"], r["version"]) for r in served] == [
                    ("counted", 1),
                    ("idle", 1),
                    ("orders", 1),
                    ("parts", 1),
                ]
                first = {
                    name: await store.version_switches(name)
                    for name in ("orders", "parts", "counted")
                }
                assert {
                    name: [(s.from_version, s.to_version, s.position, s.reason) for s in found]
                    for name, found in first.items()
                } == {
                    "orders": [(None, 1, Position(5, 7), "first")],
                    "parts": [(None, 1, Position(9, 4), "first")],
                    "counted": [(None, 1, None, "first")],
                }
                kept = await store.admin.fetch(
                    f'SELECT subscription_name, tx, position FROM "{schema}".subscriptions '
                    "ORDER BY subscription_name"
                )
                assert [(r["subscription_name"], r["tx"], r["position"]) for r in kept] == [
                    ("idle", None, None),
                    ("orders", 5, 7),
                    ("parts[0/2]", 9, 3),
                    ("parts[1/2]", 9, 4),
                ]
                assert await store.recorded_partitions("parts") == 2
                assert await store.version_role("orders", 2) is VersionRole.BUILDING
                assert await store.version_role("orders", 1) is VersionRole.SERVING


class TestRuntimeRole:
    """A least-privilege runtime role (docs/operations.md, "Roles and grants")."""

    async def test_versions_as_the_runtime_role(self, postgres_dsn: str) -> None:
        """It claims, switches, serves and retires; it may not create a read-model schema
        (a typed error says what to do), but writes one its owner created for it."""
        harness = PostgresHarness(postgres_dsn, runtime_role=True)
        async with harness.open_store() as store:
            last = await _last(store)
            assert await store.version_role("orders", 1) is VersionRole.SERVING
            with pytest.raises(ConfigurationError, match="AUTHORIZATION"):
                await _write_read_model(store, "orders@v2", "two")
            schema = read_model_schema_name(store.schema, "orders", 2)
            roles = harness.roles
            assert roles is not None
            async with open_postgres_store(postgres_dsn, schema=store.schema) as admin:
                await admin.admin.execute(
                    f'CREATE SCHEMA "{schema}" AUTHORIZATION "{roles.runtime}"'
                )
            await _write_read_model(store, "orders@v2", "two")
            await store.save_checkpoint("orders@v2", last)
            units = [("orders@v2", EventFilter())]
            assert await store.switch_if_caught_up("orders", 2, units) is VersionRole.SERVING
            await store.save_checkpoint("orders", last)
            await store.serve_version("orders", 1)
            await store.retire_version("orders", 2)
            assert not await _schema_exists(store, schema)
