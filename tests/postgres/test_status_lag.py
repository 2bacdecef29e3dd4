"""What `projection_status` says of a unit's lag: exact up to `EXACT_LAG` events, estimated
and flagged beyond (the threshold is lowered here so that a few hundred events cross it)."""

from __future__ import annotations

from collections import Counter

import pytest

from eventcore_trio import (
    NewEvent,
    ProjectionStatus,
    RecordedEvent,
    StreamAppend,
    open_memory_store,
    stream_hash,
)
from eventcore_trio._status import status_json
from eventcore_trio.cli._status import status_lines
from eventcore_trio.postgres import PostgresStore, _reads
from eventcore_trio.projection import ProjectionContext, projector, run_projection

#: The threshold in these tests.
LIMIT = 20

#: How far an estimate may be from the truth. The events are interleaved evenly (one per
#: stream in turn, types in a fixed cycle), so the density of the first matches is that of
#: all of them, give or take one turn of the cycle.
TOLERANCE = 0.15


@pytest.fixture(autouse=True)
def low_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_reads, "EXACT_LAG", LIMIT)


async def _noop(event: RecordedEvent, ctx: ProjectionContext) -> None:
    pass


async def _append_round_robin(store: PostgresStore, events: int, streams: int) -> None:
    # One event per stream in turn, types in a cycle of three ("A", "B", "B"), in batches
    # of appends (each batch one transaction).
    appends = []
    for n in range(events):
        appends.append(StreamAppend(f"s-{n % streams}", [NewEvent("AB"[min(n % 3, 1)], {})]))
        if len(appends) == streams:
            await store.append_atomic(appends)
            appends = []
    if appends:
        await store.append_atomic(appends)


async def _status(store: PostgresStore) -> dict[str, ProjectionStatus]:
    return {s.unit: s for s in await store.projection_status()}


def _close(status: ProjectionStatus, truth: int) -> None:
    assert status.lag_estimated, status
    assert abs(status.lag_events - truth) <= TOLERANCE * truth, (status.lag_events, truth)


async def test_caught_up_and_below_the_threshold_are_exact(store: PostgresStore) -> None:
    await store.append("s-0", [NewEvent("A", {})])
    await run_projection(store, projector("all")(_noop))
    status = (await _status(store))["all"]
    assert (status.lag_events, status.lag_estimated, status.lag_seconds) == (0, False, 0.0)
    await _append_round_robin(store, LIMIT, 4)
    status = (await _status(store))["all"]
    assert (status.lag_events, status.lag_estimated) == (LIMIT, False)
    assert status.lag_seconds > 0


async def test_above_the_threshold_is_estimated_without_a_filter(store: PostgresStore) -> None:
    await store.append("s-0", [NewEvent("A", {})])
    await run_projection(store, projector("all")(_noop))
    await _append_round_robin(store, LIMIT + 1, 4)
    status = (await _status(store))["all"]
    # The first count past the threshold: flagged, and exactly what was counted.
    assert (status.lag_events, status.lag_estimated) == (LIMIT + 1, True)
    await _append_round_robin(store, 600 - LIMIT - 1, 4)
    status = (await _status(store))["all"]
    _close(status, 600)
    # Labelled wherever it is shown.
    assert status_json(status)["lag_estimated"] is True
    assert f" ~{status.lag_events:,} " in status_lines([status])[1]


async def test_above_the_threshold_is_estimated_with_a_filter(store: PostgresStore) -> None:
    await store.append("s-0", [NewEvent("A", {})])
    await run_projection(store, projector("only-a", event_types=["A"])(_noop))
    await run_projection(store, projector("only-b", event_types=["B"])(_noop))
    await run_projection(store, projector("none", event_types=["C"])(_noop))
    await _append_round_robin(store, 900, 4)
    status = await _status(store)
    _close(status["only-a"], 300)
    _close(status["only-b"], 600)
    # A filter that matches nothing after the checkpoint: exactly 0, however many follow.
    assert (status["none"].lag_events, status["none"].lag_estimated) == (0, False)


async def test_each_partition_is_estimated_from_its_own_events(store: PostgresStore) -> None:
    streams = 16
    await store.append("s-0", [NewEvent("A", {})])
    await run_projection(store, projector("parts", partitions=4)(_noop))
    await _append_round_robin(store, 50 * streams, streams)
    truth = Counter(stream_hash(f"s-{n}") % 4 for n in range(streams))
    status = await _status(store)
    for index in range(4):
        unit = status[f"parts[{index}/4]"]
        expected = 50 * truth[index]
        if expected > LIMIT:
            _close(unit, expected)
        else:
            assert (unit.lag_events, unit.lag_estimated) == (expected, False)
    # Caught up again: every partition exactly 0.
    await run_projection(store, projector("parts", partitions=4)(_noop))
    for unit in (await _status(store)).values():
        assert (unit.lag_events, unit.lag_estimated) == (0, False)


async def test_the_memory_store_counts_exactly() -> None:
    async with open_memory_store() as store:
        await store.append("s-0", [NewEvent("A", {})])
        await run_projection(store, projector("all")(_noop))
        await store.append("s-0", [NewEvent("A", {}) for _ in range(LIMIT * 5)])
        [status] = await store.projection_status()
        assert (status.lag_events, status.lag_estimated) == (LIMIT * 5, False)
