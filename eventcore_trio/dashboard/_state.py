"""What the dashboard shows: the latest status of every unit, kept by one polling task.

Requests never touch the database: one task reads `projection_status` once a second and
keeps the snapshot, a few minutes of lag history, the recent failovers and hand-offs, and
which database and schema it watches. When the database is down the snapshot keeps its last
units and says why it is stale; a read that does not answer within `READ_TIMEOUT` counts as
failed (a silent network partition can hold a query for minutes), and ``/metrics`` reports
the store down and the snapshot's age instead of the last values. The outage is logged when
it starts, then at most every `OUTAGE_LOG_INTERVAL` seconds, and when it ends.

Times are UTC, to the second: an operator reads them, and microseconds only add noise.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Protocol, runtime_checkable

import trio

from .._errors import EventCoreError
from .._protocols import ProjectionAdmin
from .._status import ForeignLock, LeaderInfo, ProjectionStatus, foreign_lock_json, status_json

logger = logging.getLogger("eventcore_trio.dashboard")

#: Seconds between status reads.
POLL_INTERVAL: Final = 1.0
#: Seconds of lag history kept for the chart.
HISTORY_SECONDS: Final = 300
#: Failovers kept, and hand-offs kept.
FAILOVERS_KEPT: Final = 20
#: Seconds a status read may take before it counts as failed.
READ_TIMEOUT: Final = 10.0
#: Seconds after the last successful read at which the snapshot is stale even though no read
#: failed (the polling task stuck or gone): `DashboardState.store_up` is then False.
STALE_AFTER: Final = 15.0
#: Seconds between the log lines of one outage after its first ("status unavailable").
OUTAGE_LOG_INTERVAL: Final = 60.0

#: Where a SQL store's queries go, as the server sees the connection (no password there).
_SOURCE_SQL: Final = (
    "SELECT current_database() AS database, host(inet_server_addr()) AS host, "
    "inet_server_port() AS port"
)

# A process, as (machine's host name, pid): who leads a unit, or a live host.
_Process = tuple[str, int]


def _now() -> dt.datetime:
    # To the second: what the page shows and /status.json serves.
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _process(info: LeaderInfo) -> _Process:
    return (info.host, info.pid)


class _Admin(Protocol):
    async def fetchrow(self, sql: str, *args: object) -> Any: ...


@runtime_checkable
class _SqlStore(Protocol):
    # What a PostgreSQL store offers (duck-typed: the dashboard does not need asyncpg).
    @property
    def schema(self) -> str: ...

    @property
    def admin(self) -> _Admin: ...


async def describe_store(store: object) -> dict[str, Any]:
    """Which database and schema *store* reads: ``{"database", "host", "port", "schema"}``
    as the server reports the connection (``host`` and ``port`` are None over a Unix
    socket), or ``{"backend": "memory"}`` for a store without a schema. Never a password.

    One query on a SQL store (a checkpoint); no I/O otherwise.
    """
    if not isinstance(store, _SqlStore):
        return {"backend": "memory"}
    row = await store.admin.fetchrow(_SOURCE_SQL)
    return {
        "database": None if row is None else row["database"],
        "host": None if row is None else row["host"],
        "port": None if row is None else row["port"],
        "schema": store.schema,
    }


class _OutageLog:
    """Logs an outage of status reads once when it starts, then at most once every
    `OUTAGE_LOG_INTERVAL` seconds with how many reads failed meanwhile, and once when a read
    succeeds again: a database down for an hour gives about 60 lines, not 3,600."""

    def __init__(self) -> None:
        # trio.current_time() of the outage's first failed read, None while reads succeed.
        self._since: float | None = None
        # When the last line was logged, and the failed reads since then (not yet told).
        self._logged_at = 0.0
        self._untold = 0
        # Failed reads in this outage.
        self._failures = 0

    def failed(self, why: str) -> None:
        now = trio.current_time()
        self._failures += 1
        if self._since is None:
            self._since = self._logged_at = now
            logger.warning("dashboard: status unavailable: %s", why)
            return
        self._untold += 1
        if now - self._logged_at >= OUTAGE_LOG_INTERVAL:
            logger.warning(
                "dashboard: status still unavailable after %.0f s (%d more failed reads): %s",
                now - self._since,
                self._untold,
                why,
            )
            self._logged_at, self._untold = now, 0

    def succeeded(self) -> None:
        if self._since is None:
            return
        # A warning too: whoever saw the outage's lines (at WARNING) must see it end.
        logger.warning(
            "dashboard: status available again after %.0f s (%d failed reads)",
            trio.current_time() - self._since,
            self._failures,
        )
        self._since, self._untold, self._failures = None, 0, 0


class DashboardState:
    """The latest status snapshot, lag history, recent failovers and hand-offs, and the
    database watched (see `poll_status`).

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
        # Which database and schema the store reads (`describe_store`), once known.
        self.source: dict[str, Any] | None = None
        self._history: deque[dict[str, Any]] = deque(maxlen=int(HISTORY_SECONDS / POLL_INTERVAL))
        self._failovers: deque[dict[str, Any]] = deque(maxlen=FAILOVERS_KEPT)
        self._handoffs: deque[dict[str, Any]] = deque(maxlen=FAILOVERS_KEPT)
        # The last leader seen of each unit (kept while the unit shows none).
        self._leaders: dict[str, _Process] = {}
        # clock() when the state was made, and at the last successful read (None before the
        # first): the ages /metrics reports, immune to wall-clock jumps.
        self._clock = clock
        self._created = clock()
        self._read_at: float | None = None

    def update(self, statuses: list[ProjectionStatus]) -> None:
        """Take a new status read: history, and each unit now led by another process than
        the one last seen leading it, as a failover or a hand-off.

        A move is a hand-off when the process that led the unit is still live in this read
        (it leads another unit, or is a live host that lacks one): a balancer moved the
        unit, its old leader stopping after its batch. Balancing moves a unit only from a
        host leading at least two more than another, so the old leader still leads one. A
        move whose old leader is gone from the read is a failover (it died, or lost its
        session). A unit's first leader, two hosts starting together included, is neither.
        """
        now = _now()
        alive = {_process(r.leader) for r in statuses if r.leader is not None}
        alive.update(_process(info) for r in statuses for info in r.lacking_hosts)
        for record in statuses:
            if record.leader is None:
                continue
            leader = _process(record.leader)
            before = self._leaders.get(record.unit)
            if before is not None and before != leader:
                move = {
                    "unit": record.unit,
                    "at": now.isoformat(),
                    "from": {"host": before[0], "pid": before[1]},
                    "to": {"host": leader[0], "pid": leader[1]},
                }
                (self._handoffs if before in alive else self._failovers).appendleft(move)
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

    def _hosts(self) -> dict[str, Any]:
        """The live processes the status names, and how many more live hosts it counts.

        Named: every process leading a unit, and every live balancing host lacking one (with
        the units it cannot run). The status counts the live balancing hosts
        (``runnable_by`` plus the lacking ones) but does not name a host that leads nothing
        and can run every unit (idle, or standing by only): ``unnamed`` is at least how many
        such hosts are live (exact when every leader is a balancing host).
        """
        led: dict[_Process, int] = {}
        lacks: dict[_Process, list[str]] = {}
        live: int | None = None
        for record in self.statuses:
            if record.leader is not None:
                key = _process(record.leader)
                led[key] = led.get(key, 0) + 1
            for info in record.lacking_hosts:
                lacks.setdefault(_process(info), []).append(record.unit)
            if record.runnable_by is not None:
                count = record.runnable_by + len(record.lacking_hosts)
                live = count if live is None else max(live, count)
        named = sorted(led.keys() | lacks.keys())
        return {
            "named": [
                {
                    "host": host,
                    "pid": pid,
                    "units": led.get((host, pid), 0),
                    "lacks": lacks.get((host, pid), []),
                }
                for host, pid in named
            ],
            "live": live,
            "unnamed": 0 if live is None else max(0, live - len(named)),
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything ``/status.json`` serves."""
        hosts = self._hosts()
        held = next((r for r in self.statuses if r.held_back_by is not None), None)
        # Each record repeats the store-wide ones: each session and lock once.
        foreign: dict[tuple[int, str, str | None], ForeignLock] = {}
        for record in self.statuses:
            foreign.update(((f.pid, f.kind, f.unit), f) for f in record.foreign_locks)
        return {
            "generated_at": None if self.updated_at is None else self.updated_at.isoformat(),
            "error": self.error,
            # Which database and schema (None until the first read answered).
            "source": self.source,
            "actions": self.allow_actions,
            "replayable": self.replayable if self.allow_actions else [],
            "units": [status_json(r) for r in self.statuses],
            # Leaders and live hosts the status names, each with the units it leads
            # (maybe 0) and those it cannot run.
            "hosts": hosts["named"],
            # Live balancing hosts (None: none is live), and how many of them the status
            # does not name (at least; they lead nothing and can run every unit).
            "live_hosts": hosts["live"],
            "unnamed_hosts": hosts["unnamed"],
            "held_back_by": None if held is None else status_json(held)["held_back_by"],
            # Sessions from outside the store holding or awaiting its locks (PostgreSQL).
            "foreign_locks": [foreign_lock_json(f) for f in foreign.values()],
            # Units that live balancing hosts exist for but none of them can run.
            "unrunnable": [r.unit for r in self.statuses if r.unrunnable],
            # Units that moved because their leader was gone (newest first) ...
            "failovers": list(self._failovers),
            # ... and those a live leader handed to another host.
            "handoffs": list(self._handoffs),
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
    next tick; it never ends the task. An outage is logged (``eventcore_trio.dashboard``,
    WARNING) when it starts, then at most every `OUTAGE_LOG_INTERVAL` seconds with the count
    of failed reads, and once when reads succeed again. The first read that answers also
    says which database and schema the store reads (``source`` in ``/status.json``).

    .. versionadded:: 0.3
    """
    outage = _OutageLog()
    started = False
    while True:
        try:
            with trio.fail_after(READ_TIMEOUT):
                if state.source is None:
                    state.source = await describe_store(store)
                statuses = await store.projection_status()
        except trio.TooSlowError:
            error = TimeoutError(f"the database did not answer within {READ_TIMEOUT:g} s")
            outage.failed(str(error))
            state.fail(error)
        except EventCoreError as exc:
            outage.failed(str(exc))
            state.fail(exc)
        else:
            outage.succeeded()
            state.update(statuses)
        if not started:
            started = True
            task_status.started()
        await trio.sleep(POLL_INTERVAL)
