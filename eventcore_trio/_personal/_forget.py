"""Forgetting a subject: the audit record, the ``SubjectForgotten`` event, and the caches of
this process that drop what they folded from the subject's events."""

from __future__ import annotations

import datetime as dt
import os
import socket
import weakref
from collections.abc import Collection
from typing import Final, Protocol, final

import attrs

from .._events import NewEvent
from .._positions import Position
from ._fields import SUBJECT_FORGOTTEN


@final
@attrs.frozen(kw_only=True)
class ForgetRecord:
    """The audit record of one forget: which subject, when, by which process.

    Kept by the store for as long as the store lives (it is also what makes the subject's
    personal data refused from then on), and written into the ``SubjectForgotten`` event.

    Attributes:
        subject: the forgotten subject.
        forgotten_at: when its key was deleted (timezone-aware, UTC).
        host: the host name of the process that forgot it.
        pid: that process's id.
        position: the position of the ``SubjectForgotten`` event the forget appended.

    .. versionadded:: 0.4
    """

    subject: str
    forgotten_at: dt.datetime
    host: str
    pid: int
    position: Position


def this_process() -> tuple[str, int]:
    """The host name and process id that a forget records."""
    return socket.gethostname(), os.getpid()


def forgotten_event(subject: str, forgotten_at: dt.datetime, host: str, pid: int) -> NewEvent:
    """The ``SubjectForgotten`` event of a forget (about *subject*, with no personal field)."""
    return NewEvent(
        SUBJECT_FORGOTTEN,
        {
            "subject": subject,
            "forgotten_at": forgotten_at.isoformat(),
            "host": host,
            "pid": pid,
        },
        subject=subject,
    )


class ForgetListener(Protocol):
    """A cache of this process that holds what it folded from events (`watch_forgets`)."""

    def forgotten(self, store: object, stream_ids: Collection[str]) -> None:
        """Drop what was folded from *stream_ids* of *store*, and fold it again next time."""
        ...


# Weakly: a listener (a StateCache) lives as long as its owner keeps it.
_LISTENERS: weakref.WeakSet[ForgetListener] = weakref.WeakSet()


def watch_forgets(listener: ForgetListener) -> None:
    """Tell *listener* of every forget in this process from now on."""
    _LISTENERS.add(listener)


def notify_forgotten(store: object, stream_ids: Collection[str]) -> None:
    """Tell every listener that *store* forgot the subject of the events of *stream_ids*."""
    for listener in list(_LISTENERS):
        listener.forgotten(store, stream_ids)


#: What a forget leaves of the error text of a dead letter of the subject's personal events
#: (a handler's error may have quoted a personal value).
REDACTED_ERROR: Final = "(the error's text was removed when the event's subject was forgotten)"
