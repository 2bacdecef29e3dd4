"""Metrics through the OpenTelemetry API, when it is installed (the ``otel`` extra).

Without ``opentelemetry-api`` every call here is a no-op; with it but without an SDK
configured, OpenTelemetry's own no-op meter applies. Instruments (all with a ``projector``
attribute):

- ``eventcore.projection.events_applied`` (counter, events): events committed by batches.
- ``eventcore.projection.batch_duration`` (histogram, s): apply plus commit, per batch.
- ``eventcore.projection.lag`` (histogram, s): age of a batch's last event when it committed.
- ``eventcore.projection.dead_letters`` (counter): events skipped into dead letters.
- ``eventcore.projection.failovers`` (counter): leaderships taken after standing by.
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
