"""Projection versions on PostgreSQL, attacked (issue 27's review).

Each test states a promise of docs/projections.md ("Changing a projection: versions") and
checks it where it is easiest to break: a version with nothing to apply, schemas and setup
hooks created at once by two units, a retired version that a host still has, and the
statements the runtime adds while a version builds or serves.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import pytest
import trio

from eventcore_trio import (
    Database,
    EventFilter,
    InvalidArgument,
    NewEvent,
    ProjectionNotFound,
    ProjectionState,
    RecordedEvent,
)
from eventcore_trio._partitions import partition_of
from eventcore_trio._versions import VersionRole, read_model_schema_name
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.projection import (
    FailureStrategy,
    ProjectionConfig,
    ProjectionContext,
    projector,
    run_projection,
    run_projections,
)
from eventcore_trio.testing import PostgresHarness

from ..helpers import eventually


async def _create_totals(db: Database) -> None:
    await db.execute("CREATE TABLE IF NOT EXISTS totals (account text PRIMARY KEY, n bigint)")


def _totals(version: int, event_types: list[str], **options: Any) -> Any:
    @projector("totals", version=version, event_types=event_types, setup=_create_totals, **options)
    async def totals(event: RecordedEvent, ctx: ProjectionContext) -> None:
        ctx.db.queue(
            "INSERT INTO totals VALUES ($1, 1) "
            "ON CONFLICT (account) DO UPDATE SET n = totals.n + 1",
            event.stream_id,
        )

    return totals


async def _lock_waiter(store: PostgresStore, like: str) -> bool:
    # Another session of this test waits for a lock in a statement like *like*.
    return bool(
        await store.admin.fetchval(
            "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query ILIKE $1 AND pid <> pg_backend_pid())",
            like,
        )
    )


class TestServedSchemaIsReadable:
    """An application that reads through read_model_schema finds the serving version's
    tables: the tutorial's reader does ``SELECT ... FROM "{schema}".loans``."""

    async def test_a_version_with_nothing_to_apply_yet_serves_a_schema_without_tables(
        self, store: PostgresStore
    ) -> None:
        """A new projection whose events have not happened yet (a fresh deploy): it serves
        ("first") once it runs, but setup only runs in a batch of events, so the served
        schema does not exist and the reader's query fails."""
        await store.append("acc-1", [NewEvent("Opened", {})])
        await run_projection(store, _totals(1, ["Deposited"]))
        schema = await store.read_model_schema("totals")
        assert await store.admin.fetchval(f'SELECT count(*) FROM "{schema}".totals') == 0

    async def test_a_new_version_whose_events_never_happened_takes_over_without_tables(
        self, store: PostgresStore
    ) -> None:
        """Version 2 counts a new event type no one has appended yet: it is "caught up" at
        once and takes over, so readers move from version 1's complete read model to a
        schema that does not exist."""
        await store.append("acc-1", [NewEvent("Deposited", {})])
        await run_projection(store, _totals(1, ["Deposited"]))
        assert (
            await store.admin.fetchval(
                f'SELECT n FROM "{await store.read_model_schema("totals")}".totals'
            )
            == 1
        )
        await run_projection(store, _totals(2, ["Deposited2"]))
        assert await store.serving_version("totals") == 2
        schema = await store.read_model_schema("totals")
        assert await store.admin.fetchval(f'SELECT count(*) FROM "{schema}".totals') == 0

    async def test_a_version_without_setup_has_no_read_model_schema(
        self, store: PostgresStore
    ) -> None:
        """A projector from before versions (no setup: its tables on the connection's
        search_path) serves version 1: read_model_schema says it has no schema rather than
        naming one nothing created."""

        @projector("plain", event_types=["Deposited"])
        async def plain(event: RecordedEvent, ctx: ProjectionContext) -> None:
            pass

        await store.append("acc-1", [NewEvent("Deposited", {})])
        await run_projection(store, plain)
        # Not a name that points nowhere: a typed error saying why there is none.
        with pytest.raises(ProjectionNotFound, match="no read-model schema"):
            await store.read_model_schema("plain")


class TestCreatedAtOnce:
    """Every unit of a version creates its schema and runs setup: partitions (and hosts)
    do so at the same moment."""

    async def test_a_schema_another_unit_creates_at_the_same_moment(
        self, store: PostgresStore
    ) -> None:
        """Another unit of the version (held here on an admin connection) has created the
        schema but not committed yet when this unit's first batch creates it: the unit
        must go on once the other commits, not fail with a duplicate key."""
        await store.append("acc-1", [NewEvent("Deposited", {})])
        schema = read_model_schema_name(store.schema, "totals", 1)
        async with store.admin.acquire() as other:
            await other.begin()
            try:
                await other.execute(f'CREATE SCHEMA "{schema}"')
                with trio.fail_after(20):
                    async with trio.open_nursery() as nursery:
                        outcome: list[object] = []

                        async def run() -> None:
                            try:
                                outcome.append(
                                    await run_projection(store, _totals(1, ["Deposited"]))
                                )
                            except Exception as exc:
                                outcome.append(exc)

                        nursery.start_soon(run)
                        await eventually(lambda: _lock_waiter(store, "%CREATE SCHEMA%"))
                        await other.commit()
            finally:
                if other.in_transaction():
                    await other.rollback()
        assert not isinstance(outcome[0], Exception), repr(outcome[0])

    async def test_two_partitions_run_setup_at_the_same_moment(self, store: PostgresStore) -> None:
        """The docs: "every partition runs it: make it idempotent, CREATE TABLE IF NOT
        EXISTS". Two partitions' batches run it in two open transactions at once (two
        hosts starting together): the second waits for the first (the setup lock) and goes
        on; without the lock it failed with a duplicate key on pg_type."""
        create = "CREATE TABLE IF NOT EXISTS totals (account text PRIMARY KEY, n bigint)"

        async def setup(db: Database) -> None:
            await db.execute(create)

        first_done = trio.Event()
        async with (
            store.try_acquire("split[0/2]") as one,
            store.try_acquire("split[1/2]") as two,
            trio.open_nursery() as nursery,
        ):

            async def second() -> None:
                async with two.open_batch(read_model=True) as batch:
                    await batch.run_setup(setup)
                    assert first_done.is_set()

            async with one.open_batch(read_model=True) as batch:
                await batch.run_setup(setup)
                nursery.start_soon(second)
                # The other unit's setup is blocked while this transaction is open.
                await eventually(lambda: _lock_waiter(store, "%pg_advisory_xact_lock%"))
                first_done.set()
        schema = read_model_schema_name(store.schema, "split", 1)
        assert await store.admin.fetchval(f'SELECT count(*) FROM "{schema}".totals') == 0


class TestRetire:
    """Once retired, a version cannot be switched back to (docs)."""

    async def test_retiring_a_withdrawn_version_makes_it_build_again(
        self, store: PostgresStore
    ) -> None:
        """Version 2 served, the operator switched back to 1 (2 withdrawn) and retired 2.
        Retire takes 2 off the withdrawn list, so it is BUILDING again: any host that still
        has version 2 rebuilds it and it takes over on its own, undoing the switch back."""
        await store.append("acc-1", [NewEvent("Deposited", {})])
        last = await store.last_position()
        assert last is not None
        assert await store.version_role("totals", 1) is VersionRole.SERVING
        await store.save_checkpoint("totals", last)
        await store.save_checkpoint("totals@v2", last)
        units = [("totals@v2", EventFilter())]
        assert await store.switch_if_caught_up("totals", 2, units) is VersionRole.SERVING
        await store.serve_version("totals", 1)
        assert await store.version_role("totals", 2) is VersionRole.WITHDRAWN
        await store.retire_version("totals", 2)
        role = await store.version_role("totals", 2)
        assert not role.runs, f"a retired, withdrawn version is {role} again"

    async def test_a_host_that_still_has_a_retired_version_takes_over_again(
        self, harness: PostgresHarness
    ) -> None:
        """The same through the runtime: a host running version 2 (superseded by the switch
        back, waiting for it to serve again) resumes it after the retire."""
        async with harness.open_store() as store:
            await store.append("acc-1", [NewEvent("Deposited", {})])
            config = ProjectionConfig(poll_interval=0.05, balance=False)
            roles: list[VersionRole] = []
            asked = trio.Event()
            retired = False
            real_role = store.version_role

            async def version_role(name: str, version: int) -> VersionRole:
                role = await real_role(name, version)
                if retired and version == 2:
                    roles.append(role)
                    asked.set()
                return role

            store.version_role = version_role  # type: ignore[method-assign]
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    run_projections,
                    store,
                    [_totals(1, ["Deposited"]), _totals(2, ["Deposited"])],
                    config,
                )

                async def serving_is(version: int) -> bool:
                    return await store.serving_version("totals") == version

                await eventually(lambda: serving_is(2))
                await store.serve_version("totals", 1)

                async def v2_released() -> bool:
                    return any(
                        s.leader is None and s.state is ProjectionState.SUPERSEDED
                        for s in await store.projection_status()
                        if s.unit == "totals@v2"
                    )

                await eventually(v2_released)
                await store.retire_version("totals", 2, wait=True)
                retired = True
                with trio.fail_after(10):
                    await asked.wait()
                nursery.cancel_scope.cancel()
            assert not roles[0].runs, f"the host resumes retired version 2 ({roles[0]})"


class TestStatementsAdded:
    """The runtime's statements for versions: per poll_interval, not per event or wake."""

    @staticmethod
    def _count(store: PostgresStore, method: str) -> list[tuple[Any, ...]]:
        calls: list[tuple[Any, ...]] = []
        real = getattr(store, method)

        async def counted(*args: Any) -> Any:
            calls.append(args)
            return await real(*args)

        setattr(store, method, counted)
        return calls

    @staticmethod
    async def _wake_n_times(
        store: PostgresStore, unit: str, streams: Sequence[str], n: int
    ) -> None:
        # One event at a time, each appended once the unit waits for events (so that no
        # notification is lost) and applied before the next: one wake each.
        waiting = trio.Event()
        real_wait = store.wait_for_events

        async def wait_for_events() -> None:
            waiting.set()
            await real_wait()

        store.wait_for_events = wait_for_events  # type: ignore[method-assign]
        for i in range(n):
            with trio.fail_after(10):
                await waiting.wait()
            waiting = trio.Event()
            await store.append(streams[i % len(streams)], [NewEvent("Deposited", {})])
            last = await store.last_position()

            async def applied() -> bool:
                return await store.load_checkpoint(unit) == last  # noqa: B023

            await eventually(applied)

    async def test_a_serving_version_adds_no_statement_per_wake(self, store: PostgresStore) -> None:
        """Serving, with a long poll_interval: twenty wakes, no role query."""
        calls = self._count(store, "version_role")
        switches = self._count(store, "switch_if_caught_up")
        config = ProjectionConfig(poll_interval=60, balance=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_projections, store, [_totals(1, ["Deposited"])], config)
            await self._wake_n_times(store, "totals", ["acc-1"], 20)
            nursery.cancel_scope.cancel()
        # run_led asks once when the unit starts.
        assert len(calls) == 1
        assert switches == []

    async def test_a_caught_up_building_unit_locks_the_serving_row_on_every_wake(
        self, store: PostgresStore
    ) -> None:
        """Version 2 partition 0 is caught up while partition 1 has not run (a host of it
        is still starting, or rebuilding a large backlog): every wake of partition 0 runs a
        switch transaction (serving row FOR UPDATE, checkpoints, EXISTS probes), so a
        rebuild under steady writes adds one per event; poll_interval bounds nothing."""
        accounts = [f"acc-{i}" for i in range(64)]
        streams = [s for s in accounts if partition_of(s, 2).index == 0]
        behind = next(s for s in accounts if partition_of(s, 2).index == 1)
        # Partition 1 has an event to apply, so version 2 cannot take over.
        await store.append(behind, [NewEvent("Deposited", {})])
        assert await store.version_role("totals", 1) is VersionRole.SERVING
        switches = self._count(store, "switch_if_caught_up")
        # Partition 1 is far behind: its one event fails, and it waits a minute (outside
        # any transaction) before its retry.
        config = ProjectionConfig(
            poll_interval=0.5, balance=False, retry_initial_backoff=60, retry_max_backoff=60
        )

        @projector(
            "totals",
            version=2,
            event_types=["Deposited"],
            partitions=2,
            on_error=lambda failure: FailureStrategy.RETRY,
        )
        async def totals(event: RecordedEvent, ctx: ProjectionContext) -> None:
            if partition_of(event.stream_id, 2).index == 1:
                raise RuntimeError("partition 1 is behind")

        async with trio.open_nursery() as nursery:
            await nursery.start(run_projections, store, [totals], config)
            began = trio.current_time()
            switches.clear()
            await self._wake_n_times(store, "totals@v2[0/2]", streams, 20)
            took = trio.current_time() - began
            nursery.cancel_scope.cancel()
        assert await store.serving_version("totals") == 1
        # At most one check per poll_interval would be "no statement per wake".
        assert len(switches) <= took / config.poll_interval + 2, (
            f"{len(switches)} switch transactions for 20 events in {took:.2f}s"
        )


class TestWakes:
    """A caught-up unit wakes when an append commits (the LISTEN notification)."""

    async def test_an_append_during_the_switch_check_waits_for_the_poll(
        self, store: PostgresStore
    ) -> None:
        """A building version, caught up, runs its switch check (a transaction of several
        statements) between the read that found nothing and its wait for events. An append
        that commits, and notifies, during that check is missed by the wait that follows:
        the unit applies it only at the next poll_interval (here a minute)."""
        await store.append("acc-1", [NewEvent("Deposited", {})])
        assert await store.version_role("totals", 1) is VersionRole.SERVING

        async def wait_once(*, task_status: trio.TaskStatus[None]) -> None:
            # started() is no checkpoint: the wait has taken the listener's event when the
            # caller resumes, so the next notification (or the connect) ends it.
            task_status.started()
            await store.wait_for_events()

        async with trio.open_nursery() as nursery:
            await nursery.start(wait_once)  # starts LISTEN; returns once it listens
        real_switch = store.switch_if_caught_up
        appended = trio.Event()

        async def switch_if_caught_up(
            name: str, version: int, units: Sequence[tuple[str, EventFilter]]
        ) -> VersionRole:
            role = await real_switch(name, version, units)
            if not appended.is_set():
                # Another writer commits while this unit checks; its notification reaches
                # the store before the check returns.
                async with trio.open_nursery() as nursery:
                    await nursery.start(wait_once)
                    await store.append("acc-2", [NewEvent("Deposited", {})])
                appended.set()
            return role

        store.switch_if_caught_up = switch_if_caught_up  # type: ignore[method-assign]
        config = ProjectionConfig(poll_interval=60, balance=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_projections, store, [_totals(2, ["Deposited"])], config)
            with trio.fail_after(10):
                await appended.wait()
            last = await store.last_position()

            async def applied() -> bool:
                return await store.load_checkpoint("totals@v2") == last

            await eventually(applied, within=10)
            nursery.cancel_scope.cancel()


class TestBadInput:
    """Typed errors for versions that do not exist or cannot be."""

    @pytest.mark.parametrize("version", [0, -1, 1_000_001])
    async def test_bad_versions_everywhere(self, store: PostgresStore, version: int) -> None:
        for call in (
            store.serve_version("totals", version),
            store.retire_version("totals", version),
            store.version_role("totals", version),
        ):
            with pytest.raises(InvalidArgument, match="version"):
                await call

    async def test_a_versioned_name_is_not_a_projection_name_for_admin_calls(
        self, store: PostgresStore
    ) -> None:
        await store.append("acc-1", [NewEvent("Deposited", {})])
        await run_projection(store, _totals(1, ["Deposited"]))
        for call in (
            store.serve_version("totals@v2", 2),
            store.retire_version("totals@v2", 2),
            store.serving_version("totals@v2"),
            store.version_switches("totals@v2"),
        ):
            with pytest.raises(InvalidArgument, match="version"):
                await call

    async def test_unknown_versions_and_projections(self, store: PostgresStore) -> None:
        await store.append("acc-1", [NewEvent("Deposited", {})])
        await run_projection(store, _totals(1, ["Deposited"]))
        with pytest.raises(ProjectionNotFound):
            await store.serve_version("totals", 7)
        with pytest.raises(ProjectionNotFound):
            await store.retire_version("totals", 7)
        with pytest.raises(ProjectionNotFound):
            await store.serve_version(f"nope-{uuid.uuid4().hex[:6]}", 1)
        with pytest.raises(ProjectionNotFound):
            await store.read_model_schema("nope")
        assert await store.serving_version("nope") is None


class TestSchemaNames:
    """Read-model schema names: at most 63 bytes, distinct for distinct names, safe."""

    @pytest.mark.parametrize(
        ("store_schema", "name"),
        [
            ("s" * 63, "n" * 200),
            ('we"ird; DROP', "x'); DROP SCHEMA public CASCADE; --"),
            ("ÄÖÜ", "Ünïcödé-名前"),
        ],
    )
    def test_names_are_short_and_plain(self, store_schema: str, name: str) -> None:
        schema = read_model_schema_name(store_schema, name, 1_000_000)
        assert len(schema.encode()) <= 63
        assert all(c.isascii() and (c.isalnum() or c == "_") for c in schema)

    def test_names_that_slug_alike_do_not_share_a_schema(self) -> None:
        base = "a" * 30
        assert read_model_schema_name("s", base + "-x", 2) != read_model_schema_name(
            "s", base + "_x", 2
        )
        assert read_model_schema_name("Shop", "orders", 2) != read_model_schema_name(
            "shop", "orders", 2
        )

    async def test_an_odd_projection_name_runs_in_its_schema(self, store: PostgresStore) -> None:
        """A name with quotes, spaces and punctuation: the batch runs, its table lands in
        the version's schema, and nothing else is touched."""
        name = 'it\'s "odd"; -- totals'
        await store.append("acc-1", [NewEvent("Deposited", {})])

        @projector(name, version=3, event_types=["Deposited"], setup=_create_totals)
        async def odd(event: RecordedEvent, ctx: ProjectionContext) -> None:
            ctx.db.queue("INSERT INTO totals VALUES ($1, 1)", event.stream_id)

        await run_projection(store, odd)
        assert await store.serving_version(name) == 3
        schema = await store.read_model_schema(name)
        assert schema == read_model_schema_name(store.schema, name, 3)
        assert await store.admin.fetchval(f'SELECT n FROM "{schema}".totals') == 1
