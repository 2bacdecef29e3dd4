"""Replaying dead letters on PostgreSQL: by the units the store records, each letter once.

The bug these tests pin: a replay given a projector with the old partition count (code from
before a 1 -> K split, or a script without ``partitions=``) took the unpartitioned name's
lock, which no running unit holds, applied every partition's letters through ``ctx.db`` and
deleted none of them, so a second replay applied them all again. Hosts here are real
processes (tests/postgres/dead_letter_host.py) writing what they apply through ``ctx.db``.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
import trio

from eventcore_trio import (
    DeadLetterNotFound,
    LeadershipLost,
    NewEvent,
    PartitionsMismatch,
    ProjectionRunning,
    RecordedEvent,
    partition_of,
)
from eventcore_trio._processes import run_ready_process
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.projection import (
    FailureStrategy,
    ProjectionContext,
    projector,
    replay_dead_letters,
    run_projection,
)
from eventcore_trio.testing import PostgresHarness, read_all

from ..helpers import eventually
from .dead_letter_host import wide

HOST_SCRIPT = Path(__file__).with_name("dead_letter_host.py")
STREAMS = [f"order-{i}" for i in range(10)]
# Two bad events before the split and two after, one in each partition of 2 each time.
BAD_BEFORE_SPLIT = {"order-0", "order-1"}
BAD_AFTER_SPLIT = {"order-2", "order-3"}


@pytest.fixture
async def store(postgres_dsn: str) -> AsyncIterator[PostgresStore]:
    async with PostgresHarness(postgres_dsn).open_store() as store:
        assert isinstance(store, PostgresStore)
        yield store


async def _create_app_schema(store: PostgresStore) -> str:
    app = f"app_{uuid.uuid4().hex[:10]}"
    await store.admin.execute(
        f'CREATE SCHEMA "{app}"; '
        f'CREATE TABLE "{app}".applied (id bigserial PRIMARY KEY, event_id uuid NOT NULL, '
        "stream_id text NOT NULL, partition int, partitions int NOT NULL, pid int NOT NULL)"
    )
    return app


async def _append_round(store: PostgresStore, bad: set[str]) -> None:
    for stream in STREAMS:
        await store.append(stream, [NewEvent("Placed", {"bad": stream in bad})])


async def _applied(store: PostgresStore, app: str) -> list[tuple[uuid.UUID, str, int | None, int]]:
    rows = await store.admin.fetch(
        f'SELECT event_id, stream_id, partition, partitions, pid FROM "{app}".applied ORDER BY id'
    )
    return [(r["event_id"], r["stream_id"], r["partition"], r["pid"]) for r in rows]


async def _bad_events(store: PostgresStore) -> list[RecordedEvent]:
    return [e for e in await read_all(store) if e.data["bad"]]


async def _start_host(
    nursery: trio.Nursery, dsn: str, schema: str, app: str, partitions: int
) -> int:
    """Start a host process in *nursery* (SIGKILLed when it is cancelled); its pid."""
    process: trio.Process = await nursery.start(
        partial(
            run_ready_process,
            [sys.executable, str(HOST_SCRIPT), schema, app, str(partitions)],
            env={"EVENTCORE_DSN": dsn},
            startup_limit=60,
        )
    )
    return process.pid


async def _running_split(store: PostgresStore, hosts: set[int]) -> bool:
    """Both units of the split projection are led, by the host processes."""
    units = [s for s in await store.projection_status() if s.name == "wide"]
    return [s.partitions for s in units] == [2, 2] and all(
        s.leader is not None and s.leader.pid in hosts for s in units
    )


async def _caught_up(store: PostgresStore, letters: int) -> bool:
    units = [s for s in await store.projection_status() if s.name == "wide"]
    return (
        len(units) == 2
        and all(s.checkpoint is not None and s.lag_events == 0 for s in units)
        and sum(s.dead_letters for s in units) == letters
    )


async def _unled(store: PostgresStore) -> bool:
    return await store.admin.lock_sessions(["wide", "wide[0/2]", "wide[1/2]"]) == {}


async def test_replay_with_the_old_count_never_applies_a_letter_twice(
    store: PostgresStore, postgres_dsn: str
) -> None:
    """While hosts run the split projection, a replay with the old count or the right one is
    refused and applies nothing; once they stop, the old count is still refused, and the
    right one applies each letter exactly once, in its partition, and deletes it."""
    app = await _create_app_schema(store)
    await _append_round(store, BAD_BEFORE_SPLIT)
    # The code before the split: one unit, which dead-letters two events.
    await run_projection(wide(app, 1, skip_bad=True), store)
    assert len(await store.dead_letters("wide")) == 2
    async with trio.open_nursery() as nursery:
        hosts = {await _start_host(nursery, postgres_dsn, store.schema, app, 2) for _ in range(2)}
        await eventually(lambda: _running_split(store, hosts), within=30)
        await _append_round(store, BAD_AFTER_SPLIT)
        await eventually(lambda: _caught_up(store, 4), within=30)
        letters = await store.dead_letters("wide")
        assert sorted(d.partition or 0 for d in letters) == [0, 0, 1, 1]
        for _ in range(2):
            with pytest.raises(PartitionsMismatch) as mismatch:
                await replay_dead_letters(wide(app, 1, skip_bad=False), store)
            assert (mismatch.value.recorded, mismatch.value.given) == (2, 1)
        with pytest.raises(ProjectionRunning):
            await replay_dead_letters(wide(app, 2, skip_bad=False), store)
        assert await store.dead_letters("wide") == letters
        assert await _running_split(store, hosts)
        nursery.cancel_scope.cancel()
    await eventually(lambda: _unled(store), within=10)
    bad = await _bad_events(store)
    assert len(bad) == 4
    applied = await _applied(store, app)
    assert {row[0] for row in applied}.isdisjoint(e.event_id for e in bad)

    # Nothing runs now: the old count is still refused, and applies nothing.
    with pytest.raises(PartitionsMismatch):
        await replay_dead_letters(wide(app, 1, skip_bad=False), store)
    assert await _applied(store, app) == applied
    assert await store.dead_letters("wide") == letters

    result = await replay_dead_letters(wide(app, 2, skip_bad=False), store)
    assert (result.replayed, result.failed) == (4, 0)
    assert await store.dead_letters("wide") == []
    replayed = (await _applied(store, app))[len(applied) :]
    assert Counter(row[0] for row in replayed) == Counter(e.event_id for e in bad)
    for _, stream_id, partition, pid in replayed:
        assert partition == partition_of(stream_id, 2).index
        assert pid == os.getpid()
    everything = [row[0] for row in await _applied(store, app)]
    assert sorted(everything) == sorted(e.event_id for e in await read_all(store))

    again = await replay_dead_letters(wide(app, 2, skip_bad=False), store)
    assert (again.replayed, again.failed) == (0, 0)
    assert len(await _applied(store, app)) == len(everything)


async def test_a_replay_whose_delete_matches_nothing_fails_and_writes_nothing(
    store: PostgresStore,
) -> None:
    """When a letter is gone by the time its replay resolves it (here an operator's DELETE
    from another session), the replay fails with DeadLetterNotFound and what the handler
    wrote through ctx.db is rolled back: the letter is never reported as replayed."""
    app = await _create_app_schema(store)
    await _append_round(store, BAD_BEFORE_SPLIT)
    await run_projection(wide(app, 2, skip_bad=True), store)
    letters = await store.dead_letters("wide")
    assert len(letters) == 2
    applied = await _applied(store, app)
    table = f'"{store.schema}".dead_letters'

    @projector("wide", partitions=2, on_error=lambda failure: FailureStrategy.SKIP)
    async def meddled(event: RecordedEvent, ctx: ProjectionContext) -> None:
        await ctx.db.execute(
            f'INSERT INTO "{app}".applied (event_id, stream_id, partition, partitions, pid) '
            "VALUES ($1, $2, $3, $4, $5)",
            event.event_id,
            event.stream_id,
            ctx.partition,
            ctx.partitions,
            os.getpid(),
        )
        # Another session deletes the letter before the batch resolves it.
        await store.admin.execute(f"DELETE FROM {table} WHERE event_id = $1", event.event_id)

    with pytest.raises(DeadLetterNotFound) as info:
        await replay_dead_letters(meddled, store)
    first = min(letters, key=lambda d: (d.partition or 0, d.position))
    assert info.value.dead_letter_id == first.id
    assert info.value.unit == f"wide[{first.partition}/2]"
    assert await _applied(store, app) == applied
    assert [d.id for d in await store.dead_letters("wide")] == [
        d.id for d in letters if d.id != first.id
    ]


async def test_a_replay_that_lost_its_lock_deletes_and_writes_nothing(
    store: PostgresStore,
) -> None:
    """The delete is fenced like a checkpoint: a handler that releases the unit's lock
    through ctx.db makes the replay fail with LeadershipLost, committing nothing."""
    app = await _create_app_schema(store)
    await _append_round(store, BAD_BEFORE_SPLIT)
    await run_projection(wide(app, 1, skip_bad=True), store)
    letters = await store.dead_letters("wide")
    assert len(letters) == 2
    applied = await _applied(store, app)

    @projector("wide", on_error=lambda failure: FailureStrategy.SKIP)
    async def unlocking(event: RecordedEvent, ctx: ProjectionContext) -> None:
        await ctx.db.execute(
            f'INSERT INTO "{app}".applied (event_id, stream_id, partition, partitions, pid) '
            "VALUES ($1, $2, NULL, 1, $3)",
            event.event_id,
            event.stream_id,
            os.getpid(),
        )
        await ctx.db.execute("SELECT pg_advisory_unlock_all()")

    with pytest.raises(LeadershipLost, match="no longer held"):
        await replay_dead_letters(unlocking, store)
    assert await _applied(store, app) == applied
    assert await store.dead_letters("wide") == letters
