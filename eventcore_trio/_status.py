"""Values describing projections at rest: status records, leaders, dead letters, and what
hosts publish to each other (host membership)."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import Iterable, Mapping
from typing import final

import attrs

from ._errors import CheckpointAhead, PartitionsChanged
from ._events import RecordedEvent, UndecodableEvent
from ._partitions import Partition, Unit, plan_repartition, split_parent
from ._positions import Position
from ._versions import versioned_name


def unit_name(projection: str, partition: int | None, partitions: int) -> str:
    """The lock and checkpoint name of a projection's *partition* of *partitions*."""
    return Unit(projection, None if partition is None else Partition(partition, partitions)).name


class ProjectionState(enum.Enum):
    """What a projection is doing, as seen by `projection_status`.

    .. versionadded:: 0.1
    """

    #: A leader holds the projection's lock and applies events.
    RUNNING = "running"
    #: Nobody leads, but at least one instance waits to take over.
    STANDBY = "standby"
    #: The last leader stopped on a fatal error (see ``last_error``).
    FAILED = "failed"
    #: Nobody leads or waits.
    STOPPED = "stopped"
    #: `reset_projection` holds the projection's lock (nothing is applied meanwhile).
    #:
    #: .. versionadded:: 0.2
    RESETTING = "resetting"
    #: `replay_dead_letters` holds the projection's lock (nothing new is applied meanwhile).
    #:
    #: .. versionadded:: 0.2
    REPLAYING = "replaying"
    #: The unit belongs to a partition count other than the one recorded for its projection:
    #: a change of count is under way (a rolling deploy that splits the projection). It
    #: applies nothing until no unit of the recorded count runs; then the count changes and
    #: the unit continues from its parent's checkpoint. Hosts running the recorded count keep
    #: leading their units meanwhile (docs/scale-out.md, "Changing the partition count").
    #:
    #: .. versionadded:: 0.3
    AWAITING_SPLIT = "awaiting-split"
    #: A change of the partition count holds the unit's lock for the moment it takes (nothing
    #: is applied meanwhile); the unit's next leader runs with the new count.
    #:
    #: .. versionadded:: 0.3
    REPARTITIONING = "repartitioning"
    #: The unit's projection version was superseded by a higher one that caught up, or
    #: withdrawn by an operator's switch back (see `VersionRole`): it applies nothing, and
    #: keeps its checkpoint and read model until it is retired.
    #:
    #: .. versionadded:: 0.4
    SUPERSEDED = "superseded"


def unit_state(
    *,
    holder: ProjectionState | None,
    standbys: int,
    last: ProjectionState | None,
    superseded: bool = False,
) -> ProjectionState:
    """The state `projection_status` shows, the same rule for every backend.

    Args:
        holder: what the session holding the lock does (RUNNING, REPLAYING, RESETTING,
            REPARTITIONING), or None when nobody holds it.
        standbys: instances waiting to lead (not operators waiting to reset).
        last: the state last recorded for the projection, if any.
        superseded: the unit's version is superseded or withdrawn (`VersionRole`): when
            nobody holds its lock, it is SUPERSEDED.
    """
    if holder is not None:
        return holder
    if superseded:
        return ProjectionState.SUPERSEDED
    if standbys:
        return ProjectionState.STANDBY
    if last is ProjectionState.FAILED:
        return ProjectionState.FAILED
    return ProjectionState.STOPPED


@attrs.frozen(kw_only=True)
class CountChange:
    """What status shows for a unit of a partition count other than the recorded one."""

    #: AWAITING_SPLIT while the change can happen, FAILED when it is refused.
    state: ProjectionState
    #: Why it is refused (the `PartitionsChanged` message its hosts get), or None.
    error: str | None
    #: The unit of the recorded count whose checkpoint it will continue from (a split), or
    #: None (it will start from the beginning): its lag counts from there.
    parent: Unit | None


def count_change(unit: Unit, recorded: int, *, applied: bool) -> CountChange:
    """The status of *unit* while its projection's recorded count is *recorded*, another
    count, the same rule for every backend (see `plan_repartition`).

    Args:
        applied: whether a unit of the recorded count has a checkpoint or a dead letter.
    """
    try:
        plan = plan_repartition(unit.projection, recorded, unit.partitions, applied=applied)
    except PartitionsChanged as exc:
        return CountChange(state=ProjectionState.FAILED, error=str(exc), parent=None)
    parent = split_parent(unit, recorded) if plan == "split" else None
    return CountChange(state=ProjectionState.AWAITING_SPLIT, error=None, parent=parent)


@final
@attrs.frozen(kw_only=True)
class LeaderInfo:
    """A process running projections: who leads a unit, or a live host that lacks one.

    Attributes:
        pid: the operating-system process id.
        host: the machine's host name.
        application_name: for a leader, its lock session's application name (starting with
            the store's ``application_name``); for a host, the store's application name.

    .. versionadded:: 0.1
    """

    pid: int
    host: str
    application_name: str


@final
@attrs.frozen(kw_only=True)
class OpenTransaction:
    """The oldest open event-writing transaction holding readers back (PostgreSQL only).

    Only transactions that append events (announced writers) hold readers back; others,
    however long, do not.

    .. versionadded:: 0.1
    """

    pid: int
    application_name: str
    state: str
    started_at: dt.datetime | None
    query: str


@final
@attrs.frozen(kw_only=True)
class ForeignLock:
    """A session from outside the store holding or awaiting one of its advisory locks
    (PostgreSQL only).

    PostgreSQL has no permissions on advisory locks: any role that may connect to the
    database can take the store's published keys. Status names such a session: one that
    holds or awaits the writer lock other than shared (the store's appends only ever take it
    shared, so an exclusive holder stops every append), and one whose role may not even use
    the store's schema, so it cannot be one of its hosts, holding or awaiting the writer
    lock, a projection unit's lock (the unit cannot run), or the migration or index lock.

    Attributes:
        kind: ``"writer"``, ``"projection"``, ``"migration"`` or ``"index"``.
        unit: the projection unit whose lock it is (``kind == "projection"``), else None.
        exclusive: whether the lock is (to be) held exclusively, rather than shared.
        granted: True when the session holds the lock, False when it waits for it.
        pid: the server process id of the session (``pg_terminate_backend`` ends it).
        user: the session's role.
        application_name: what the session calls itself (any client may choose it).
        client_addr: the address it connects from; None over a Unix socket, or when the
            role reading the status may not see it (it needs ``pg_read_all_stats``).
        connected_at: when the session connected (it holds the lock since then at most);
            None when the role reading the status may not see it.
        waiting_since: when it began to wait for the lock (PostgreSQL 14 and later), or None.

    .. versionadded:: 0.3
    """

    kind: str
    unit: str | None
    exclusive: bool
    granted: bool
    pid: int
    user: str
    application_name: str
    client_addr: str | None
    connected_at: dt.datetime | None
    waiting_since: dt.datetime | None

    def describe(self) -> str:
        """One line for an operator: who, and what it does to the store."""
        who = [f"user {self.user!r}", f"application {self.application_name!r}"]
        if self.client_addr is not None:
            who.append(f"from {self.client_addr}")
        if self.connected_at is not None:
            who.append(f"connected {self.connected_at.isoformat(timespec='seconds')}")
        if self.waiting_since is not None:
            who.append(f"waiting since {self.waiting_since.isoformat(timespec='seconds')}")
        does = "holds" if self.granted else "waits for"
        how = "exclusively" if self.exclusive else "shared"
        lock = (
            f"the lock of unit {self.unit!r}" if self.unit is not None else f"the {self.kind} lock"
        )
        effect = {
            "writer": "appends wait for it" if self.exclusive else "it may hold readers back",
            "projection": "the unit cannot run while it holds it",
            "migration": "opening the store with migrate=True waits for it",
            "index": "partition index builds wait for it",
        }.get(self.kind, "")
        return f"session pid {self.pid} ({', '.join(who)}) {does} {lock} {how}: {effect}"


@final
@attrs.frozen(kw_only=True)
class ProjectionStatus:
    """One projection's progress, leader and health.

    Attributes:
        name: the projector name.
        checkpoint: the last position applied, or None before the first batch.
        lag_events: committed matching events after the checkpoint, including those an open
            event-writing transaction holds back (see ``held_back_by``); an estimate when
            ``lag_estimated`` is True.
        lag_seconds: age of the first unprocessed matching event (the next one the
            projection reads); 0 when caught up. Always exact.
        lag_estimated: True when ``lag_events`` is an estimate: on PostgreSQL, a lag above
            10,000 events is estimated (from the density of the first 10,001 and the
            position of the head), so that status costs the same at any backlog; up to it
            (and at 0) the count is exact. Always False on the memory store.
        leader: who leads now, or None.
        standbys: how many instances wait to take over.
        state: running, standby, failed or stopped; resetting, replaying or repartitioning
            while an operator's command or a change of the partition count holds the lock;
            awaiting-split for a unit of a partition count that is not yet the recorded one
            (see `ProjectionState`).
        last_error: the last fatal error's message, or None.
        updated_at: when the projection last changed (checkpoint or state).
        dead_letters: how many skipped events await replay.
        held_back_by: the oldest open transaction that delays what readers see, if any.
        partition: which partition this record is about, or None for an unpartitioned
            projection (one record per partition, each with its own checkpoint and leader).
        partitions: how many partitions the projection has (1 when unpartitioned).
        runnable_by: how many live balancing hosts (`run_projections` with ``balance=True``)
            can run this unit, or None when no balancing host is live. 0 means that hosts
            are live but none of them has this projector (or this partition count): nobody
            will lead it until a host that has it starts (see ``unrunnable``).
        lacking_hosts: the live balancing hosts that cannot run this unit (pid, machine,
            application name), empty when every live host can.
        checkpoint_ahead: True when the checkpoint lies beyond every position the store can
            have produced (saved before eventcore-trio refused such saves, or written by
            hand): the projection would skip every event, so it refuses to run
            (`CheckpointAhead`). ``last_error`` then says to reset it, and ``lag_events`` counts
            every matching event, which is what a reset rebuilds.
        foreign_locks: sessions from outside the store that hold or await its writer lock,
            this unit's lock, or its other locks (see `ForeignLock`); the same for every
            record but this unit's lock. Empty on the memory store.
        version: the projection version this unit belongs to (1 for a projector without
            one); each version has units of its own.
        serving: whether this version's read model serves reads (see `VersionRole`); True
            while no version of the projection has run yet.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``partition`` and ``partitions``; ``name`` is the projection's for every partition.
    .. versionchanged:: 0.3
       ``runnable_by`` and ``lacking_hosts``; units that a live host runs are listed before
       they first run, also those of a partition count that is not (yet) the recorded one;
       ``checkpoint_ahead``; ``foreign_locks``.
    .. versionchanged:: 0.4
       ``lag_estimated``; ``lag_seconds`` is the age of the first unprocessed event, not of
       the oldest (they differ only among events appended concurrently); ``version`` and
       ``serving``, and the state ``superseded``.
    """

    name: str
    checkpoint: Position | None
    lag_events: int
    lag_seconds: float
    leader: LeaderInfo | None
    standbys: int
    state: ProjectionState
    last_error: str | None
    updated_at: dt.datetime | None
    dead_letters: int
    held_back_by: OpenTransaction | None = None
    partition: int | None = None
    partitions: int = 1
    runnable_by: int | None = None
    lacking_hosts: tuple[LeaderInfo, ...] = ()
    checkpoint_ahead: bool = False
    foreign_locks: tuple[ForeignLock, ...] = ()
    lag_estimated: bool = False
    version: int = 1
    serving: bool = True

    @property
    def unrunnable(self) -> bool:
        """True when balancing hosts are live and none of them can run this unit.

        .. versionadded:: 0.3
        """
        return self.runnable_by == 0

    @property
    def unit(self) -> str:
        """The name keying this record's lock and checkpoint (``"name[2/4]"`` for a partition).

        .. versionadded:: 0.2
        """
        return unit_name(versioned_name(self.name, self.version), self.partition, self.partitions)


@final
@attrs.frozen(kw_only=True)
class DeadLetter:
    """An event a projector skipped (`FailureStrategy.SKIP`), kept for inspection and replay.

    Attributes:
        id: the dead letter's id.
        projection: the projector that skipped it.
        partition: the partition it was skipped in, or None (unpartitioned).
        event: the skipped event (undecodable events included).
        error_type: the exception's qualified class name.
        error_message: the exception's message.
        retries: how many retries preceded the skip.
        recorded_at: when it was recorded.

    .. versionadded:: 0.1
    """

    id: uuid.UUID
    projection: str
    event: RecordedEvent | UndecodableEvent
    error_type: str
    error_message: str
    retries: int
    recorded_at: dt.datetime
    partition: int | None = None

    @property
    def position(self) -> Position:
        """The skipped event's position."""
        return self.event.position


def host_coverage(
    unit: str, hosts: Iterable[tuple[HostState, LeaderInfo]]
) -> tuple[int | None, tuple[LeaderInfo, ...]]:
    """``runnable_by`` and ``lacking_hosts`` of *unit*, given the live hosts and who they are
    (the same rule for every backend)."""
    live = list(hosts)
    if not live:
        return None, ()
    lacking = tuple(
        sorted(
            (info for state, info in live if unit not in state.can_run),
            key=lambda info: (info.host, info.pid, info.application_name),
        )
    )
    return len(live) - len(lacking), lacking


def status_order(record: ProjectionStatus) -> tuple[str, int, int]:
    """The order of `projection_status` records: by projection, partition count, partition."""
    return (record.name, record.partitions, record.partition or 0)


def ahead_error(unit: str, checkpoint: Position, last_error: str | None) -> str:
    """``last_error`` of a unit whose checkpoint is ahead of the store (the same words for
    every backend): what `CheckpointAhead` says, then the error last recorded, if any."""
    message = str(CheckpointAhead(unit, checkpoint, stored=True))
    return message if last_error is None else f"{message}. Last error before: {last_error}"


def _info_json(info: LeaderInfo) -> dict[str, object]:
    return {"pid": info.pid, "host": info.host, "application_name": info.application_name}


def foreign_lock_json(lock: ForeignLock) -> dict[str, object]:
    """One `ForeignLock` as JSON values, with the line `ForeignLock.describe` prints."""
    return {
        "kind": lock.kind,
        "unit": lock.unit,
        "exclusive": lock.exclusive,
        "granted": lock.granted,
        "pid": lock.pid,
        "user": lock.user,
        "application_name": lock.application_name,
        "client_addr": lock.client_addr,
        "connected_at": None if lock.connected_at is None else lock.connected_at.isoformat(),
        "waiting_since": None if lock.waiting_since is None else lock.waiting_since.isoformat(),
        "description": lock.describe(),
    }


def status_json(record: ProjectionStatus) -> dict[str, object]:
    """One unit's status as JSON values (``eventcore-trio status --json``, the dashboard)."""
    held = record.held_back_by
    return {
        "name": record.name,
        "unit": record.unit,
        "partition": record.partition,
        "partitions": record.partitions,
        "state": record.state.value,
        "checkpoint": None if record.checkpoint is None else str(record.checkpoint),
        "checkpoint_ahead": record.checkpoint_ahead,
        "lag_events": record.lag_events,
        "lag_seconds": record.lag_seconds,
        "lag_estimated": record.lag_estimated,
        "version": record.version,
        "serving": record.serving,
        "leader": None if record.leader is None else _info_json(record.leader),
        "runnable_by": record.runnable_by,
        "lacking_hosts": [_info_json(info) for info in record.lacking_hosts],
        "standbys": record.standbys,
        "dead_letters": record.dead_letters,
        "last_error": record.last_error,
        "updated_at": None if record.updated_at is None else record.updated_at.isoformat(),
        "held_back_by": None
        if held is None
        else {
            "pid": held.pid,
            "application_name": held.application_name,
            "state": held.state,
            "started_at": None if held.started_at is None else held.started_at.isoformat(),
            "query": held.query,
        },
        "foreign_locks": [foreign_lock_json(lock) for lock in record.foreign_locks],
    }


# What hosts tell each other about the units they run: the values of host membership.
# What hosts tell each other about the units they run: the values of host membership.
#
# Each host running `run_projections` with balancing joins the store's host registry
# (`ProjectorCoordinator.register_host`, saying which units it runs), publishes which units it
# leads and which it stands by for, and reads the others'. `projection/_balance.py` turns a
# view into a plan.


@attrs.frozen
class HostState:
    """What one live host published: the units it runs, leads and stands by for.

    Attributes:
        leading: the units it leads.
        standing_by: the units it stands by for.
        runs: the units it can run (its projectors' units), or None for a host that has
            not said (one of a version that did not publish it): such a host counts as
            able to run only what it leads or stands by for.

    .. versionadded:: 0.2
    .. versionchanged:: 0.3
       ``runs``.
    """

    leading: frozenset[str] = frozenset()
    standing_by: frozenset[str] = frozenset()
    runs: frozenset[str] | None = None

    @property
    def can_run(self) -> frozenset[str]:
        """The units this host can run: ``runs``, or what it leads or stands by for when it
        has not said; a unit it leads always counts.

        .. versionadded:: 0.3
        """
        if self.runs is None:
            return self.leading | self.standing_by
        return self.runs | self.leading


@attrs.frozen
class ClusterView:
    """The live hosts and which of the units' locks are held, read at one moment.

    .. versionadded:: 0.2
    """

    hosts: Mapping[str, HostState]
    held: frozenset[str]


@final
@attrs.frozen(kw_only=True)
class LiveHost:
    """A live balancing host as the registry lists it: which process it is, since when, and
    what it last published (`ProjectionAdmin.live_hosts`).

    A host that leads nothing (idle, or standing by only) is listed too: it is alive and
    would take units over.

    Attributes:
        host_id: its registration's id (`HostMembership.host_id`).
        process: the process: its pid, the machine's host name and the store's application
            name (on the memory backend: ``"memory host <host_id>"``).
        joined_at: when it registered (UTC).
        state: what it published: the units it leads, stands by for and can run.

    .. versionadded:: 0.4
    """

    host_id: str
    process: LeaderInfo
    joined_at: dt.datetime
    state: HostState


def live_host_json(host: LiveHost) -> dict[str, object]:
    """One `LiveHost` as JSON values (``eventcore-trio status --json``, the dashboard)."""
    runs = host.state.runs
    return {
        "host_id": host.host_id,
        **_info_json(host.process),
        "joined_at": host.joined_at.isoformat(),
        "leading": sorted(host.state.leading),
        "standing_by": sorted(host.state.standing_by),
        "runs": None if runs is None else sorted(runs),
    }
