"""``GET /metrics``: the status in Prometheus text format, with the OpenTelemetry names."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .._protocols import ProjectionAdmin
from .._status import ProjectionState, ProjectionStatus


class _StatusCollector(Collector):
    def __init__(self, statuses: Sequence[ProjectionStatus]) -> None:
        self._statuses = statuses

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["projector", "unit"]
        lag_events = GaugeMetricFamily(
            "eventcore_projection_lag_events",
            "committed events not yet applied, held back or not",
            labels=labels,
        )
        lag_seconds = GaugeMetricFamily(
            "eventcore_projection_lag_seconds",
            "age of the oldest committed event not yet applied",
            labels=labels,
            unit="seconds",
        )
        dead = GaugeMetricFamily(
            "eventcore_projection_dead_letters", "dead letters not replayed", labels=labels
        )
        running = GaugeMetricFamily(
            "eventcore_projection_running", "1 when a leader applies events", labels=labels
        )
        standbys = GaugeMetricFamily(
            "eventcore_projection_standbys", "sessions waiting to take over", labels=labels
        )
        runnable_by = GaugeMetricFamily(
            "eventcore_projection_runnable_by",
            "live balancing hosts that can run the unit (0: none has its projector)",
            labels=labels,
        )
        per_host = GaugeMetricFamily(
            "eventcore_host_units", "units each host process leads", labels=["host", "pid"]
        )
        hosts: dict[tuple[str, str], int] = {}
        for record in self._statuses:
            values = [record.name, record.unit]
            lag_events.add_metric(values, record.lag_events)
            lag_seconds.add_metric(values, record.lag_seconds)
            dead.add_metric(values, record.dead_letters)
            running.add_metric(values, int(record.state is ProjectionState.RUNNING))
            standbys.add_metric(values, record.standbys)
            if record.runnable_by is not None:
                runnable_by.add_metric(values, record.runnable_by)
            if record.leader is not None:
                key = (record.leader.host, str(record.leader.pid))
                hosts[key] = hosts.get(key, 0) + 1
        for (host, pid), count in sorted(hosts.items()):
            per_host.add_metric([host, pid], count)
        yield from (lag_events, lag_seconds, dead, running, standbys, runnable_by, per_host)


def prometheus_text(statuses: Sequence[ProjectionStatus]) -> bytes:
    """*statuses* as Prometheus text exposition (what ``GET /metrics`` serves).

    The names are the OpenTelemetry instruments' with ``_`` for ``.``
    (``eventcore_projection_lag_events``, ``…_lag_seconds``), plus dead letters, running,
    standbys, ``eventcore_projection_runnable_by`` (live balancing hosts that can run the
    unit; 0 when none has its projector, absent when no balancing host is live) and
    ``eventcore_host_units`` (units per host process).

    .. versionadded:: 0.3
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(statuses))
    return generate_latest(registry)


async def prometheus_metrics(store: ProjectionAdmin) -> bytes:
    """Read the store's status now and render it for Prometheus: for an endpoint in your own
    server (``return Response(await prometheus_metrics(store), media_type=...)``).

    .. versionadded:: 0.3
    """
    return prometheus_text(await store.projection_status())
