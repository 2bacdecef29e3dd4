"""What the dashboard shows: the latest status of every unit, kept by one polling task.

Requests never touch the database: one task reads `projection_status` and `live_hosts` once
a second and keeps the snapshot, a few minutes of lag history, the recent failovers and
hand-offs, and which database and schema it watches. When the database is down the snapshot
keeps its last units and says why it is stale; a read that does not answer within
`READ_TIMEOUT` counts as failed (a silent network partition can hold a query for minutes),
and ``/metrics`` reports the store down and the snapshot's age instead of the last values.
The outage is logged when it starts, then at most every `OUTAGE_LOG_INTERVAL` seconds, and
when it ends.

Times are UTC, to the second: an operator reads them, and microseconds only add noise.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol, runtime_checkable

import trio

from .._errors import EventCoreError
from .._filters import EventFilter
from .._positions import Position
from .._progress import VersionSummary, version_summaries, versioned
from .._protocols import ProjectionAdmin
from .._status import (
    ForeignLock,
    LeaderInfo,
    LiveHost,
    ProjectionState,
    ProjectionStatus,
    foreign_lock_json,
    status_json,
)
from .._versions import VersionRole

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
#: Seconds of a building version's lag over which its rate (and so its ETA) is measured.
RATE_WINDOW: Final = 60.0

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
class _HeadReader(Protocol):
    # A store that says where its head is (`EventReader.last_position`): for the progress
    # of a building version.
    async def last_position(self, filter: EventFilter | None = None) -> Position | None: ...


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
        # The live balancing hosts of the last read (`ProjectionAdmin.live_hosts`).
        self.hosts: list[LiveHost] = []
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
        # The versions of the last read (`version_summaries`), and each building version's
        # lag at successive reads, (clock(), lag), for its rate: kept while it builds.
        self._versions: list[VersionSummary] = []
        self._lags: dict[tuple[str, int], deque[tuple[float, int]]] = {}

    def update(
        self,
        statuses: list[ProjectionStatus],
        hosts: Sequence[LiveHost] = (),
        head: Position | None = None,
    ) -> None:
        """Take a new status read and the live *hosts* read with it: history, and each unit
        now led by another process than the one last seen leading it, as a failover or a
        hand-off.

        A move is a hand-off when the process that led the unit is still live in this read
        (it leads another unit, or is a live host): a balancer moved the unit, its old
        leader stopping after its batch. A move whose old leader is gone from the read is a
        failover (it died, or lost its session). A unit's first leader, two hosts starting
        together included, is neither.

        *head* is the store's last position, for the progress of a building version (its
        checkpoint against it); its lag at successive updates gives its rate and ETA.

        .. versionchanged:: 0.4
           *hosts* and *head*.
        """
        now = _now()
        alive = {_process(r.leader) for r in statuses if r.leader is not None}
        alive.update(_process(info) for r in statuses for info in r.lacking_hosts)
        alive.update(_process(host.process) for host in hosts)
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
        self.hosts = list(hosts)
        self.updated_at = now
        self._read_at = self._clock()
        self.error = None
        self._versions = version_summaries(statuses, head)
        building = {
            (v.name, v.version): v.lag_events
            for v in self._versions
            if v.role is VersionRole.BUILDING
        }
        for key in list(self._lags):
            if key not in building:
                del self._lags[key]
        for key, lag in building.items():
            samples = self._lags.setdefault(key, deque())
            samples.append((self._read_at, lag))
            while len(samples) > 2 and self._read_at - samples[1][0] >= RATE_WINDOW:
                samples.popleft()

    def rebuild_rate(self, name: str, version: int) -> float | None:
        """Events per second by which a building version's lag shrank over the last
        `RATE_WINDOW` seconds of reads (what it applies less what arrives meanwhile), or
        None before two reads or while it does not shrink. An estimate.

        .. versionadded:: 0.4
        """
        samples = self._lags.get((name, version))
        if not samples or len(samples) < 2:
            return None
        (then, before), (now, lag) = samples[0], samples[-1]
        if now <= then or lag >= before:
            return None
        return (before - lag) / (now - then)

    def rebuild_eta(self, name: str, version: int) -> float | None:
        """Seconds until a building version catches up at `rebuild_rate`, or None when no
        rate is known. An estimate.

        .. versionadded:: 0.4
        """
        rate = self.rebuild_rate(name, version)
        summary = next((v for v in self._versions if (v.name, v.version) == (name, version)), None)
        if rate is None or summary is None:
            return None
        return summary.lag_events / rate

    @property
    def versions(self) -> list[VersionSummary]:
        """Every version of every projection in the last read: role, lag, progress.

        .. versionadded:: 0.4
        """
        return list(self._versions)

    def _versions_json(self) -> list[dict[str, Any]]:
        # A projection's versions when it has several (or one above 1): the page shows them.
        names = versioned(self._versions)
        return [
            {
                "name": v.name,
                "version": v.version,
                "role": v.role.value,
                "units": v.units,
                "lag_events": v.lag_events,
                "lag_estimated": v.lag_estimated,
                # Share of the event log applied (building versions only).
                "progress": v.progress,
                # Both from successive reads: estimates, None until known.
                "events_per_second": self.rebuild_rate(v.name, v.version),
                "eta_seconds": self.rebuild_eta(v.name, v.version),
            }
            for v in self._versions
            if v.name in names
        ]

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

    def _hosts(self) -> list[dict[str, Any]]:
        """Every live process: each live balancing host, idle ones too (with what it last
        published and the units it cannot run), then each process that leads units without
        balancing (``host_id`` None: `run_projection`, or a host of a version that did not
        register).
        """
        listed = {_process(host.process) for host in self.hosts}
        units = [record.unit for record in self.statuses]
        result: list[dict[str, Any]] = [
            {
                "host_id": host.host_id,
                "host": host.process.host,
                "pid": host.process.pid,
                "application_name": host.process.application_name,
                "joined_at": host.joined_at.replace(microsecond=0).isoformat(),
                "units": len(host.state.leading),
                "standing_by": len(host.state.standing_by),
                "lacks": [unit for unit in units if unit not in host.state.can_run],
            }
            for host in self.hosts
        ]
        others: dict[_Process, tuple[str, int]] = {}
        for record in self.statuses:
            leader = record.leader
            if leader is not None and _process(leader) not in listed:
                _, count = others.get(_process(leader), ("", 0))
                others[_process(leader)] = (leader.application_name, count + 1)
        result.extend(
            {
                "host_id": None,
                "host": host,
                "pid": pid,
                "application_name": application_name,
                "joined_at": None,
                "units": count,
                "standing_by": 0,
                "lacks": [],
            }
            for (host, pid), (application_name, count) in sorted(others.items())
        )
        return result

    def snapshot(self) -> dict[str, Any]:
        """Everything ``/status.json`` serves."""
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
            # Every live balancing host (idle ones too), then every other process leading
            # units: how many it leads and stands by for, and the units it cannot run.
            "hosts": self._hosts(),
            # How many live balancing hosts there are.
            "live_hosts": len(self.hosts),
            "held_back_by": None if held is None else status_json(held)["held_back_by"],
            # Sessions from outside the store holding or awaiting its locks (PostgreSQL).
            "foreign_locks": [foreign_lock_json(f) for f in foreign.values()],
            # Units that live balancing hosts exist for but none of them can run (not those
            # of a superseded version: they are meant to stop).
            "unrunnable": [
                r.unit
                for r in self.statuses
                if r.unrunnable and r.state is not ProjectionState.SUPERSEDED
            ],
            # Versions of the projections that have several: which serves, which builds
            # (progress, rate and ETA), which are superseded or withdrawn.
            "versions": self._versions_json(),
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
    """Read the store's status and live hosts into *state* once a second, until cancelled.

    A failed read (the database restarting, say), or one that takes longer than
    `READ_TIMEOUT` seconds (it is cancelled), marks the snapshot stale and is retried at the
    next tick; it never ends the task. An outage is logged (``eventcore_trio.dashboard``,
    WARNING) when it starts, then at most every `OUTAGE_LOG_INTERVAL` seconds with the count
    of failed reads, and once when reads succeed again. The first read that answers also
    says which database and schema the store reads (``source`` in ``/status.json``).

    .. versionadded:: 0.3
    .. versionchanged:: 0.4
       The live hosts too (`ProjectionAdmin.live_hosts`), idle ones included; the store's
       head, for the progress of a building version.
    """
    outage = _OutageLog()
    started = False
    while True:
        try:
            with trio.fail_after(READ_TIMEOUT):
                if state.source is None:
                    state.source = await describe_store(store)
                statuses = await store.projection_status()
                hosts = await store.live_hosts()
                head = await store.last_position() if isinstance(store, _HeadReader) else None
        except trio.TooSlowError:
            error = TimeoutError(f"the database did not answer within {READ_TIMEOUT:g} s")
            outage.failed(str(error))
            state.fail(error)
        except EventCoreError as exc:
            outage.failed(str(exc))
            state.fail(exc)
        else:
            outage.succeeded()
            state.update(statuses, hosts, head)
        if not started:
            started = True
            task_status.started()
        await trio.sleep(POLL_INTERVAL)
