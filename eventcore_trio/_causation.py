"""Correlation and causation ids, so a whole causal chain of events can be followed."""

from __future__ import annotations

from ._events import RecordedEvent

CORRELATION_ID = "correlation_id"
CAUSATION_ID = "causation_id"


def caused_by(event: RecordedEvent) -> dict[str, str]:
    """Metadata for events written in reaction to *event*.

    The correlation id is carried over (or starts with *event*'s id when it has none); the
    causation id is *event*'s own id. Pass it as metadata when a projector or a process
    manager appends, or give the event to ``execute(..., caused_by=event)``.

    .. versionadded:: 0.1
    """
    return {
        CORRELATION_ID: str(event.metadata.get(CORRELATION_ID, event.event_id)),
        CAUSATION_ID: str(event.event_id),
    }
