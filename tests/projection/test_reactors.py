"""Reactors: events appended through ctx.append commit with the checkpoint, exactly once."""

from __future__ import annotations

import functools
import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from eventcore_trio import (
    Failure,
    FailureStrategy,
    InvalidArgument,
    NewEvent,
    ProjectionContext,
    RecordedEvent,
    Store,
    StreamAppend,
    VersionConflict,
    projector,
    run_projection,
)
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.testing import (
    BackendHarness,
    MemoryHarness,
    PostgresHarness,
    read_all,
    run_ready_process,
    wait_for_leader,
)

from ..helpers import eventually

REACTOR_SCRIPT = Path(__file__).parent.parent / "postgres" / "reactor_process.py"


async def reactions(store: Store) -> Counter[str]:
    """How many Reacted events each Paid event caused, by the Paid event's id."""
    return Counter(e.metadata["causation_id"] for e in await read_all(store) if e.type == "Reacted")


class ReactorContract:
    """ctx.append on every backend."""

    @pytest.fixture
    async def store(self, harness: BackendHarness) -> AsyncIterator[Store]:
        async with harness.open_store() as store:
            yield store

    async def test_each_event_reacts_once_with_causal_metadata(self, store: Store) -> None:
        """Each handled event appends its reaction in its batch, with its ids."""
        for n in range(7):
            await store.append(f"order-{n}", [NewEvent("Paid", {"n": n})])

        @projector("shipping", event_types=["Paid"])
        async def ship(event: RecordedEvent, ctx: ProjectionContext) -> None:
            result = await ctx.append(
                f"shipment-{event.stream_id}",
                [NewEvent("Reacted", {"n": event.data["n"]})],
                expected_version=0,
            )
            assert result.stream_versions == {f"shipment-{event.stream_id}": 1}

        await run_projection(store, ship)
        paid = {e.event_id: e for e in await read_all(store) if e.type == "Paid"}
        counts = await reactions(store)
        assert counts == Counter({str(i): 1 for i in paid})
        for event in await read_all(store):
            if event.type == "Reacted":
                cause = paid[uuid.UUID(event.metadata["causation_id"])]
                assert event.metadata["correlation_id"] == str(cause.event_id)
                assert event.data["n"] == cause.data["n"]
        # The reactions are events like any other: run again, nothing new is caused.
        await run_projection(store, ship)
        assert await reactions(store) == counts

    async def test_a_failed_batch_takes_its_reactions_with_it(self, store: Store) -> None:
        """A handler that fails after appending: the batch rolls back, its appends too; with
        RETRY it is applied again and the reaction exists once."""
        await store.append("order-1", [NewEvent("Paid", {})])
        attempts = 0

        def retry(failure: Failure) -> FailureStrategy:
            return FailureStrategy.RETRY

        @projector("flaky", event_types=["Paid"], on_error=retry)
        async def flaky(event: RecordedEvent, ctx: ProjectionContext) -> None:
            nonlocal attempts
            attempts += 1
            await ctx.append("reactions", [NewEvent("Reacted", {})])
            if attempts < 3:
                raise RuntimeError("downstream unavailable")

        await run_projection(store, flaky)
        assert attempts == 3
        assert sum((await reactions(store)).values()) == 1

    async def test_a_version_conflict_reaches_on_error(self, store: Store) -> None:
        """An expected version that does not hold fails the event, like any handler error."""
        await store.append("order-1", [NewEvent("Paid", {})])
        await store.append("taken", [NewEvent("Other", {})])
        errors: list[BaseException] = []

        def skip(failure: Failure) -> FailureStrategy:
            errors.append(failure.error)
            return FailureStrategy.SKIP

        @projector("conflicted", event_types=["Paid"], on_error=skip)
        async def conflicted(event: RecordedEvent, ctx: ProjectionContext) -> None:
            await ctx.append("taken", [NewEvent("Reacted", {})], expected_version=0)

        await run_projection(store, conflicted)
        assert len(errors) == 1
        assert isinstance(errors[0], VersionConflict)
        assert len(await store.read_stream("taken")) == 1

    async def test_several_streams_and_bad_arguments(self, store: Store) -> None:
        """append_atomic writes several streams at once; bad requests are refused."""
        await store.append("order-1", [NewEvent("Paid", {})])
        refused: list[BaseException] = []

        @projector("fanout", event_types=["Paid"])
        async def fanout(event: RecordedEvent, ctx: ProjectionContext) -> None:
            try:
                await ctx.append_atomic("not a list")  # type: ignore[arg-type]
            except InvalidArgument as exc:
                refused.append(exc)
            await ctx.append_atomic(
                [
                    StreamAppend("a", [NewEvent("Reacted", {})], expected_version=0),
                    StreamAppend("b", [NewEvent("Reacted", {})], expected_version=0),
                ]
            )

        await run_projection(store, fanout)
        assert len(refused) == 1
        assert [len(await store.read_stream(s)) for s in ("a", "b")] == [1, 1]


class TestMemoryReactors(ReactorContract):
    """Reactors on the in-memory store."""

    @pytest.fixture
    def harness(self) -> BackendHarness:
        return MemoryHarness()


class TestPostgresReactors(ReactorContract):
    """Reactors on PostgreSQL, including a host killed with SIGKILL mid-batch."""

    @pytest.fixture
    def harness(self, postgres_dsn: str) -> BackendHarness:
        return PostgresHarness(postgres_dsn)

    async def test_reactions_after_own_writes_are_never_skipped(self, store: Store) -> None:
        """A reactor that writes its read model through ctx.db first (its batch holds an
        id before it appends) while others append: a reader that passed those still reads
        the reactions, after them."""
        assert isinstance(store, PostgresStore)
        table = f'"{store.schema}".seen'
        await store.admin.execute(f"CREATE TABLE {table} (id uuid PRIMARY KEY)")
        await store.append("order-1", [NewEvent("Paid", {})])
        cursor: list[RecordedEvent] = []

        @projector("writer-first", event_types=["Paid"])
        async def react(event: RecordedEvent, ctx: ProjectionContext) -> None:
            await ctx.db.execute(f"INSERT INTO {table} VALUES ($1)", event.event_id)
            await store.append("elsewhere", [NewEvent("Other", {})])
            cursor.extend(await store.read_events(None, limit=10))
            await ctx.append("reactions", [NewEvent("Reacted", {})])

        await run_projection(store, react)
        assert [e.type for e in cursor] == ["Paid", "Other"]
        rest = await store.read_events(cursor[-1].position, limit=10)
        assert [e.type for e in rest] == ["Reacted"]

    async def test_kill_9_mid_batch_reacts_exactly_once(
        self, store: Store, harness: PostgresHarness
    ) -> None:
        """A reactor host killed with -9 while its batches append: the next leader applies
        the unfinished batch again, and every Paid event has exactly one reaction."""
        assert isinstance(store, PostgresStore)
        paid = 60
        for n in range(paid):
            await store.append(f"order-{n % 6}", [NewEvent("Paid", {"n": n})])
        argv = [sys.executable, str(REACTOR_SCRIPT), harness.schema, "0.02"]
        start = functools.partial(run_ready_process, argv, env={"EVENTCORE_DSN": harness.dsn})
        async with trio.open_nursery() as nursery:
            first = await nursery.start(start)
            with trio.fail_after(20):
                await wait_for_leader(store, "reactor")

            async def some_reacted() -> bool:
                return sum((await reactions(store)).values()) >= 10

            await eventually(some_reacted)
            # Mid-batch: batches of five, 20 ms a handler, each appending in its batch.
            first.send_signal(signal.SIGKILL)
            await nursery.start(start)

            async def all_reacted() -> bool:
                return sum((await reactions(store)).values()) >= paid

            await eventually(all_reacted, within=30)
            nursery.cancel_scope.cancel()
        counts = await reactions(store)
        assert len(counts) == paid
        assert set(counts.values()) == {1}, "a reaction was lost or duplicated"
