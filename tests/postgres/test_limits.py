"""Size limits on what reaches and leaves PostgreSQL: one append's encoded size, the shared
statements of group commit, and JSON nested too deeply to decode.

Limits are set small (`LIMIT`, 1 MiB) so that the payloads stay cheap; each test runs on one
server, since nothing here depends on the version.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from eventcore_trio import (
    AppendResult,
    AppendTooLarge,
    ConfigurationError,
    EventDecodeError,
    EventEncodeError,
    NewEvent,
    RecordedEvent,
    StoreConnectionError,
    StreamAppend,
    UndecodableEvent,
)
from eventcore_trio.postgres import PostgresStore, open_postgres_store
from eventcore_trio.postgres._keys import writer_lock_key
from eventcore_trio.projection import FailureStrategy, ProjectionContext, projector, run_projection
from eventcore_trio.testing import PostgresHarness

from ..conftest import oldest_server_param
from .test_group_commit import held_in_flight, patient_queue  # noqa: F401 (a fixture)

LIMIT = 1024 * 1024

one_server = pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)

# What one event of `sized` adds to an append beside its blob: '{"b":""}', "{}" and "E".
_OVERHEAD = len('{"b":""}') + len("{}") + len("E")


def sized(size: int) -> NewEvent:
    """An event that counts exactly *size* bytes against the limit."""
    return NewEvent("E", {"b": "x" * (size - _OVERHEAD)})


@pytest.fixture
async def limited(postgres_dsn: str) -> AsyncIterator[PostgresStore]:
    """A store with a limit of `LIMIT` bytes per append, and one pooled connection."""
    harness = PostgresHarness(
        postgres_dsn, max_append_bytes=LIMIT, min_pool_size=1, max_pool_size=1
    )
    async with harness.open_store() as store:
        yield store


@one_server
async def test_an_append_over_the_limit_is_refused_before_any_io(
    limited: PostgresStore,
) -> None:
    """Over the limit, append, append_atomic and an outbox append raise AppendTooLarge
    without a connection (the pool's only one is taken meanwhile), and the outbox
    transaction goes on as if the call had not been made."""
    store = limited
    half = sized(LIMIT // 2)
    with trio.fail_after(10):  # an append that waited for the pool would hang here
        async with store.admin.acquire():
            with pytest.raises(AppendTooLarge) as raised:
                await store.append("big", [half, half, half])
            # Counting stopped at the second event, which passed the limit.
            assert (raised.value.size, raised.value.limit) == (len("big") + LIMIT, LIMIT)
            assert "max_append_bytes" in str(raised.value)
            with pytest.raises(AppendTooLarge):
                await store.append_atomic(
                    [StreamAppend("big-1", [half]), StreamAppend("big-2", [half])]
                )
    async with store.transaction() as tx:
        with pytest.raises(AppendTooLarge):
            await tx.append("big", [half, half, half])
        await tx.append("small", [NewEvent("E", {})])
    for stream in ("big", "big-1", "big-2"):
        assert await store.read_stream(stream) == []
    assert len(await store.read_stream("small")) == 1


@one_server
async def test_an_append_at_the_limit_is_written_and_one_byte_more_is_not(
    limited: PostgresStore,
) -> None:
    """The limit counts stream ids, type names, data and metadata as UTF-8: an append of
    exactly that many bytes is stored, one byte more is refused with its exact size."""
    streams = ("at-limit-é", "other")  # é: two bytes in UTF-8
    first = len(streams[0].encode()) + 300_000
    second = LIMIT - first - len(streams[1])
    exact = [StreamAppend(streams[0], [sized(300_000)]), StreamAppend(streams[1], [sized(second)])]
    await limited.append_atomic(exact)
    assert [len(await limited.read_stream(s)) for s in streams] == [1, 1]
    with pytest.raises(AppendTooLarge) as raised:
        await limited.append_atomic(
            [StreamAppend(streams[0], [sized(300_000)]), StreamAppend("others", [sized(second)])]
        )
    assert (raised.value.size, raised.value.limit) == (LIMIT + 1, LIMIT)
    assert await limited.read_stream("others") == []


@pytest.mark.parametrize("value", [0, -1, 1.5, "1", True, 512 * 1024 * 1024 + 1])
async def test_max_append_bytes_must_be_a_positive_int_up_to_512_mib(value: object) -> None:
    """A limit that is not an int from 1 to 512 MiB is a ConfigurationError before any I/O
    (the DSN points at a closed port)."""
    with pytest.raises(ConfigurationError, match="max_append_bytes"):
        async with open_postgres_store(
            "postgresql://postgres@127.0.0.1:1/postgres",
            max_append_bytes=value,  # type: ignore[arg-type]
        ):
            pytest.fail("opened with an invalid max_append_bytes")


async def _writers_of(store: PostgresStore) -> list[list[str]]:
    # The streams each transaction wrote, by the rows' xmin: events written by one statement
    # share it, whatever their positions say.
    rows = await store.admin.fetch(
        f'SELECT array_agg(stream_id ORDER BY stream_id) AS streams FROM "{store.schema}".events '
        "WHERE stream_id <> 'blocker' GROUP BY xmin::text"
    )
    return [list(row["streams"]) for row in rows]


@one_server
@pytest.mark.usefixtures("patient_queue")
async def test_a_shared_statement_stays_within_the_limit(postgres_dsn: str) -> None:
    """Eight callers with large events and one with a tiny one, queued together: each is
    written once with its own result, and no shared statement carries more than the limit
    (they went out as one 2.4 MiB statement before)."""
    sizes = {f"large-{k}": 300_000 for k in range(8)} | {"tiny": 100}
    results: dict[str, AppendResult] = {}

    async def append(stream: str) -> None:
        results[stream] = await store.append(stream, [sized(sizes[stream])], expected_version=0)

    async with PostgresHarness(postgres_dsn, max_append_bytes=LIMIT).open_store() as store:
        async with trio.open_nursery() as nursery, held_in_flight(store) as queued:
            for count, stream in enumerate(sorted(sizes, key=lambda s: s != "large-0"), 1):
                nursery.start_soon(append, stream)
                await queued(count)
        for stream in sizes:
            [stored] = await store.read_stream(stream)
            assert results[stream].position == stored.position
        statements = await _writers_of(store)
        assert sorted(s for streams in statements for s in streams) == sorted(sizes)
        assert any(len(streams) > 1 for streams in statements)  # sharing still happens
        for streams in statements:
            assert sum(sizes[s] + len(s) for s in streams) <= LIMIT, statements


@one_server
@pytest.mark.usefixtures("patient_queue")
async def test_a_statement_refused_for_its_size_fails_only_the_request_that_caused_it(
    postgres_dsn: str,
) -> None:
    """A shared statement the server refuses for a resource its size exhausts (here
    temp_file_limit, SQLSTATE 53400) is sent again request by request: the large request
    gets its own error, the small ones sharing it are written, each once."""
    sep = "&" if "?" in postgres_dsn else "?"
    # The append sorts its events; with 64 kB of work_mem a 300 kB event spills to disk.
    dsn = f"{postgres_dsn}{sep}work_mem=64kB&temp_file_limit=200"
    outcomes: dict[str, AppendResult | Exception] = {}

    async def append(stream: str, size: int) -> None:
        try:
            outcomes[stream] = await store.append(stream, [sized(size)])
        except StoreConnectionError as exc:
            outcomes[stream] = exc

    async with PostgresHarness(dsn).open_store() as store:
        async with trio.open_nursery() as nursery, held_in_flight(store) as queued:
            for count, (stream, size) in enumerate([("small-1", 100), ("large", 300_000)], 1):
                nursery.start_soon(append, stream, size)
                await queued(count)
            nursery.start_soon(append, "small-2", 100)
            await queued(3)
        assert isinstance(outcomes["large"], StoreConnectionError)
        assert "temp_file_limit" in str(outcomes["large"])
        assert await store.read_stream("large") == []
        for stream in ("small-1", "small-2"):
            [stored] = await store.read_stream(stream)
            result = outcomes[stream]
            assert isinstance(result, AppendResult)
            assert result.position == stored.position


DEPTH = 2000


def _deep_json() -> str:
    return json.dumps({"deep": None}).replace("null", "[" * DEPTH + "]" * DEPTH)


async def _store_deep(store: PostgresStore, stream_id: str) -> None:
    # As another tool would write it, bypassing the append function (and announcing itself
    # as an event writer first, as anything that inserts events must).
    await store.admin.execute(
        f'INSERT INTO "{store.schema}".events '
        "(stream_id, stream_version, event_id, type, data, metadata, stream_hash) "
        "SELECT $1, 1, gen_random_uuid(), 'Deep', $3::jsonb, '{}', "
        f'"{store.schema}".stream_hash($1) '
        "FROM (SELECT pg_advisory_xact_lock_shared($2)) AS announced",
        stream_id,
        writer_lock_key(store.schema),
        _deep_json(),
    )


@one_server
async def test_json_nested_too_deeply_reads_as_undecodable(store: PostgresStore) -> None:
    """2,000 levels of nesting stored by another tool: read_events gives an
    UndecodableEvent (or EventDecodeError), never a RecursionError, and a projection that
    skips it applies the next event. The store's own append refuses such data."""
    nested: Any = None
    for _ in range(DEPTH):
        nested = [nested]
    with pytest.raises(EventEncodeError, match="nested too deeply"):
        await store.append("deep", [NewEvent("Deep", {"deep": nested})])
    await store.append("before", [NewEvent("Before", {})])
    await _store_deep(store, "deep")
    await store.append("after", [NewEvent("After", {})])

    events = await store.read_events(None, limit=10, undecodable="include")
    assert [e.type for e in events] == ["Before", "Deep", "After"]
    assert isinstance(events[1], UndecodableEvent)
    assert "nested too deeply" in events[1].error
    with pytest.raises(EventDecodeError):
        await store.read_events(None, limit=10)

    applied: list[str] = []

    @projector("deep", on_error=lambda failure: FailureStrategy.SKIP)
    async def deep(event: RecordedEvent, ctx: ProjectionContext) -> None:
        applied.append(event.type)

    await run_projection(store, deep)
    assert applied == ["Before", "After"]
    [letter] = await store.dead_letters("deep")
    assert isinstance(letter.event, UndecodableEvent)
