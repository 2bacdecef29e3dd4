"""Leadership: taking a unit (at once, or after waiting as a standby or a reset), releasing it,
and what a leader does with it (batches, reports).

Leadership is exclusive among the tasks of one process: `MemoryState.leaders` holds each led
name's `MemoryLeadership`. Release is synchronous, so cancellation cannot interrupt it.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import final

import trio

from .._backend._leadership import LeadershipState
from .._errors import LeadershipLost
from .._filters import EventFilter
from .._status import LeaderInfo, ProjectionState
from ._batch import MemoryBatch
from ._state import MemoryState, now


@final
class MemoryLeadership(LeadershipState):
    """Leadership of a name in a `MemoryStore`; obtained only from its ``*_acquire`` methods.

    .. versionadded:: 0.1
    """

    def __init__(self, state: MemoryState, name: str) -> None:
        super().__init__(name)
        self._state = state

    def open_batch(self, *, read_model: bool = False) -> MemoryBatch:
        """Stage a batch; it is applied when the block ends without an exception.

        *read_model* is accepted for the protocol: the memory store has no schemas.

        Raises:
            LeadershipLost: the leadership was lost before or during the batch.
        """
        return MemoryBatch(self._state, self)

    async def record_report(
        self, state: ProjectionState, error: str | None, filter: EventFilter | None
    ) -> None:
        """Record this leader's state for `MemoryStore.projection_status`."""
        await trio.lowlevel.checkpoint()
        if not self.is_held:
            raise LeadershipLost(f"leadership of {self.name!r} was lost")
        record = self._state.projection(self.name)
        record.state = state
        if state is not ProjectionState.REPLAYING:
            record.last_error = error
        if filter is not None:
            record.filter = filter
        record.leader = (
            LeaderInfo(pid=os.getpid(), host=socket.gethostname(), application_name="memory")
            if state is ProjectionState.RUNNING
            else None
        )
        record.updated_at = now()


@asynccontextmanager
async def lead(state: MemoryState, name: str) -> AsyncIterator[MemoryLeadership]:
    """Lead *name* (which no one leads) for the block."""
    leadership = MemoryLeadership(state, name)
    state.leaders[name] = leadership
    try:
        yield leadership
    finally:
        release(state, leadership)


@asynccontextmanager
async def wait_lead(
    state: MemoryState,
    name: str,
    waiters: Counter[str],
    on_standby: Callable[[], None] | None = None,
) -> AsyncIterator[MemoryLeadership]:
    """Lead *name* for the block, first waiting while another task leads it.

    *waiters* counts who waits: standbys (`MemoryState.waiting`) or resets
    (`MemoryState.reset_waiting`).
    """
    if name in state.leaders:
        if on_standby is not None:
            on_standby()
        waiters[name] += 1
        try:
            while (current := state.leaders.get(name)) is not None:
                await current.wait_lost()
        finally:
            waiters[name] -= 1
    async with lead(state, name) as leadership:
        yield leadership


def release(state: MemoryState, leadership: MemoryLeadership) -> None:
    """End *leadership*, and its unit's leader record if it still leads."""
    if state.leaders.get(leadership.name) is leadership:
        del state.leaders[leadership.name]
        record = state.projections.get(leadership.name)
        if record is not None:
            record.leader = None
    leadership.mark_lost()


def release_all(state: MemoryState) -> None:
    """End every leadership (the store is closing)."""
    for leadership in list(state.leaders.values()):
        release(state, leadership)


def revoke(state: MemoryState, name: str) -> None:
    """End the leadership of *name*, if led, as if its session had died."""
    leadership = state.leaders.get(name)
    if leadership is not None:
        release(state, leadership)
