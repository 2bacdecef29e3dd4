"""Tags and decisions over a query on PostgreSQL (issue 28, migration 8, decision record 14):
every write path keeps tags; who waits for whom, on real sessions; the transactions that had
an id before their tagged append; the bounds (keys per append, isolation, malformed calls).

The contract (`TaggedContract`, in `StoreContract`) and the query commands
(tests/commands/test_query_commands.py) run on PostgreSQL too; the interleaving explorer
checks the decisions in every order (tests/postgres/test_interleavings_dcb.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from eventcore_trio import (
    AppendCondition,
    AppendConditionFailed,
    ConfigurationError,
    DatabaseError,
    EventQuery,
    NewEvent,
    QueryItem,
    RecordedEvent,
    StreamAppend,
)
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.postgres._appends import AppendStatement
from eventcore_trio.postgres._bridge import Connection
from eventcore_trio.postgres._keys import tag_lock_space, writer_lock_key
from eventcore_trio.postgres._queries import QueryStatements
from eventcore_trio.projection import (
    FailureStrategy,
    ProjectionContext,
    projector,
    run_projection,
)
from eventcore_trio.testing import read_all


def _claim(name: str, **data: Any) -> NewEvent:
    return NewEvent("UsernameClaimed", {"name": name, **data}, tags=[f"username:{name}"])


def _username(name: str) -> EventQuery:
    return EventQuery.of(types=["UsernameClaimed"], tags=[f"username:{name}"])


async def _waiting(store: PostgresStore, space: str) -> bool:
    """Whether some session waits for one of the store's tag keys (*space* "tags") or for
    its writer lock ("writer")."""
    if space == "tags":
        classid, objsubid = tag_lock_space(store.schema) % 2**32, 2
        clause = "classid = $1::bigint::oid"
    else:
        key = writer_lock_key(store.schema) % 2**64
        classid, objsubid = key >> 32, 1
        clause = "classid = $1::bigint::oid"
    return bool(
        await store.admin.fetchval(
            "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            f"AND {clause} AND objsubid = $2 AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database()))",
            classid,
            objsubid,
        )
    )


async def _until_waiting(store: PostgresStore, space: str = "tags") -> None:
    """Until a session waits for a lock of *space* (a condition, polled: the wait happens
    inside the server)."""
    with trio.fail_after(10):
        while not await _waiting(store, space):  # noqa: ASYNC110  (a wait inside the server)
            await trio.sleep(0.005)


async def _finishes(call: Callable[[], Awaitable[object]]) -> object:
    """*call*'s result, which must come without waiting for anyone (bounded)."""
    with trio.fail_after(5):
        return await call()


class _Open:
    """A transaction held open on a connection of its own, appending raw statements."""

    def __init__(self, store: PostgresStore, connection: Connection) -> None:
        self.store = store
        self.connection = connection
        self.statement = AppendStatement(store.schema)

    async def begin(self, *, write_first: bool = False) -> None:
        await self.connection.execute("BEGIN")
        if write_first:
            # An id before the append, as the outbox's own row gives one.
            await self.connection.execute("SELECT pg_current_xact_id()")

    async def append(self, stream: str, *events: NewEvent) -> None:
        sql, args = self.statement([StreamAppend(stream, events)])
        await self.connection.fetchrow(sql, *args)

    async def commit(self) -> None:
        await self.connection.execute("COMMIT")


async def test_every_write_path_keeps_tags(store: PostgresStore) -> None:
    """Lone, multi-stream, group-commit, transaction and conditional appends: tags come
    back on every read path, and the tag table holds one row per tag and event."""
    await store.append("a", [NewEvent("A", {}, tags=["t:1", "t:2"])])
    await store.append_atomic(
        [
            StreamAppend("b", [NewEvent("B", {}, tags=["t:1"])]),
            StreamAppend("c", [NewEvent("C", {})]),
        ]
    )
    async with trio.open_nursery() as nursery:
        for n in range(8):
            nursery.start_soon(store.append, f"g{n}", [NewEvent("G", {}, tags=[f"g:{n}", "t:1"])])
    async with store.transaction() as tx:
        await tx.execute("SELECT 1")
        await tx.append("d", [NewEvent("D", {}, tags=["t:2"])])
    read = await store.read_query(_username("ada"))
    await store.append_tagged(
        [_claim("ada")],
        condition=AppendCondition(fail_if_events_match=_username("ada"), after=read.position),
    )
    every = await read_all(store)
    tags = {event.stream_id: event.tags for event in every}
    assert tags["a"] == ("t:1", "t:2")
    assert tags["b"] == ("t:1",)
    assert tags["c"] == ()
    assert all(tags[f"g{n}"] == (f"g:{n}", "t:1") for n in range(8))
    assert tags["d"] == ("t:2",)
    assert (await store.read_stream("a"))[0].tags == ("t:1", "t:2")
    rows = await store.admin.fetch(
        f'SELECT tag, count(*) AS n FROM "{store.schema}".event_tags GROUP BY tag ORDER BY tag'
    )
    counted = {row["tag"]: row["n"] for row in rows}
    assert counted["t:1"] == 10
    assert counted["t:2"] == 2
    assert counted["username:ada"] == 1
    t1 = await store.read_query(EventQuery.of(tags=["t:1"]))
    assert len(t1.events) == 10
    assert [e.position for e in t1.events] == sorted(e.position for e in t1.events)


async def test_a_decision_waits_only_for_writers_of_its_keys(store: PostgresStore) -> None:
    """An open transaction that appended a claim of "ada" holds its keys: a read of "ada"
    waits for its commit and then sees the claim; reads of "bob", of other types and other
    appends go on."""
    async with store.admin.connection("writer") as connection:
        writer = _Open(store, connection)
        await writer.begin()
        await writer.append("users", _claim("ada"))
        await _finishes(lambda: store.read_query(_username("bob")))
        await _finishes(lambda: store.read_query(EventQuery.of(types=["Other"])))
        await _finishes(lambda: store.append("x", [_claim("bob"), NewEvent("Other", {})]))
        result: list[Any] = []

        async def read_ada() -> None:
            result.append(await store.read_query(_username("ada")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_ada)
            await _until_waiting(store)
            assert result == []
            await writer.commit()
        [read] = result
        assert [e.data["name"] for e in read.events] == ["ada"]


async def test_a_late_outbox_fails_the_decision_it_overlaps(store: PostgresStore) -> None:
    """The issue's case: a decision read nothing; an outbox transaction that wrote first
    appends a matching event and commits while the decision appends: the decision waits for
    it, then fails, and only the outbox's claim is stored."""
    read = await store.read_query(_username("ada"))
    condition = AppendCondition(fail_if_events_match=_username("ada"), after=read.position)
    async with store.admin.connection("outbox") as connection:
        outbox = _Open(store, connection)
        await outbox.begin(write_first=True)
        await outbox.append("orders", NewEvent("OrderPlaced", {}), _claim("ada", by="outbox"))
        failed: list[AppendConditionFailed] = []

        async def decide() -> None:
            try:
                await store.append_tagged([_claim("ada", by="decision")], condition=condition)
            except AppendConditionFailed as exc:
                failed.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(decide)
            await _until_waiting(store)
            await outbox.commit()
    assert len(failed) == 1
    claims = (await store.read_query(_username("ada"))).events
    assert [e.data["by"] for e in claims] == ["outbox"]
    assert failed[0].positions == (str(claims[0].position),)


async def test_an_id_held_since_before_the_read_does_not_hide_the_event(
    store: PostgresStore,
) -> None:
    """A transaction appends an untagged event (its tx claimed then), others commit, a
    decision reads "ada" (its snapshot's xmax passes that claim), then the transaction
    appends a claim of "ada" and commits: the claim must sort after the read's position,
    so the decision fails. (With the earlier claim reused, it would sort below the
    position, and both claims would be stored.)"""
    async with store.admin.connection("outbox") as connection:
        outbox = _Open(store, connection)
        await outbox.begin(write_first=True)
        await outbox.append("orders", NewEvent("OrderPlaced", {}))
        for n in range(3):
            await store.append(f"other-{n}", [NewEvent("Other", {})])
        read = await store.read_query(_username("ada"))
        await outbox.append("orders", _claim("ada", by="outbox"))
        await outbox.commit()
    claim = (await store.read_query(_username("ada"))).events[0]
    assert read.position is not None
    assert claim.position > read.position
    with pytest.raises(AppendConditionFailed):
        await store.append_tagged(
            [_claim("ada", by="decision")],
            condition=AppendCondition(fail_if_events_match=_username("ada"), after=read.position),
        )


async def test_decisions_on_disjoint_keys_do_not_wait(store: PostgresStore) -> None:
    """A decision between its check and its commit (held open) blocks neither a decision
    over another username nor appends of other keys; an append carrying its key waits."""
    queries = QueryStatements(store.schema)
    statement = AppendStatement(store.schema)
    async with store.admin.connection("decision") as connection:
        encoded = statement.encode([StreamAppend("users", [_claim("ada")])])
        sql, args = queries.append(encoded, _username("ada"), None)
        await connection.execute("BEGIN")
        await connection.fetchrow(sql, *args)
        with trio.fail_after(5):
            bob = await store.read_query(_username("bob"))
            condition = AppendCondition(fail_if_events_match=_username("bob"), after=bob.position)
            await store.append_tagged([_claim("bob")], condition=condition)
        await _finishes(lambda: store.append("y", [NewEvent("UsernameClaimed", {}, tags=["x"])]))
        done = trio.Event()

        async def append_ada() -> None:
            await store.append("z", [_claim("ada", late=True)])
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(append_ada)
            await _until_waiting(store)
            assert not done.is_set()
            await connection.execute("COMMIT")
    claims = (await store.read_query(_username("ada"))).events
    assert [e.stream_id for e in claims] == ["users", "z"]


async def test_an_append_of_many_keys_takes_the_wide_key(store: PostgresStore) -> None:
    """An append carrying more than 128 keys takes one wide key exclusively instead of its
    keys: any decision's read waits for it (and then sees it), appends of other tags do not,
    and a second such append in another open transaction waits instead of deadlocking."""
    wide = NewEvent("Wide", {}, tags=[f"t:{n:02}" for n in range(64)])
    async with store.admin.connection("wide") as connection:
        writer = _Open(store, connection)
        await writer.begin()
        await writer.append("wide", wide)
        keys = await store.admin.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 "
            "AND classid = $1::bigint::oid",
            tag_lock_space(store.schema) % 2**32,
        )
        assert keys == 1
        await _finishes(lambda: store.append("other", [NewEvent("Other", {}, tags=["t:07"])]))
        result: list[Any] = []

        async def read() -> None:
            result.append(await store.read_query(EventQuery.of(tags=["t:07"])))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await _until_waiting(store)
            await writer.commit()
        assert sorted(e.stream_id for e in result[0].events) == ["other", "wide"]


async def test_an_old_clients_append_takes_its_type_key(store: PostgresStore) -> None:
    """Migration 5's append function (a client of an earlier version during an upgrade)
    takes its events' type keys too: a type-only decision waits for it."""
    async with store.admin.connection("old client") as connection:
        await connection.execute("BEGIN")
        await connection.fetchrow(
            f"SELECT * FROM \"{store.schema}\".append_events(ARRAY['s'], ARRAY[NULL::bigint], "
            "ARRAY[1], NULL, NULL, NULL, ARRAY['InvoiceIssued'], ARRAY['{}'::jsonb], NULL)"
        )
        result: list[Any] = []

        async def read() -> None:
            result.append(await store.read_query(EventQuery.of(types=["InvoiceIssued"])))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await _until_waiting(store)
            await connection.execute("COMMIT")
    assert [e.type for e in result[0].events] == ["InvoiceIssued"]


async def test_a_stricter_isolation_is_refused(store: PostgresStore) -> None:
    """A session whose transactions run at REPEATABLE READ by default: read_query is
    refused with a ConfigurationError that says why, not answered from an old snapshot."""
    queries = QueryStatements(store.schema)
    async with store.admin.connection("rr") as connection:
        await connection.execute("SET default_transaction_isolation TO 'repeatable read'")
        sql, args = queries.read(_username("ada"), None, None)
        with pytest.raises(ConfigurationError, match="READ COMMITTED"):
            await connection.fetch(sql, *args)


async def test_malformed_calls_are_refused(store: PostgresStore) -> None:
    """The functions check what they are given: no branches, or arrays of other sizes."""
    s = f'"{store.schema}"'
    for sql in [
        f"SELECT * FROM {s}.read_query('{{}}', '{{}}', '{{}}', 0, 0, NULL)",
        f"SELECT * FROM {s}.read_query(ARRAY['a'], '{{}}', ARRAY[''], 0, 0, NULL)",
        f"SELECT * FROM {s}.append_events(ARRAY['s'], ARRAY[NULL::bigint], ARRAY[1], NULL, "
        "NULL, NULL, ARRAY['A'], ARRAY['{}'::jsonb], NULL, ARRAY['a', 'b'])",
    ]:
        with pytest.raises(DatabaseError) as raised:
            await store.admin.fetch(sql)
        assert raised.value.sqlstate == "EV004"
    assert await store.last_position() is None


async def test_a_query_with_many_items_and_types(store: PostgresStore) -> None:
    """A query of 64 items, some of many types: answered, in the global order."""
    for n in range(10):
        await store.append(f"s{n}", [NewEvent(f"T{n}", {"n": n}, tags=[f"k:{n % 3}"])])
    items = [QueryItem(types=[f"T{n}" for n in range(10)], tags=["k:1"])] + [
        QueryItem(types=[f"T{n}"]) for n in range(0, 10, 4)
    ] * 21
    result = await store.read_query(EventQuery(items[:64]))
    assert [e.data["n"] for e in result.events] == [0, 1, 4, 7, 8]


async def test_a_dead_letter_keeps_its_events_tags(store: PostgresStore) -> None:
    """A projection skips a tagged event: the dead letter shows the event with its tags."""
    await store.append("users", [_claim("ada")])

    @projector("refuses", on_error=lambda failure: FailureStrategy.SKIP)
    async def refuses(event: RecordedEvent, ctx: ProjectionContext) -> None:
        raise ValueError("no")

    await run_projection(store, refuses)
    [letter] = await store.dead_letters("refuses")
    assert isinstance(letter.event, RecordedEvent)
    assert letter.event.tags == ("username:ada",)
