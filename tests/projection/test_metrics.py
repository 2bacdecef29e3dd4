"""OpenTelemetry metrics from the projection runtime."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from eventcore_trio import NewEvent, RecordedEvent, open_memory_store
from eventcore_trio.projection import (
    Failure,
    FailureStrategy,
    ProjectionContext,
    projector,
    run_projection,
    run_projections,
)

_READER = InMemoryMetricReader()


@pytest.fixture(scope="module")
def reader() -> InMemoryMetricReader:
    """The process's meter provider, reading into memory (OpenTelemetry allows one per process)."""
    metrics.set_meter_provider(MeterProvider(metric_readers=[_READER]))
    return _READER


def _points(reader: InMemoryMetricReader, name: str, projector_name: str) -> list[Any]:
    data = reader.get_metrics_data()
    found = []
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    found += [
                        p
                        for p in metric.data.data_points
                        if (p.attributes or {}).get("projector") == projector_name
                    ]
    return found


async def test_batches_dead_letters_and_failovers_are_counted(
    reader: InMemoryMetricReader,
) -> None:
    """Applied events, batch durations, lag, dead letters and failovers are recorded."""

    def skip(failure: Failure) -> FailureStrategy:
        return FailureStrategy.SKIP

    @projector("metered", on_error=skip)
    async def metered(event: RecordedEvent, ctx: ProjectionContext) -> None:
        if event.data.get("bad"):
            raise ValueError("bad")

    async with open_memory_store() as store:
        await store.append("s", [NewEvent("E", {})] * 5 + [NewEvent("E", {"bad": True})])
        await run_projection(store, metered)
        (applied,) = _points(reader, "eventcore.projection.events_applied", "metered")
        assert applied.value == 5
        (dead,) = _points(reader, "eventcore.projection.dead_letters", "metered")
        assert dead.value == 1
        (durations,) = _points(reader, "eventcore.projection.batch_duration", "metered")
        assert durations.count >= 1
        (lag,) = _points(reader, "eventcore.projection.lag", "metered")
        assert lag.count >= 1

        # A second host stands by while the first leads, then takes over.
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as first:
                await first.start(run_projections, store, [metered])
                await nursery.start(run_projections, store, [metered])
                first.cancel_scope.cancel()
            await store.append("s", [NewEvent("E", {})])

            async def taken_over() -> bool:
                points = _points(reader, "eventcore.projection.failovers", "metered")
                return bool(points) and points[0].value == 1

            with trio.fail_after(10):
                while not await taken_over():  # noqa: ASYNC110  (metrics have no event)
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


async def test_hosts_report_lag_gauges(
    reader: InMemoryMetricReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host reports, for the units it leads, the events they have not applied and their
    age, also while no batch commits (a batch's own lag is recorded only when it does)."""
    from eventcore_trio.projection import _host

    monkeypatch.setattr(_host, "LAG_REPORT_INTERVAL", 0.02)
    release = trio.Event()

    @projector("lagging")
    async def stuck(event: RecordedEvent, ctx: ProjectionContext) -> None:
        await release.wait()

    def lag_events() -> list[float]:
        return [p.value for p in _points(reader, "eventcore.projection.lag_events", "lagging")]

    async with open_memory_store() as store, trio.open_nursery() as nursery:
        await store.append("s", [NewEvent("E", {})] * 3)
        await nursery.start(run_projections, store, [stuck])
        with trio.fail_after(10):
            while lag_events() != [3]:  # noqa: ASYNC110  (metrics have no event)
                await trio.sleep(0.01)
        (seconds,) = _points(reader, "eventcore.projection.lag_seconds", "lagging")
        assert seconds.value >= 0
        release.set()
        with trio.fail_after(10):
            while lag_events() != [0]:  # noqa: ASYNC110  (metrics have no event)
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
