"""Replaying dead letters on PostgreSQL: by the units the store records, each letter once.

The bug these tests pin: a replay given a projector with the old partition count (code from
before a 1 -> K split, or a script without ``partitions=``) took the unpartitioned name's
lock, which no running unit holds, applied every partition's letters through ``ctx.db`` and
deleted none of them, so a second replay applied them all again. Hosts here are real
processes (tests/postgres/dead_letter_host.py) writing what they apply through ``ctx.db``.

Further down: replays beside other replays, a waiting reset, a cancellation and a split,
each letter applied at most once; and a letter whose write the database refuses at COMMIT,
which fails again (kept and counted) instead of ending the replay.
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
from eventcore_trio._tools._processes import run_ready_process
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.projection import (
    FailureStrategy,
    ProjectionConfig,
    ProjectionContext,
    ReplayResult,
    projector,
    replay_dead_letters,
    run_projection,
    run_projections,
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
    await run_projection(store, wide(app, 1, skip_bad=True))
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
                await replay_dead_letters(store, wide(app, 1, skip_bad=False))
            assert (mismatch.value.recorded, mismatch.value.given) == (2, 1)
        with pytest.raises(ProjectionRunning):
            await replay_dead_letters(store, wide(app, 2, skip_bad=False))
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
        await replay_dead_letters(store, wide(app, 1, skip_bad=False))
    assert await _applied(store, app) == applied
    assert await store.dead_letters("wide") == letters

    result = await replay_dead_letters(store, wide(app, 2, skip_bad=False))
    assert (result.replayed, result.failed) == (4, 0)
    assert await store.dead_letters("wide") == []
    replayed = (await _applied(store, app))[len(applied) :]
    assert Counter(row[0] for row in replayed) == Counter(e.event_id for e in bad)
    for _, stream_id, partition, pid in replayed:
        assert partition == partition_of(stream_id, 2).index
        assert pid == os.getpid()
    everything = [row[0] for row in await _applied(store, app)]
    assert sorted(everything) == sorted(e.event_id for e in await read_all(store))

    again = await replay_dead_letters(store, wide(app, 2, skip_bad=False))
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
    await run_projection(store, wide(app, 2, skip_bad=True))
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
        await replay_dead_letters(store, meddled)
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
    await run_projection(store, wide(app, 1, skip_bad=True))
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
        await replay_dead_letters(store, unlocking)
    assert await _applied(store, app) == applied
    assert await store.dead_letters("wide") == letters


class Gate:
    """Holds a handler at its *at*-th call (and every later one) until opened."""

    def __init__(self, at: int = 1) -> None:
        self.calls = 0
        self.at = at
        self.reached = trio.Event()
        self.opened = trio.Event()

    async def through(self) -> None:
        self.calls += 1
        if self.calls >= self.at:
            self.reached.set()
            await self.opened.wait()


def replaying(
    app: str, partitions: int, *, gate: Gate | None = None, failing: frozenset[str] = frozenset()
) -> object:
    """The projector "wide" as a replay runs it: records each event through ctx.db (as
    `wide` does), passes *gate*, then fails the events of the streams in *failing*."""

    @projector("wide", partitions=partitions, on_error=lambda failure: FailureStrategy.SKIP)
    async def record(event: RecordedEvent, ctx: ProjectionContext) -> None:
        await ctx.db.execute(
            f'INSERT INTO "{app}".applied (event_id, stream_id, partition, partitions, pid) '
            "VALUES ($1, $2, $3, $4, $5)",
            event.event_id,
            event.stream_id,
            ctx.partition,
            ctx.partitions,
            os.getpid(),
        )
        if gate is not None:
            await gate.through()
        if event.stream_id in failing:
            raise ValueError(f"still cannot apply {event.stream_id}")

    return record


async def _letter_per_stream(
    store: PostgresStore, app: str, partitions: int
) -> dict[str, uuid.UUID]:
    """One bad event per stream, each dead-lettered by *partitions* units; their ids."""
    await _append_round(store, set(STREAMS))
    await run_projection(store, wide(app, partitions, skip_bad=True))
    letters = await store.dead_letters("wide")
    assert len(letters) == len(STREAMS)
    assert await _applied(store, app) == []
    return {d.event.stream_id: d.event.event_id for d in letters}


async def _applied_once(store: PostgresStore, app: str) -> Counter[uuid.UUID]:
    """How many times each event was applied; fails if one was applied twice."""
    applied = Counter(row[0] for row in await _applied(store, app))
    assert max(applied.values(), default=1) == 1, applied
    return applied


async def _any_led(store: PostgresStore, units: list[str]) -> bool:
    """One of *units* (or more) is led."""
    return bool(await store.admin.lock_sessions(units))


async def _waiting_for_lock(store: PostgresStore, role: str, unit: str) -> bool:
    """A session of *role* ("reset": see PostgresStore._acquire) waits for *unit*'s lock."""
    rows = await store.admin.fetch(
        "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND application_name LIKE '%' || $1",
        f" {role} {unit}",
    )
    return bool(rows)


async def test_two_replays_at_once_apply_each_letter_once(store: PostgresStore) -> None:
    """Of two replays started together, one takes every unit's lock and replays every
    letter once; the other is refused with ProjectionRunning, having applied nothing."""
    app = await _create_app_schema(store)
    letters = await _letter_per_stream(store, app, 4)
    gate = Gate()
    results: list[ReplayResult | ProjectionRunning] = []
    refused = trio.Event()

    async def replay() -> None:
        try:
            results.append(await replay_dead_letters(store, replaying(app, 4, gate=gate)))
        except ProjectionRunning as exc:
            results.append(exc)
            refused.set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replay)
            nursery.start_soon(replay)
            # The winner waits at the gate in its first letter, holding every lock.
            await gate.reached.wait()
            await refused.wait()
            assert gate.calls == 1
            gate.opened.set()
    assert isinstance(results[0], ProjectionRunning)
    assert isinstance(results[1], ReplayResult)
    assert (results[1].replayed, results[1].failed) == (len(STREAMS), 0)
    assert await _applied_once(store, app) == Counter(letters.values())
    assert await store.dead_letters("wide") == []


async def test_a_reset_waiting_for_a_replay_runs_after_it(store: PostgresStore) -> None:
    """A reset with wait=True made while a replay holds the locks waits for the replay to
    end, then forgets the letters that failed again: each letter is applied at most once."""
    app = await _create_app_schema(store)
    letters = await _letter_per_stream(store, app, 2)
    gate = Gate()
    replayed: list[ReplayResult] = []
    reset = trio.Event()

    async def replay() -> None:
        failing = frozenset({"order-1"})
        replayed.append(
            await replay_dead_letters(store, replaying(app, 2, gate=gate, failing=failing))
        )

    async def reset_waiting() -> None:
        await store.reset_projection("wide", wait=True)
        reset.set()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replay)
            await gate.reached.wait()
            nursery.start_soon(reset_waiting)
            await eventually(lambda: _waiting_for_lock(store, "reset", "wide[0/2]"), within=30)
            assert not reset.is_set()
            gate.opened.set()
    [result] = replayed
    assert (result.replayed, result.failed) == (len(STREAMS) - 1, 1)
    del letters["order-1"]  # failed again: what it wrote was rolled back
    assert await _applied_once(store, app) == Counter(letters.values())
    assert await store.dead_letters("wide") == []
    assert all(s.checkpoint is None for s in await store.projection_status() if s.name == "wide")


async def test_a_cancelled_replay_keeps_the_rest_for_the_next(store: PostgresStore) -> None:
    """A replay cancelled while the fourth letter's handler runs keeps that letter and the
    ones after it (what it wrote is rolled back, the three before stay replayed); the next
    replay applies each of those once."""
    app = await _create_app_schema(store)
    letters = await _letter_per_stream(store, app, 2)
    gate = Gate(at=4)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replay_dead_letters, store, replaying(app, 2, gate=gate))
            await gate.reached.wait()
            nursery.cancel_scope.cancel()
    assert len(await _applied_once(store, app)) == 3
    assert len(await store.dead_letters("wide")) == len(STREAMS) - 3
    result = await replay_dead_letters(store, replaying(app, 2))
    assert (result.replayed, result.failed) == (len(STREAMS) - 3, 0)
    assert await _applied_once(store, app) == Counter(letters.values())
    assert await store.dead_letters("wide") == []


async def test_a_split_waits_for_a_replay_then_moves_what_failed_again(
    store: PostgresStore,
) -> None:
    """A host with 4 partitions started while a replay of 2 holds every old lock waits to
    split until the replay ends; the letters that failed again then move to their units of
    4, a replay with 2 is refused, and one with 4 applies each once."""
    app = await _create_app_schema(store)
    letters = await _letter_per_stream(store, app, 2)
    bad = frozenset({"order-1", "order-5", "order-7"})
    gate = Gate()
    replayed: list[ReplayResult] = []

    async def replay() -> None:
        replayed.append(await replay_dead_letters(store, replaying(app, 2, gate=gate, failing=bad)))

    async def split() -> bool:
        return await store.recorded_partitions("wide") == 4

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replay)
            await gate.reached.wait()
            host = replaying(app, 4, failing=frozenset(STREAMS))
            nursery.start_soon(run_projections, store, [host], ProjectionConfig())
            # A unit of 4 takes its own lock, then waits to record the count of 4 (which
            # needs the locks of the units of 2, and a partition index).
            units = [f"wide[{i}/4]" for i in range(4)]
            await eventually(lambda: _any_led(store, units), within=30)
            assert await store.recorded_partitions("wide") == 2
            gate.opened.set()
            await eventually(split, within=30)
            nursery.cancel_scope.cancel()
    [result] = replayed
    assert (result.replayed, result.failed) == (len(STREAMS) - 3, 3)
    kept = await store.dead_letters("wide")
    assert sorted(d.event.stream_id for d in kept) == sorted(bad)
    assert all(d.partition == partition_of(d.event.stream_id, 4).index for d in kept)
    with pytest.raises(PartitionsMismatch):
        await replay_dead_letters(store, replaying(app, 2))
    again = await replay_dead_letters(store, replaying(app, 4))
    assert (again.replayed, again.failed) == (3, 0)
    assert await _applied_once(store, app) == Counter(letters.values())
    assert await store.dead_letters("wide") == []


async def test_a_letter_failing_at_commit_is_kept_and_counted(
    store: PostgresStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A letter whose writes the database refuses only at COMMIT (here a deferred unique
    constraint) fails again, as it would in a run: it is kept and counted in ``failed``,
    and the replay goes on with the letters after it."""
    app = await _create_app_schema(store)
    letters = await _letter_per_stream(store, app, 1)
    await store.admin.execute(
        f'ALTER TABLE "{app}".applied '
        "ADD CONSTRAINT once UNIQUE (stream_id) DEFERRABLE INITIALLY DEFERRED"
    )
    # order-3 has a row already: its letter's replay violates the constraint at COMMIT.
    await store.admin.execute(
        f'INSERT INTO "{app}".applied (event_id, stream_id, partitions, pid) '
        "VALUES ($1, 'order-3', 1, 0)",
        uuid.uuid4(),
    )
    before = await store.dead_letters("wide")
    result = await replay_dead_letters(store, wide(app, 1, skip_bad=False))
    assert (result.replayed, result.failed) == (len(STREAMS) - 1, 1)
    [kept] = await store.dead_letters("wide")
    assert kept == next(d for d in before if d.event.stream_id == "order-3")
    applied = await _applied_once(store, app)
    assert set(letters.values()) - set(applied) == {kept.event.event_id}
    assert sum(1 for m in caplog.messages if "failed again" in m and "once" in m) == 1
    # Still refused: failed again, still kept.
    again = await replay_dead_letters(store, wide(app, 1, skip_bad=False))
    assert (again.replayed, again.failed) == (0, 1)
    assert await store.dead_letters("wide") == [kept]
