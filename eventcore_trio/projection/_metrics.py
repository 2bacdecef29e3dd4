"""Metrics through the OpenTelemetry API, when it is installed (the ``otel`` extra).

Without ``opentelemetry-api`` every call here is a no-op; with it but without an SDK
configured, OpenTelemetry's own no-op meter applies. Instruments (all with a ``projector``
attribute):

- ``eventcore.projection.events_applied`` (counter, events): events committed by batches.
- ``eventcore.projection.batch_duration`` (histogram, s): apply plus commit, per batch.
- ``eventcore.projection.lag`` (histogram, s): age of a batch's last event when it committed.
- ``eventcore.projection.dead_letters`` (counter): events skipped into dead letters.
- ``eventcore.projection.failovers`` (counter): leaderships taken after standing by.
- ``eventcore.projection.lag_events`` (gauge, events) and ``eventcore.projection.lag_seconds``
  (gauge, s): committed events a unit this host leads has not applied (held back or not)
  and the age of the oldest, from the host's periodic status read (`run_projections`).
"""

from __future__ import annotations

import importlib
from typing import Any


def _load_otel() -> Any:
    try:
        return importlib.import_module("opentelemetry.metrics")
    except ImportError:  # the otel extra is optional
        return None


_otel: Any = _load_otel()


class ProjectionMetrics:
    """The runtime's instruments; created once per process."""

    def __init__(self) -> None:
        self._enabled = _otel is not None
        if _otel is None:
            return
        meter = _otel.get_meter("eventcore_trio")
        self._applied: Any = meter.create_counter(
            "eventcore.projection.events_applied", unit="{event}", description="events applied"
        )
        self._duration: Any = meter.create_histogram(
            "eventcore.projection.batch_duration", unit="s", description="batch apply + commit"
        )
        self._lag: Any = meter.create_histogram(
            "eventcore.projection.lag", unit="s", description="age of a batch's last event"
        )
        self._dead_letters: Any = meter.create_counter(
            "eventcore.projection.dead_letters", unit="{event}", description="events skipped"
        )
        self._failovers: Any = meter.create_counter(
            "eventcore.projection.failovers", description="leaderships taken after standby"
        )
        # Gauges read what the hosts' status reads left here, by unit.
        self._lag_now: dict[str, tuple[int, float]] = {}
        meter.create_observable_gauge(
            "eventcore.projection.lag_events",
            callbacks=[self._observe_lag_events],
            unit="{event}",
            description="committed events not yet applied, held back or not",
        )
        meter.create_observable_gauge(
            "eventcore.projection.lag_seconds",
            callbacks=[self._observe_lag_seconds],
            unit="s",
            description="age of the oldest committed event not yet applied",
        )

    def _observe_lag_events(self, _options: Any) -> list[Any]:
        return [
            _otel.Observation(events, {"projector": unit})
            for unit, (events, _) in self._lag_now.items()
        ]

    def _observe_lag_seconds(self, _options: Any) -> list[Any]:
        return [
            _otel.Observation(seconds, {"projector": unit})
            for unit, (_, seconds) in self._lag_now.items()
        ]

    @property
    def enabled(self) -> bool:
        """Whether OpenTelemetry is installed (else every record is a no-op)."""
        return self._enabled

    def lag(self, lags: dict[str, tuple[int, float]]) -> None:
        """Replace the lag of the units this host leads: events and seconds, by unit."""
        if self._enabled:
            self._lag_now = dict(lags)

    def batch(self, projector: str, events: int, seconds: float, lag: float | None) -> None:
        """Record a committed batch."""
        if not self._enabled:
            return
        attributes = {"projector": projector}
        if events:
            self._applied.add(events, attributes)
        self._duration.record(seconds, attributes)
        if lag is not None:
            self._lag.record(max(0.0, lag), attributes)

    def dead_letter(self, projector: str) -> None:
        """Record a skipped event."""
        if self._enabled:
            self._dead_letters.add(1, {"projector": projector})

    def failover(self, projector: str) -> None:
        """Record a leadership taken after standing by."""
        if self._enabled:
            self._failovers.add(1, {"projector": projector})


METRICS = ProjectionMetrics()
