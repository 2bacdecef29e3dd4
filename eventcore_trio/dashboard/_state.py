"""What the dashboard shows: the latest status of every unit, kept by one polling task.

Requests never touch the database: one task reads `projection_status` once a second and
keeps the snapshot, a few minutes of lag history and the recent failovers. When the
database is down the snapshot keeps its last units and says why it is stale; a read that
does not answer within `READ_TIMEOUT` counts as failed (a silent network partition can hold
a query for minutes), and ``/metrics`` reports the store down and the snapshot's age instead
of the last values.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import trio

from .._errors import EventCoreError
from .._protocols import ProjectionAdmin
from .._status import ForeignLock, ProjectionStatus, foreign_lock_json, status_json

logger = logging.getLogger("eventcore_trio.dashboard")

#: Seconds between status reads.
POLL_INTERVAL: Final = 1.0
#: Seconds of lag history kept for the chart.
HISTORY_SECONDS: Final = 300
#: Failovers kept.
FAILOVERS_KEPT: Final = 20
#: Seconds a status read may take before it counts as failed.
READ_TIMEOUT: Final = 10.0
#: Seconds after the last successful read at which the snapshot is stale even though no read
#: failed (the polling task stuck or gone): `DashboardState.store_up` is then False.
STALE_AFTER: Final = 15.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class DashboardState:
    """The latest status snapshot, lag history and recent failovers (see `poll_status`).

    Args:
        allow_actions: whether the page may reset projections and replay dead letters.
        clock: monotonic seconds, what the snapshot's age is measured with
            (``time.monotonic``; tests pass a fake).

    .. versionadded:: 0.3
    """

    def __init__(
        self, *, allow_actions: bool = False, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.allow_actions = allow_actions
        # Projections whose dead letters the page may replay (the dashboard has their code).
        self.replayable: list[str] = []
        self.statuses: list[ProjectionStatus] = []
        self.updated_at: dt.datetime | None = None
        self.error: str | None = None
        self._history: deque[dict[str, Any]] = deque(maxlen=int(HISTORY_SECONDS / POLL_INTERVAL))
        self._failovers: deque[dict[str, Any]] = deque(maxlen=FAILOVERS_KEPT)
        self._leaders: dict[str, tuple[str, int]] = {}
        # clock() when the state was made, and at the last successful read (None before the
        # first): the ages /metrics reports, immune to wall-clock jumps.
        self._clock = clock
        self._created = clock()
        self._read_at: float | None = None

    def update(self, statuses: list[ProjectionStatus]) -> None:
        """Take a new status read: history, failovers (a unit led by another process than
        the last one that led it)."""
        now = _now()
        for record in statuses:
            if record.leader is None:
                continue
            leader = (record.leader.host, record.leader.pid)
            before = self._leaders.get(record.unit)
            if before is not None and before != leader:
                self._failovers.appendleft(
                    {
                        "unit": record.unit,
                        "at": now.isoformat(),
                        "from": {"host": before[0], "pid": before[1]},
                        "to": {"host": leader[0], "pid": leader[1]},
                    }
                )
            self._leaders[record.unit] = leader
        self._history.append(
            {"at": now.isoformat(), "lag": {r.unit: r.lag_events for r in statuses}}
        )
        self.statuses = statuses
        self.updated_at = now
        self._read_at = self._clock()
        self.error = None

    def fail(self, error: BaseException) -> None:
        """Keep the last snapshot, marked stale with *error*."""
        self.error = f"{type(error).__name__}: {error}"

    def status_age(self) -> float:
        """Seconds since the last successful status read (before the first one: since this
        state was made). ``/metrics`` reports it as ``eventcore_status_age_seconds``.

        .. versionadded:: 0.3
        """
        since = self._created if self._read_at is None else self._read_at
        return max(0.0, self._clock() - since)

    @property
    def store_up(self) -> bool:
        """Whether the snapshot is current: the last status read succeeded, less than
        `STALE_AFTER` seconds ago. ``/metrics`` reports it as ``eventcore_store_up`` and
        leaves the per-unit values out while it is False.

        .. versionadded:: 0.3
        """
        return self.error is None and self._read_at is not None and self.status_age() < STALE_AFTER

    def snapshot(self) -> dict[str, Any]:
        """Everything ``/status.json`` serves."""
        hosts: dict[tuple[str, int], int] = {}
        for record in self.statuses:
            if record.leader is not None:
                key = (record.leader.host, record.leader.pid)
                hosts[key] = hosts.get(key, 0) + 1
        held = next((r for r in self.statuses if r.held_back_by is not None), None)
        # Each record repeats the store-wide ones: each session and lock once.
        foreign: dict[tuple[int, str, str | None], ForeignLock] = {}
        for record in self.statuses:
            foreign.update(((f.pid, f.kind, f.unit), f) for f in record.foreign_locks)
        return {
            "generated_at": None if self.updated_at is None else self.updated_at.isoformat(),
            "error": self.error,
            "actions": self.allow_actions,
            "replayable": self.replayable if self.allow_actions else [],
            "units": [status_json(r) for r in self.statuses],
            "hosts": [
                {"host": host, "pid": pid, "units": count}
                for (host, pid), count in sorted(hosts.items())
            ],
            "held_back_by": None if held is None else status_json(held)["held_back_by"],
            # Sessions from outside the store holding or awaiting its locks (PostgreSQL).
            "foreign_locks": [foreign_lock_json(f) for f in foreign.values()],
            # Units that live balancing hosts exist for but none of them can run.
            "unrunnable": [r.unit for r in self.statuses if r.unrunnable],
            "failovers": list(self._failovers),
            "lag_history": list(self._history),
        }


async def poll_status(
    store: ProjectionAdmin,
    state: DashboardState,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Read the store's status into *state* once a second, until cancelled.

    A failed read (the database restarting, say), or one that takes longer than
    `READ_TIMEOUT` seconds (it is cancelled), marks the snapshot stale and is retried at the
    next tick; it never ends the task.

    .. versionadded:: 0.3
    """
    started = False
    while True:
        try:
            with trio.fail_after(READ_TIMEOUT):
                statuses = await store.projection_status()
        except trio.TooSlowError:
            logger.warning("dashboard: no status within %g s", READ_TIMEOUT)
            state.fail(TimeoutError(f"the database did not answer within {READ_TIMEOUT:g} s"))
        except EventCoreError as exc:
            logger.warning("dashboard: status unavailable: %s", exc)
            state.fail(exc)
        else:
            state.update(statuses)
        if not started:
            started = True
            task_status.started()
        await trio.sleep(POLL_INTERVAL)
