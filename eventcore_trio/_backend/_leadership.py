"""`LeadershipState`: what every backend's leadership object knows about itself.

A leadership is held until it is lost (its session ended, it was revoked, or something proved
the lock no longer ours) or released; both end it for good. Backends subclass this and add how
they hold the lock and open batches.
"""

from __future__ import annotations

import logging

import trio

from .._filters import EventFilter
from .._status import ProjectionState

logger = logging.getLogger("eventcore_trio.leadership")


class LeadershipState:
    """The held / lost state of one leadership, and why it was lost when that is known."""

    def __init__(self, name: str) -> None:
        self._name = name
        # Set once, when the leadership is lost or released. Never cleared.
        self._lost = trio.Event()
        # Why it was lost, when something other than the end of its session tells.
        self._lost_reason: str | None = None

    @property
    def name(self) -> str:
        """The name this leadership was acquired for."""
        return self._name

    @property
    def is_held(self) -> bool:
        """False once the leadership is known to be lost or has been released."""
        return not self._lost.is_set()

    @property
    def lost_reason(self) -> str | None:
        """Why the leadership was lost, when known beyond "its session ended"; else None.

        .. versionadded:: 0.2
        """
        return self._lost_reason

    async def wait_lost(self) -> None:
        """Return once the leadership is lost or released."""
        await self._lost.wait()

    def mark_lost(self, reason: str | None = None) -> None:
        """End the leadership for good: its session ended, it was revoked or released, or
        something proved the lock no longer ours (*reason*, logged once)."""
        # The first reason wins; a release after a loss keeps it.
        if reason is not None and self._lost_reason is None and not self._lost.is_set():
            self._lost_reason = reason
            logger.error("leadership of %s lost: %s", self._name, reason)
        self._lost.set()

    async def report(
        self,
        state: ProjectionState,
        *,
        error: str | None = None,
        filter: EventFilter | None = None,
    ) -> None:
        """Record this leader's state, error and filter for `projection_status` (see
        `Leadership.report`)."""
        await self.record_report(state, error, filter)

    async def record_report(
        self, state: ProjectionState, error: str | None, filter: EventFilter | None
    ) -> None:
        """Where each backend records a report: a table row, or the in-memory record."""
        raise NotImplementedError
