"""Concurrent appends share statements: each request keeps its own all-or-nothing outcome.

To make sharing certain rather than likely, a first append is held in flight (another session
holds its stream's row lock); appends made meanwhile queue, and go out together, in one
transaction, once it is released.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from eventcore_trio import (
    AppendResult,
    DuplicateEventId,
    NewEvent,
    StreamAppend,
    VersionConflict,
)
from eventcore_trio._positions import position_parts
from eventcore_trio.postgres import PostgresStore, _group_commit
from eventcore_trio.postgres._membership import hosts_channel
from eventcore_trio.postgres._schema import notify_channel

from ..helpers import eventually


@pytest.fixture
def patient_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued appends wait for the held statement instead of going out on their own after
    `STALLED_AFTER`, so that they share a statement for certain."""
    monkeypatch.setattr(_group_commit, "STALLED_AFTER", 60.0)


@asynccontextmanager
async def held_in_flight(
    store: PostgresStore,
) -> AsyncIterator[Callable[[int], Awaitable[None]]]:
    """An append to stream "blocker" in flight, blocked on a row lock held by another
    session; yields a function that waits until *count* appends queue behind it. The lock is
    released when the block ends."""
    await store.append("blocker", [NewEvent("Setup", {})])
    async with (
        store.admin.connection("eventcore-trio test row lock") as holder,
        trio.open_nursery() as nursery,
    ):
        await holder.begin()
        await holder.execute(
            f'SELECT 1 FROM "{store.schema}".streams WHERE stream_id = $1 FOR UPDATE', "blocker"
        )
        nursery.start_soon(store.append, "blocker", [NewEvent("Blocked", {})])

        async def blocked() -> bool:
            return bool(
                await store.admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%append_events%'"
                )
            )

        await eventually(blocked)

        async def queued(count: int) -> None:
            with trio.fail_after(10):
                while len(store._group_commit._queue) < count:
                    await trio.testing.wait_all_tasks_blocked()

        yield queued
        await holder.rollback()


async def _transaction_of(store: PostgresStore, stream: str) -> set[int]:
    return {position_parts(e.position)[0] for e in await store.read_stream(stream)}


@pytest.mark.usefixtures("patient_queue")
async def test_queued_appends_share_one_transaction_with_their_own_results(
    store: PostgresStore,
) -> None:
    results: dict[str, AppendResult] = {}

    async def append(stream: str, count: int) -> None:
        results[stream] = await store.append(
            stream, [NewEvent("E", {"n": n}) for n in range(count)], expected_version=0
        )

    async with trio.open_nursery() as nursery, held_in_flight(store) as queued:
        for k in range(6):
            nursery.start_soon(append, f"s{k}", k + 1)
        await queued(6)
    transactions = set().union(*[await _transaction_of(store, f"s{k}") for k in range(6)])
    assert len(transactions) == 1
    for k in range(6):
        stored = await store.read_stream(f"s{k}")
        assert [e.data["n"] for e in stored] == list(range(k + 1))
        assert results[f"s{k}"].stream_versions == {f"s{k}": k + 1}
        assert results[f"s{k}"].position == stored[-1].position


@pytest.mark.usefixtures("patient_queue")
async def test_a_conflict_refuses_only_its_own_request(store: PostgresStore) -> None:
    await store.append("taken", [NewEvent("E", {})])
    outcomes: dict[str, Any] = {}

    async def append(stream: str, expected: int) -> None:
        try:
            outcomes[stream] = await store.append(
                stream, [NewEvent("E", {"to": stream})], expected_version=expected
            )
        except VersionConflict as exc:
            outcomes[stream] = exc

    async with trio.open_nursery() as nursery, held_in_flight(store) as queued:
        nursery.start_soon(append, "fresh-1", 0)
        nursery.start_soon(append, "taken", 0)
        nursery.start_soon(append, "fresh-2", 0)
        await queued(3)
    conflict = outcomes["taken"]
    assert isinstance(conflict, VersionConflict)
    assert (conflict.stream_id, conflict.expected, conflict.actual) == ("taken", 0, 1)
    assert len(await store.read_stream("taken")) == 1
    assert len(await store.read_stream("fresh-1")) == 1
    assert len(await store.read_stream("fresh-2")) == 1


@pytest.mark.usefixtures("patient_queue")
async def test_one_stream_twice_in_a_shared_statement_applies_in_order(
    store: PostgresStore,
) -> None:
    outcomes: list[Any] = []

    async def append(expected: int, tag: str) -> None:
        try:
            outcomes.append(
                await store.append("twice", [NewEvent(tag, {})], expected_version=expected)
            )
        except VersionConflict as exc:
            outcomes.append(exc)

    async with trio.open_nursery() as nursery, held_in_flight(store) as queued:
        # Queued in this order; shared requests apply in queue order.
        for count, (expected, tag) in enumerate(((0, "First"), (1, "Second"), (1, "Late")), 1):
            nursery.start_soon(append, expected, tag)
            await queued(count)
    assert [e.type for e in await store.read_stream("twice")] == ["First", "Second"]
    assert sum(isinstance(o, VersionConflict) for o in outcomes) == 1


@pytest.mark.usefixtures("patient_queue")
async def test_a_multi_stream_request_stays_atomic_when_shared(store: PostgresStore) -> None:
    await store.append("b", [NewEvent("E", {})])
    outcomes: dict[str, Any] = {}

    async def atomic(name: str, expected_b: int) -> None:
        try:
            outcomes[name] = await store.append_atomic(
                [
                    StreamAppend(f"a-{name}", [NewEvent("E", {})], expected_version=0),
                    StreamAppend("b", [NewEvent("E", {"by": name})], expected_version=expected_b),
                ]
            )
        except VersionConflict as exc:
            outcomes[name] = exc

    async with trio.open_nursery() as nursery, held_in_flight(store) as queued:
        nursery.start_soon(atomic, "wins", 1)
        await queued(1)
        nursery.start_soon(atomic, "loses", 1)
        await queued(2)
    assert isinstance(outcomes["loses"], VersionConflict)
    assert await store.read_stream("a-loses") == []
    assert [e.data.get("by") for e in await store.read_stream("b")] == [None, "wins"]
    assert len(await store.read_stream("a-wins")) == 1


@pytest.mark.usefixtures("patient_queue")
async def test_a_duplicate_event_id_fails_only_its_own_request(store: PostgresStore) -> None:
    used = uuid.uuid4()
    await store.append("first", [NewEvent("E", {}, event_id=used)])
    outcomes: dict[str, Any] = {}

    async def append(stream: str, event_id: uuid.UUID | None) -> None:
        try:
            outcomes[stream] = await store.append(stream, [NewEvent("E", {}, event_id=event_id)])
        except DuplicateEventId as exc:
            outcomes[stream] = exc

    async with trio.open_nursery() as nursery, held_in_flight(store) as queued:
        nursery.start_soon(append, "ok-1", None)
        nursery.start_soon(append, "dup", used)
        nursery.start_soon(append, "ok-2", None)
        await queued(3)
    assert isinstance(outcomes["dup"], DuplicateEventId)
    assert await store.read_stream("dup") == []
    assert len(await store.read_stream("ok-1")) == 1
    assert len(await store.read_stream("ok-2")) == 1


@pytest.mark.usefixtures("patient_queue")
async def test_a_caller_cancelled_while_queued_writes_nothing(store: PostgresStore) -> None:
    scope = trio.CancelScope()

    async def cancelled_append() -> None:
        with scope:
            await store.append("dropped", [NewEvent("E", {})])

    async with trio.open_nursery() as nursery, held_in_flight(store) as queued:
        nursery.start_soon(store.append, "kept", [NewEvent("E", {})])
        await queued(1)
        nursery.start_soon(cancelled_append)
        await queued(2)
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert len(store._group_commit._queue) == 1
    assert await store.read_stream("dropped") == []
    assert len(await store.read_stream("kept")) == 1


async def test_a_stalled_statement_does_not_hold_up_other_streams(store: PostgresStore) -> None:
    """An append waiting for a lock held elsewhere keeps the statement slot; appends to other
    streams go out on their own after STALLED_AFTER instead of waiting for it."""
    async with held_in_flight(store):
        with trio.fail_after(5):
            await store.append("elsewhere", [NewEvent("E", {})])
        assert len(await store.read_stream("blocker")) == 1  # still held, not written yet
    assert len(await store.read_stream("blocker")) == 2


async def test_many_concurrent_writers_lose_nothing(store: PostgresStore) -> None:
    """Writers racing on shared and own streams: every append is stored exactly once, in
    each writer's order, and every stream's versions are gap-free."""

    writers = 8

    async def writer(w: int) -> None:
        for n in range(40):
            await store.append(f"shared-{n % 3}", [NewEvent("E", {"w": w})])
            await store.append(f"own-{w}", [NewEvent("E", {"n": n})], expected_version=n)

    async with trio.open_nursery() as nursery:
        for w in range(writers):
            nursery.start_soon(writer, w)
    for s in range(3):
        versions = [e.stream_version for e in await store.read_stream(f"shared-{s}")]
        assert versions == list(range(1, len(versions) + 1))
    shared = [len(await store.read_stream(f"shared-{s}")) for s in range(3)]
    assert sum(shared) == writers * 40
    for w in range(writers):
        assert [e.data["n"] for e in await store.read_stream(f"own-{w}")] == list(range(40))


@asynccontextmanager
async def listening(store: PostgresStore) -> AsyncIterator[trio.Event]:
    """A task waiting for the store's next wake-up after its LISTEN is up; yields an event
    set when that wake-up comes."""
    woken = trio.Event()

    async def listen() -> None:
        # The first wait returns once the LISTEN connection is up (a connect wakes waiters).
        await store.wait_for_events()
        listening_up.set()
        await store.wait_for_events()
        woken.set()

    listening_up = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen)
        with trio.fail_after(10):
            await listening_up.wait()
        yield woken
        nursery.cancel_scope.cancel()


@pytest.fixture
async def failing_notify(store: PostgresStore) -> AsyncIterator[None]:
    """The NOTIFY after each append fails on the server, as any error on it would (a
    statement timeout, a full notification queue, pg_cancel_backend)."""
    with store.admin.failing_notifications():
        yield


@pytest.mark.usefixtures("patient_queue")
async def test_a_failed_notification_after_a_shared_commit_writes_each_request_once(
    store: PostgresStore, failing_notify: None
) -> None:
    """The shared statement committed; its NOTIFY failed. Every request is written exactly
    once, every caller gets its own committed result, and readers are woken anyway."""
    results: dict[str, AppendResult] = {}

    async def append(stream: str) -> None:
        results[stream] = await store.append(stream, [NewEvent("E", {})], expected_version=0)

    async with listening(store) as woken:
        async with trio.open_nursery() as nursery, held_in_flight(store) as queued:
            for k in range(8):
                nursery.start_soon(append, f"s{k}")
            await queued(8)
        with trio.fail_after(10):
            await woken.wait()
    assert len(await _transaction_of(store, "s0")) == 1
    for k in range(8):
        stored = await store.read_stream(f"s{k}")
        assert len(stored) == 1
        assert results[f"s{k}"].position == stored[0].position
    assert len(await store.read_stream("blocker")) == 2


async def test_a_failed_notification_after_a_lone_commit_is_no_failure(
    store: PostgresStore, failing_notify: None
) -> None:
    """A lone append whose NOTIFY fails returns its result: it committed."""
    async with listening(store) as woken:
        result = await store.append("lone", [NewEvent("E", {})], expected_version=0)
        with trio.fail_after(10):
            await woken.wait()
    [stored] = await store.read_stream("lone")
    assert result.position == stored.position


@pytest.mark.usefixtures("patient_queue")
async def test_a_stream_held_by_an_open_transaction_holds_up_only_its_own_request(
    store: PostgresStore,
) -> None:
    """Requests shared with one for a stream that an open outbox transaction holds are
    written at once; that request waits for the transaction, in its own caller's task,
    which can give up."""
    holding = trio.Event()
    release = trio.Event()
    gave_up = trio.Event()

    async def hold() -> None:
        async with store.transaction() as tx:
            await tx.append("held", [NewEvent("InTransaction", {})])
            holding.set()
            # Bounded, so that a shared statement stuck behind it ends and the test fails.
            with trio.move_on_after(15):
                await release.wait()

    async def held_append() -> None:
        with trio.move_on_after(0.5):
            await store.append("held", [NewEvent("Waiting", {})])
        gave_up.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        await holding.wait()
        async with held_in_flight(store) as queued:
            for k in range(7):
                nursery.start_soon(store.append, f"free-{k}", [NewEvent("E", {})])
            await queued(7)
            nursery.start_soon(held_append)
            await queued(8)

        async def all_free_written() -> bool:
            return all([len(await store.read_stream(f"free-{k}")) == 1 for k in range(7)])

        # Written while the transaction holding "held" is still open.
        await eventually(all_free_written, within=5)
        assert not release.is_set()
        with trio.fail_after(5):
            await gave_up.wait()
        release.set()
    assert [e.type for e in await store.read_stream("held")] == ["InTransaction"]


async def test_a_schema_name_too_long_for_a_plain_channel_still_wakes_readers(
    postgres_dsn: str,
) -> None:
    """A 60-character schema: the channel is shortened to fit PostgreSQL's limit, so
    appends notify (and do not fail) and readers wake."""
    from eventcore_trio.testing import PostgresHarness

    schema = "s" + uuid.uuid4().hex + "x" * 27
    assert len(schema) == 60
    async with PostgresHarness(postgres_dsn, schema=schema).open_store() as store:
        assert len(store.notify_channel.encode()) <= 63
        async with listening(store) as woken:
            await store.append("s", [NewEvent("E", {})])
            with trio.fail_after(10):
                await woken.wait()
        assert len(await store.read_stream("s")) == 1


@pytest.mark.parametrize("length", [1, 47, 48, 53, 54, 63])
def test_channel_names_always_fit(length: int) -> None:
    """Every valid schema name gives channels within PostgreSQL's 63 bytes, distinct from
    each other and from those of a schema that differs only after the kept characters."""
    schema = "s" * length
    other = "s" * (length - 1) + "t"
    names = {
        notify_channel(schema),
        hosts_channel(schema),
        notify_channel(other),
        hosts_channel(other),
    }
    assert len(names) == 4
    assert all(len(name.encode()) <= 63 for name in names)
    if length <= 47:
        assert hosts_channel(schema) == f"eventcore_{schema}_hosts"


@pytest.mark.usefixtures("patient_queue")
async def test_an_event_id_an_open_transaction_inserted_holds_up_only_its_own_request(
    store: PostgresStore,
) -> None:
    """A shared statement does not wait for another transaction on the unique event id
    either: a request reusing an id that an open transaction inserted (a retry of a command
    that an outbox transaction is still committing) waits alone, in its caller's task, which
    can give up; the request sharing its statement is written at once."""
    reused = uuid.uuid4()
    holding = trio.Event()
    release = trio.Event()
    gave_up = trio.Event()
    outcomes: dict[str, str] = {}

    async def hold() -> None:
        async with store.admin.connection("open outbox") as outbox:
            await outbox.execute("BEGIN")
            sql, args = store.admin.append_statement(
                [StreamAppend("held", [NewEvent("H", {}, event_id=reused)])]
            )
            await outbox.fetchrow(sql, *args)
            holding.set()
            # Bounded, so that a statement stuck behind it ends and the test fails.
            with trio.move_on_after(15):
                await release.wait()
            await outbox.execute("ROLLBACK")

    async def reuser() -> None:
        with trio.move_on_after(1.0):
            await store.append("reuser", [NewEvent("E", {}, event_id=reused)])
            outcomes["reuser"] = "written"
        gave_up.set()

    async def bystander() -> None:
        await store.append("bystander", [NewEvent("E", {})])
        outcomes["bystander"] = "written"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        await holding.wait()
        async with held_in_flight(store) as queued:
            nursery.start_soon(reuser)
            await queued(1)
            nursery.start_soon(bystander)
            await queued(2)

        async def bystander_written() -> bool:
            return len(await store.read_stream("bystander")) == 1

        # Written while the outbox transaction is still open.
        await eventually(bystander_written, within=5)
        assert not release.is_set()
        with trio.fail_after(5):
            await gave_up.wait()
        release.set()
    assert outcomes == {"bystander": "written"}
    assert await store.read_stream("reuser") == []
