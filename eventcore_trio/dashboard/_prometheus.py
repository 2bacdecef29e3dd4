"""``GET /metrics``: the status in Prometheus text format, with the OpenTelemetry names.

While the store cannot be read, the per-unit and per-host series are left out rather than
served with their last values: a value nobody can vouch for must not look current (Prometheus
marks the left-out series stale, so rules over them neither fire nor keep firing on old
data), and ``eventcore_store_up`` 0 and ``eventcore_status_age_seconds`` say why.
``deploy/prometheus/eventcore-alerts.yml`` alerts on them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .._errors import EventCoreError
from .._progress import VersionSummary, version_summaries
from .._protocols import EventReader, ProjectionAdmin
from .._status import ProjectionState, ProjectionStatus
from .._versions import VersionRole
from ._state import READ_TIMEOUT

logger = logging.getLogger("eventcore_trio.dashboard")


class _StatusCollector(Collector):
    def __init__(
        self,
        statuses: Sequence[ProjectionStatus],
        *,
        store_up: bool,
        status_age: float | None,
        versions: Sequence[VersionSummary],
        etas: Mapping[tuple[str, int], float],
    ) -> None:
        # The units, left out entirely while the store is down (store_up False).
        self._statuses = statuses if store_up else ()
        self._versions = versions if store_up else ()
        self._etas = etas
        self._store_up = store_up
        # Seconds since the last successful read, or None when unknown (not reported).
        self._status_age = status_age

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "eventcore_store_up",
            "1 when the last status read succeeded, 0 when the store could not be read "
            "(the per-unit series are then left out)",
            value=int(self._store_up),
        )
        if self._status_age is not None:
            yield GaugeMetricFamily(
                "eventcore_status_age_seconds",
                "seconds since the last successful status read",
                value=self._status_age,
                unit="seconds",
            )
        # `version` is new in 0.4: queries and rules by projector and unit keep working (the
        # unit names the version already: "name@v2").
        labels = ["projector", "unit", "version"]
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
        serving = GaugeMetricFamily(
            "eventcore_projection_serving",
            "1 when the unit's version serves reads",
            labels=labels,
        )
        superseded = GaugeMetricFamily(
            "eventcore_projection_superseded",
            "1 when the unit's version is superseded or withdrawn: it is meant not to run",
            labels=labels,
        )
        progress = GaugeMetricFamily(
            "eventcore_projection_rebuild_progress",
            "share of the event log a building version has applied (0 to 1; an estimate)",
            labels=["projector", "version"],
        )
        eta = GaugeMetricFamily(
            "eventcore_projection_rebuild_eta_seconds",
            "seconds until a building version catches up, at its recent rate (an estimate)",
            labels=["projector", "version"],
            unit="seconds",
        )
        per_host = GaugeMetricFamily(
            "eventcore_host_units", "units each host process leads", labels=["host", "pid"]
        )
        hosts: dict[tuple[str, str], int] = {}
        for record in self._statuses:
            values = [record.name, record.unit, str(record.version)]
            lag_events.add_metric(values, record.lag_events)
            lag_seconds.add_metric(values, record.lag_seconds)
            dead.add_metric(values, record.dead_letters)
            running.add_metric(values, int(record.state is ProjectionState.RUNNING))
            standbys.add_metric(values, record.standbys)
            serving.add_metric(values, int(record.serving))
            superseded.add_metric(values, int(record.state is ProjectionState.SUPERSEDED))
            if record.runnable_by is not None:
                runnable_by.add_metric(values, record.runnable_by)
            if record.leader is not None:
                key = (record.leader.host, str(record.leader.pid))
                hosts[key] = hosts.get(key, 0) + 1
        for (host, pid), count in sorted(hosts.items()):
            per_host.add_metric([host, pid], count)
        for version in self._versions:
            if version.role is not VersionRole.BUILDING or version.progress is None:
                continue
            names = [version.name, str(version.version)]
            progress.add_metric(names, version.progress)
            seconds = self._etas.get((version.name, version.version))
            if seconds is not None:
                eta.add_metric(names, seconds)
        yield from (lag_events, lag_seconds, dead, running, standbys, runnable_by, per_host)
        yield from (serving, superseded, progress, eta)


def prometheus_text(
    statuses: Sequence[ProjectionStatus],
    *,
    store_up: bool = True,
    status_age: float | None = None,
    versions: Sequence[VersionSummary] | None = None,
    etas: Mapping[tuple[str, int], float] | None = None,
) -> bytes:
    """*statuses* as Prometheus text exposition (what ``GET /metrics`` serves).

    The names are the OpenTelemetry instruments' with ``_`` for ``.``
    (``eventcore_projection_lag_events``, ``…_lag_seconds``), plus dead letters, running,
    standbys, ``eventcore_projection_runnable_by`` (live balancing hosts that can run the
    unit; 0 when none has its projector, absent when no balancing host is live),
    ``eventcore_host_units`` (units per host process), ``eventcore_store_up`` and
    ``eventcore_status_age_seconds``. Per-unit series carry the labels ``projector``,
    ``unit`` and ``version``; ``eventcore_projection_serving`` is 1 for the units of the
    version that serves reads, ``eventcore_projection_superseded`` 1 for those of a
    superseded or withdrawn version (they do not run, on purpose), and a building version
    has ``eventcore_projection_rebuild_progress`` (the share of the event log it applied)
    and, when its rate is known, ``eventcore_projection_rebuild_eta_seconds``.

    Args:
        statuses: the units, as `ProjectionAdmin.projection_status` read them.
        store_up: False when the status could not be read: *statuses* are then the last
            ones read and are left out (``eventcore_store_up`` is 0).
        status_age: seconds since *statuses* were read, or None to leave the gauge out.
        versions: the versions of *statuses* (`DashboardState.versions`), for the rebuild
            progress; None: from *statuses* alone, with every building version at the
            progress of its checkpoints (0 without the head).
        etas: seconds until each building version, by (name, version), catches up.

    .. versionadded:: 0.3
    .. versionchanged:: 0.4
       The ``version`` label; ``eventcore_projection_serving``, ``…_superseded``,
       ``…_rebuild_progress`` and ``…_rebuild_eta_seconds``; *versions* and *etas*.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        _StatusCollector(
            statuses,
            store_up=store_up,
            status_age=status_age,
            versions=version_summaries(statuses, None) if versions is None else versions,
            etas=etas or {},
        )
    )
    return generate_latest(registry)


async def prometheus_metrics(store: ProjectionAdmin) -> bytes:
    """Read the store's status now and render it for Prometheus: for an endpoint in your own
    server (``return Response(await prometheus_metrics(store), media_type=...)``).

    A checkpoint. When the read fails or takes longer than 10 s (it is then cancelled), the
    text says so with ``eventcore_store_up 0`` and no per-unit series, rather than raising:
    the alert rules in ``deploy/prometheus/`` then fire.

    .. versionadded:: 0.3
    """
    try:
        with trio.fail_after(READ_TIMEOUT):
            statuses = await store.projection_status()
            head = await store.last_position() if isinstance(store, EventReader) else None
    except trio.TooSlowError:
        logger.warning("metrics: no status within %g s", READ_TIMEOUT)
        return prometheus_text([], store_up=False)
    except EventCoreError as exc:
        logger.warning("metrics: status unavailable: %s", exc)
        return prometheus_text([], store_up=False)
    return prometheus_text(statuses, status_age=0.0, versions=version_summaries(statuses, head))
