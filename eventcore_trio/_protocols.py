"""The five capabilities a backend provides, as `typing.Protocol` classes.

The projection layer depends only on these; backends implement them. Every method documented
here is a Trio checkpoint, and cancelling it leaves the store unchanged: an append either
commits whole or not at all.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Literal, Protocol, overload, runtime_checkable

from ._events import AppendResult, NewEvent, RecordedEvent, StreamAppend, UndecodableEvent
from ._filters import EventFilter
from ._personal._forget import ForgetRecord
from ._personal._keys import KeyWrapper
from ._positions import Position
from ._queries import AppendCondition, EventQuery, QueryResult
from ._snapshots import Snapshot
from ._status import ClusterView, DeadLetter, LiveHost, ProjectionState, ProjectionStatus
from ._validation import check_expected_version, check_stream_id
from ._versions import VersionRole, VersionSwitch

if TYPE_CHECKING:
    # The iterator `subscribe` returns: one implementation, in the backends' kit.
    from ._backend._subscription import EventSubscription


@runtime_checkable
class EventStore(Protocol):
    """Appends events to streams with optimistic concurrency and reads streams back.

    Expected versions: ``None`` appends whatever the stream's version; ``0`` requires that the
    stream does not exist yet; ``n`` requires that it holds exactly ``n`` events. A mismatch
    raises `VersionConflict` with the stream's actual version and writes nothing.

    .. versionadded:: 0.1
    """

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None = None,
    ) -> AppendResult:
        """Append *events* to one stream, all or none.

        Raises:
            VersionConflict: the stream's version is not *expected_version*.
            InvalidArgument: a bad stream id, version or event (nothing written).
            EventEncodeError: data or metadata is not JSON (nothing written).
        """
        ...

    async def append_atomic(self, appends: Sequence[StreamAppend]) -> AppendResult:
        """Append to several streams in one transaction: every stream or none.

        Every listed stream's expected version is checked, including streams that receive no
        event (read-only participants), so a decision that read a stream fails if that stream
        changed. The returned ``position`` is that of the last event written.

        Raises:
            VersionConflict: for the first stream (in stream-id order) whose version differs.
        """
        ...

    async def read_stream(self, stream_id: str, *, after_version: int = 0) -> list[RecordedEvent]:
        """Return the stream's events with a version above *after_version*, oldest first.

        A stream that does not exist reads as an empty list.
        """
        ...


class OneStreamAppend:
    """`append` said once, in terms of `append_atomic`, for everything that appends.

    The stores, `PostgresTransaction` and `ProjectionContext` inherit it; each one's
    `append_atomic` says where its events go and when they commit (at once, with the
    application's transaction, or with a projection batch's checkpoint).
    """

    __slots__ = ()

    async def append_atomic(self, appends: Sequence[StreamAppend]) -> AppendResult:
        """Append to several streams, all or none (see `EventStore.append_atomic`)."""
        raise NotImplementedError

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None = None,
    ) -> AppendResult:
        """Append *events* to one stream, all or none: `append_atomic` with one
        `StreamAppend` (see `EventStore.append`).

        Raises:
            VersionConflict: the stream's version is not *expected_version*.
            InvalidArgument: a bad stream id, version or event (nothing written).
            EventEncodeError: data or metadata is not JSON (nothing written).
        """
        request = StreamAppend(
            check_stream_id(stream_id),
            events,  # the converter validates and freezes it
            expected_version=check_expected_version(expected_version),
        )
        return await self.append_atomic([request])


@runtime_checkable
class SnapshotStore(Protocol):
    """Keeps `Snapshot` values: folded stream states that spare a fresh process the fold.

    A store of snapshots is a cache with a durable copy, never the source of truth.

    .. versionadded:: 0.3
    """

    async def read_snapshot(self, stream_id: str, state: str) -> Snapshot | None:
        """The snapshot of *stream_id* under state name *state*, if one was written."""
        ...

    async def read_stream_from_snapshot(
        self, stream_id: str, state: str
    ) -> tuple[Snapshot | None, list[RecordedEvent]]:
        """The snapshot of *stream_id* under *state* and the stream's events from it on.

        With a snapshot, the events start at its ``stream_version`` (the event at that
        version included: whether it is the event the snapshot ends at, by id and
        ``recorded_at``, tells whether the stream still holds the history it was folded
        from); without one, they are the whole stream. A snapshot that does not name its
        event reads as none. One round trip on PostgreSQL, where a cold command starts.
        """
        ...

    async def write_snapshot(self, snapshot: Snapshot) -> None:
        """Keep *snapshot*, replacing an older one of the same stream and state name.

        A snapshot of a lower stream version than the one kept (at the same state version)
        is dropped, so concurrent writers never move a snapshot backwards, unless the kept
        one is no longer proven by its stream (it names no event, or its event, by id and
        ``recorded_at``, is not the stream's at its version): that one any write replaces.

        Raises:
            EventEncodeError: its data is not JSON.
        """
        ...

    async def delete_snapshots(self, stream_id: str | None = None) -> int:
        """Delete the snapshots of *stream_id* (every stream's when None); return how many."""
        ...


@runtime_checkable
class EventReader(Protocol):
    """Reads the store's global order: every committed event, each exactly once, in order.

    .. versionadded:: 0.1
    """

    @overload
    async def read_events(
        self,
        after: Position | None,
        *,
        limit: int,
        filter: EventFilter | None = None,
        undecodable: Literal["raise"] = "raise",
    ) -> list[RecordedEvent]: ...

    @overload
    async def read_events(
        self,
        after: Position | None,
        *,
        limit: int,
        filter: EventFilter | None = None,
        undecodable: Literal["include"],
    ) -> list[RecordedEvent | UndecodableEvent]: ...

    async def read_events(
        self,
        after: Position | None,
        *,
        limit: int,
        filter: EventFilter | None = None,
        undecodable: Literal["raise", "include"] = "raise",
    ) -> list[RecordedEvent] | list[RecordedEvent | UndecodableEvent]:
        """Return up to *limit* events strictly after *after*, in position order.

        The cursor is exclusive: passing the last returned position continues where the page
        ended. The filter is applied before the limit, so a page is short only when no more
        matching events are visible. No committed event is ever skipped: an event whose
        transaction commits after a reader passed its neighbours still comes later in the
        order (see the docs on gap-free reads).

        Args:
            undecodable: ``"raise"`` raises `EventDecodeError` at a stored event that does not
                decode; ``"include"`` returns it as an `UndecodableEvent` in its place.
        """
        ...

    async def last_position(self, filter: EventFilter | None = None) -> Position | None:
        """The position of the last event visible to readers (matching *filter*), or None."""
        ...

    async def wait_for_events(self) -> None:
        """Return when new events may have been committed (a hint: wake-ups can be spurious).

        Never returns on its own if nothing is appended: bound it with a cancel scope, e.g.
        ``with trio.move_on_after(poll_interval): await store.wait_for_events()``.
        """
        ...

    @overload
    def subscribe(
        self,
        after: Position | None = None,
        *,
        filter: EventFilter | None = None,
        page_size: int = 100,
        poll_interval: float = 1.0,
        undecodable: Literal["raise"] = "raise",
    ) -> EventSubscription[RecordedEvent]: ...

    @overload
    def subscribe(
        self,
        after: Position | None = None,
        *,
        filter: EventFilter | None = None,
        page_size: int = 100,
        poll_interval: float = 1.0,
        undecodable: Literal["include"],
    ) -> EventSubscription[RecordedEvent | UndecodableEvent]: ...

    def subscribe(
        self,
        after: Position | None = None,
        *,
        filter: EventFilter | None = None,
        page_size: int = 100,
        poll_interval: float = 1.0,
        undecodable: Literal["raise", "include"] = "raise",
    ) -> EventSubscription[RecordedEvent] | EventSubscription[RecordedEvent | UndecodableEvent]:
        """Follow every committed event after *after* (None: from the start), live::

            async with store.subscribe(position) as events:
                async for event in events:
                    ...

        It yields what paging `read_events` yields, in the global order and gap-free (a late
        commit included), then waits for more: on `wait_for_events` (NOTIFY on PostgreSQL),
        re-reading at least every *poll_interval* seconds. It reads a page of up to
        *page_size* events only when the consumer has used up the last one, so at most one
        page is buffered, and runs no background task: leaving the block or cancelling the
        consumer ends it, and `EventSubscription.position` (the last event yielded) is where a
        new subscription goes on.

        Args:
            filter: only events that match (applied by the store, as in `read_events`).
            undecodable: ``"raise"``: a step raises `EventDecodeError` at an event that does
                not decode (the events before it are yielded first); ``"include"``: it is
                yielded as an `UndecodableEvent`.

        Raises:
            InvalidArgument: an argument has the wrong type or value (raised by this call,
                before any I/O).

        .. versionadded:: 0.4
        """
        ...


@runtime_checkable
class CheckpointStore(Protocol):
    """Remembers how far each named projection has processed the global order.

    .. versionadded:: 0.1
    """

    async def load_checkpoint(self, name: str) -> Position | None:
        """Return the saved position for *name*, or None if there is none.

        Raises:
            CheckpointAhead: the saved position is beyond every position the store can have
                produced (saved before such saves were refused, or by hand): a projection
                would skip every event from it. Reset the projection.

        .. versionchanged:: 0.3
           Raises `CheckpointAhead`.
        """
        ...

    async def save_checkpoint(self, name: str, position: Position) -> None:
        """Save *position* for *name*; a checkpoint never moves backwards.

        Saving the current position again is accepted and changes nothing.

        Raises:
            CheckpointConflict: *position* is before the saved one (nothing changed).
            CheckpointAhead: *position* is beyond every position the store can have produced
                (a later transaction or sequence number than any it drew); nothing changed.

        .. versionchanged:: 0.3
           Raises `CheckpointAhead`.
        """
        ...


@runtime_checkable
class Database(Protocol):
    """A projector's database transaction (``ctx.db``), callable from Trio.

    Everything run through it commits in the same transaction as the projector's checkpoint,
    or not at all. Arguments are positional (``$1``, ``$2``, … in the SQL).

    .. versionadded:: 0.1
    """

    def queue(self, sql: str, *args: object) -> None:
        """Queue a write to send with the batch's other queued writes (not a checkpoint).

        Queued writes go out before the next statement through this object and before the
        checkpoint, in order, runs of the same statement as one pipelined ``executemany``,
        all in one round of sending: a projector that writes once per event pays for a
        batch, not for each event. A read sees them (it sends them first). A queued write
        that fails fails its batch; the runtime then applies the batch's events one at a
        time, so the failure lands on its own event and ``on_error`` decides as usual.

        .. versionadded:: 0.2
        """
        ...

    async def flush(self) -> None:
        """Send the queued writes now.

        .. versionadded:: 0.2
        """
        ...

    async def execute(self, sql: str, *args: object) -> str:
        """Run a statement; return its status tag (e.g. ``"INSERT 0 1"``)."""
        ...

    async def executemany(self, sql: str, args: Iterable[Sequence[object]]) -> None:
        """Run a statement once per argument tuple (pipelined)."""
        ...

    async def fetch(self, sql: str, *args: object) -> list[Mapping[str, Any]]:
        """Run a query and return every row."""
        ...

    async def fetchrow(self, sql: str, *args: object) -> Mapping[str, Any] | None:
        """Run a query and return its first row, or None."""
        ...

    async def fetchval(self, sql: str, *args: object) -> Any:
        """Run a query and return the first column of its first row."""
        ...


@runtime_checkable
class ProjectionBatch(Protocol):
    """One transaction on the leader's own session, opened by `Leadership.open_batch`.

    The projector's writes through `db`, recorded dead letters and the checkpoint commit
    together when the batch's block ends without an exception, and not at all otherwise.

    .. versionadded:: 0.1
    """

    @property
    def db(self) -> Database:
        """The transaction, for the projector's own writes.

        Raises:
            DatabaseNotAvailable: the store has no database (the in-memory store).
        """
        ...

    @property
    def failure(self) -> BaseException | None:
        """Why the batch can no longer commit although no handler raised, or None.

        For example a `BatchInterrupted`: a statement through `db` was cancelled mid-flight.
        The runner checks it after each handler, so the failure lands on that event.

        .. versionadded:: 0.2
        """
        ...

    async def run_setup(self, setup: Callable[[Database], Awaitable[None]]) -> None:
        """Run a projector's setup hook (``async def setup(db)``) in this batch's transaction,
        one unit of the projection version at a time: its units share one read-model schema,
        whose DDL two transactions must not run at once.

        .. versionadded:: 0.4
        """
        ...

    async def flush(self) -> None:
        """Send the writes queued through `db` (``Database.queue``) now; a no-op without any.

        .. versionadded:: 0.2
        """
        ...

    async def save_checkpoint(self, expected: Position | None, position: Position) -> None:
        """Move the checkpoint from *expected* to *position*, at commit (compare-and-set).

        Raises:
            CheckpointConflict: the stored checkpoint is not *expected* (another writer).
            CheckpointAhead: *position* is beyond every position the store can have
                produced; the batch does not commit.

        .. versionchanged:: 0.3
           Raises `CheckpointAhead`.
        """
        ...

    async def record_dead_letter(
        self, event: RecordedEvent | UndecodableEvent, error: BaseException, *, retries: int
    ) -> None:
        """Record *event* as skipped because of *error*."""
        ...

    async def resolve_dead_letter(self, dead_letter_id: uuid.UUID) -> None:
        """Delete a dead letter of this batch's unit as replayed, in this transaction.

        It is deleted when the batch commits, with what the batch wrote, or not at all.

        Raises:
            DeadLetterNotFound: this unit has no dead letter *dead_letter_id* (another
                replay or a reset removed it, a split moved it, or it is another unit's);
                the batch cannot commit.

        .. versionchanged:: 0.3
           A dead letter that is not there fails the batch, instead of deleting nothing.
        """
        ...

    async def append_atomic(self, appends: Sequence[StreamAppend]) -> AppendResult:
        """Append events in this batch: they commit with the checkpoint, or not at all.

        Expected versions are checked as by `EventStore.append_atomic`.

        Raises:
            VersionConflict: a stream's version differs (the batch cannot commit).

        .. versionadded:: 0.3
        """
        ...


@runtime_checkable
class Leadership(Protocol):
    """Proof that this session leads a name, valid until it is lost or released.

    .. versionadded:: 0.1
    """

    @property
    def name(self) -> str:
        """The name this leadership was acquired for."""
        ...

    @property
    def is_held(self) -> bool:
        """False once the lock is known to be lost or released."""
        ...

    @property
    def lost_reason(self) -> str | None:
        """Why the lock was lost, when known beyond "its session ended"; else None.

        .. versionadded:: 0.2
        """
        ...

    async def wait_lost(self) -> None:
        """Return once the lock is lost (its session ended) or released."""
        ...

    def open_batch(
        self, *, read_model: bool = False
    ) -> AbstractAsyncContextManager[ProjectionBatch]:
        """Open a transaction on the lock-holding session (fencing: a dead session cannot commit).

        Args:
            read_model: run the batch in the read-model schema of the unit's projection
                version (PostgreSQL: created if missing, first on the batch's
                ``search_path``, so that unqualified names in ``ctx.db`` land there); the
                memory backend has no schemas and ignores it.

        Raises:
            LeadershipLost: the lock is already lost.

        .. versionchanged:: 0.4
           *read_model*.
        """
        ...

    async def report(
        self,
        state: ProjectionState,
        *,
        error: str | None = None,
        filter: EventFilter | None = None,
    ) -> None:
        """Record this leader's state (and its filter, for lag) for `projection_status`."""
        ...


@runtime_checkable
class HostMembership(Protocol):
    """A host's place in the store's host registry, from `ProjectorCoordinator.register_host`.

    The host is listed while the registration lasts and the store can prove it alive (on
    PostgreSQL: while its membership lock's session lives), so a host that dies drops out of
    every view at once.

    .. versionadded:: 0.2
    """

    @property
    def host_id(self) -> str:
        """This host's id, unique among hosts that ever registered."""
        ...

    @property
    def is_held(self) -> bool:
        """False once the registration is lost (register again to come back)."""
        ...

    async def publish(self, leading: frozenset[str], standing_by: frozenset[str]) -> None:
        """Tell the other hosts which units this host leads and stands by for."""
        ...

    async def view(self, units: Sequence[str]) -> ClusterView:
        """The live hosts with what they published, and which of *units* are led by anyone."""
        ...

    async def wait_changed(self) -> None:
        """Return when a host may have joined, left or published (a hint; bound it)."""
        ...


@runtime_checkable
class ProjectorCoordinator(Protocol):
    """Ensures at most one active instance per projector name, across processes and machines.

    .. versionadded:: 0.1
    """

    def try_acquire(self, name: str) -> AbstractAsyncContextManager[Leadership]:
        """Take leadership of *name* without waiting, for the duration of an ``async with``.

        On exit, on an exception and on cancellation the leadership is released.

        Raises:
            LeadershipUnavailable: another session leads *name*.
        """
        ...

    def wait_acquire(
        self, name: str, *, on_standby: Callable[[], None] | None = None
    ) -> AbstractAsyncContextManager[Leadership]:
        """Take leadership of *name*, waiting as a standby while another session leads.

        Takeover is immediate when the leader's session ends (on PostgreSQL the standby blocks
        in ``pg_advisory_lock``, which the server grants at once). *on_standby* is called once
        if the name is taken when the call starts, just before the wait begins (on PostgreSQL
        the waiting lock request reaches the server a moment later). Cancel the call to stop
        waiting.
        """
        ...

    def register_host(
        self, *, runs: Collection[str] | None = None
    ) -> AbstractAsyncContextManager[HostMembership]:
        """Join the host registry for the block: what balancing hosts use to find each other.

        Args:
            runs: the units this host can run (its projectors' unit names), so that the
                other hosts plan each unit only over the hosts that can run it; None says
                nothing (the host then counts as able to run only what it leads or stands
                by for).

        .. versionadded:: 0.2
        .. versionchanged:: 0.3
           *runs*.
        """
        ...

    async def set_partitions(
        self, name: str, partitions: int, *, on_waiting: Callable[[], None] | None = None
    ) -> None:
        """Record that projection *name* runs as *partitions* units; the runtime calls it.

        Every unit calls it once it leads, before it applies anything, so a unit never runs
        with a count its projection no longer has. Unchanged, it only checks. A split to a
        multiple of the current count continues each new partition from its parent's
        checkpoint (and moves dead letters to their stream's partition); a projection with
        nothing applied (new, or just reset) may take any count.

        A change holds the lock of every unit of the current count while it is made, so it
        waits until no unit of the current count is led or awaited: it calls *on_waiting*
        once, just before it first waits, and then tries again whenever that may have
        changed (on PostgreSQL: when a host joins, leaves or publishes, and at least every
        second). It takes those locks all at once or not at all, never holding some while
        it waits for others and never queueing ahead of a unit's standby, so hosts running
        the current count keep leading every unit of it for as long as they run. Cancel the
        call to stop waiting.

        Raises:
            PartitionsChanged: any other change, raised before any wait; nothing is changed.

        .. versionadded:: 0.2
        .. versionchanged:: 0.3
           *on_waiting*; the change takes the current count's locks all at once.
        """
        ...

    async def version_role(self, name: str, version: int) -> VersionRole:
        """What *version* of projection *name* does now (see `VersionRole`); the runtime asks
        before a unit of it runs and while it runs.

        While no version of *name* serves, the first one asked about starts serving at once
        (recorded as a ``"first"`` `VersionSwitch`): there is nothing else to serve.

        Raises:
            InvalidArgument: *name* is not a projector name, or *version* is not a version.

        .. versionadded:: 0.4
        """
        ...

    async def switch_if_caught_up(
        self, name: str, version: int, units: Sequence[tuple[str, EventFilter]]
    ) -> VersionRole:
        """Make *version* of *name* serve, if it is `VersionRole.BUILDING` and has caught up.

        Caught up: each of *units* (every unit of the version, by unit name, with the filter
        it applies) has no committed matching event after its checkpoint (a unit without a
        checkpoint: no matching event at all), checked in the same atomic step that records
        the switch (a ``"caught-up"`` `VersionSwitch`), so readers move from one complete
        read model to the other. Returns the version's role afterwards.

        .. versionadded:: 0.4
        """
        ...

    async def recorded_partitions(self, name: str) -> int | None:
        """How many units projection *name* runs as, as recorded here; None if it never ran.

        Operations on a projection's units (replaying dead letters, say) go by this count,
        never by a projector object's, which may be older or newer code. It changes only
        while every unit of the current count is locked (see `set_partitions`), so it
        holds for as long as a caller holds those units' leaderships.

        Raises:
            InvalidArgument: *name* is not a projector name (a unit's name, say).

        .. versionadded:: 0.3
        """
        ...


@runtime_checkable
class ProjectionAdmin(Protocol):
    """Operators' view of projections: status, reset and dead letters.

    .. versionadded:: 0.1
    """

    async def projection_status(self) -> list[ProjectionStatus]:
        """One record per unit that has run against this store or that a live balancing host
        runs: per projection, by name, and per partition of a partitioned projection.

        Each record says how many live balancing hosts can run its unit and names those that
        cannot (``runnable_by``, ``lacking_hosts``), so a unit no live host has shows up.
        During a change of partition count, the units of the new count are listed too while
        a live host runs them or a session leads or awaits them, as
        `ProjectionState.AWAITING_SPLIT` (or FAILED, when the change is refused).

        .. versionchanged:: 0.3
           Units a live host runs are listed before they first run; so are units of a
           partition count that is not (yet) the recorded one.
        """
        ...

    async def reset_projection(self, name: str, *, wait: bool = False) -> None:
        """Forget *name*'s checkpoint and dead letters, so its next run rebuilds from the start.

        A partitioned projection is reset whole: every partition's lock is taken first.

        Raises:
            ProjectionRunning: an instance runs it and *wait* is False.
            ProjectionNotFound: no projection of that name has run here.
        """
        ...

    async def dead_letters(self, name: str) -> list[DeadLetter]:
        """The events *name* (every partition of it) skipped and that have not been replayed, in
        position order; a unit name (``"name[2/4]"``) gives that partition's only."""
        ...

    async def serving_version(self, name: str) -> int | None:
        """The version of projection *name* whose read model serves reads; None while no
        version of it has run.

        .. versionadded:: 0.4
        """
        ...

    async def version_switches(self, name: str) -> list[VersionSwitch]:
        """Every change of *name*'s serving version, oldest first (the changelog).

        .. versionadded:: 0.4
        """
        ...

    async def serve_version(self, name: str, version: int) -> None:
        """Make *version* of *name* serve now, whether it caught up or not: an operator's
        switch (a ``"manual"`` `VersionSwitch`), back to a retained older version too.

        A version it switches back from, and every other version above the new serving one,
        is withdrawn: it stops and never takes over on its own. The version that serves
        applies events again once a host runs it (from where it stopped: until then its
        read model is as old as its checkpoint).

        Raises:
            ProjectionNotFound: that version of *name* never ran here (or was retired).

        .. versionadded:: 0.4
        """
        ...

    async def retire_version(self, name: str, version: int, *, wait: bool = False) -> None:
        """Drop a version that does not serve: its checkpoints, dead letters, recorded
        partition count and (PostgreSQL) its read-model schema.

        Raises:
            InvalidArgument: *version* serves (switch to another first).
            ProjectionRunning: a unit of it runs and *wait* is False.
            ProjectionNotFound: that version of *name* never ran here.

        .. versionadded:: 0.4
        """
        ...

    async def live_hosts(self) -> list[LiveHost]:
        """Every live balancing host (registered with `ProjectorCoordinator.register_host`,
        as `run_projections` does), idle ones and those only standing by included, oldest
        first: which process it is, since when, and what it last published.

        A host drops out the moment its registration ends (on PostgreSQL: the moment the
        server ends its membership lock's session, so a killed host too). Processes running
        a unit without balancing (`run_projection`) are not hosts: `projection_status` names
        them as leaders.

        .. versionadded:: 0.4
        """
        ...


@runtime_checkable
class TaggedEventStore(Protocol):
    """Dynamic consistency boundaries: read the events matching a query, append only if none
    matching it was written since (decision record 14). Both stores implement it; it is part
    of `Store`'s contract suite (`TaggedContract`).

    .. versionadded:: 0.4
    """

    async def read_query(
        self, query: EventQuery, *, after: Position | None = None, limit: int | None = None
    ) -> QueryResult:
        """The events matching *query* after *after*, in the global order, gap-free (at most
        *limit*), and the position up to which the read is complete (`QueryResult`)."""
        ...

    async def append_tagged(
        self,
        events: Sequence[NewEvent],
        *,
        condition: AppendCondition | None = None,
        stream_id: str | None = None,
        expected_version: int | None = None,
    ) -> AppendResult:
        """Append *events* (one commit) if *condition* holds: no event matching its query
        lies after its position. Two decisions whose queries overlap never both succeed.

        Without *stream_id* the events go to a stream of their own (``"$tagged-<uuid>"``);
        with it, *expected_version* is checked as by `EventStore.append`.

        Raises:
            AppendConditionFailed: a matching event lies after the condition's position;
                nothing was written.
            VersionConflict: *stream_id* is not at *expected_version*.
        """
        ...


@runtime_checkable
class PersonalDataStore(Protocol):
    """Personal data that can be forgotten (crypto-shredding): each data subject's personal
    fields (`NewEvent.personal`) are sealed under a key of its own, and forgetting the
    subject deletes the key (docs/personal-data.md, decision record 15). The memory store
    implements it; the PostgreSQL store follows (issue 29).

    .. versionadded:: 0.4
    """

    async def forget(self, subject: str) -> ForgetRecord:
        """Forget *subject*: delete its data key, so that its personal fields read back
        absent from every event (`RecordedEvent.forgotten` names them) and can never be
        read again from this store; nothing fails to decode.

        In the same step the snapshots of the streams holding its personal events are
        deleted, a ``SubjectForgotten`` event is appended (stream ``$forgotten-<subject>``,
        data: the subject, when, host and pid), so that projections in every process can
        erase what they derived, and the audit record is kept (`forget_records`). This
        process's state caches (`StateCache`) drop the states of those streams. From then
        on an append with personal fields of *subject* raises `SubjectForgottenError`.

        Forgetting a forgotten subject again changes nothing and returns the first record.

        Raises:
            SubjectNotFound: the store holds no personal data of *subject* (it never had a
                key); nothing changed.
            InvalidArgument: *subject* is not a valid subject id.
        """
        ...

    async def forget_records(self, subject: str | None = None) -> list[ForgetRecord]:
        """The audit of forgets, oldest first: every one, or *subject*'s (at most one)."""
        ...

    async def rewrap(self, key_encryption_key: bytes | KeyWrapper) -> int:
        """Wrap every subject's data key under *key_encryption_key* instead of the current
        one, then use it for new keys; return how many keys were rewrapped. Rotation: run
        it once, then open every process with the new key (docs/personal-data.md).

        Raises:
            ConfigurationError: the new key is not a valid key-encryption key, or a stored
                key does not unwrap under the current one.
        """
        ...


@runtime_checkable
class Store(
    EventStore, EventReader, CheckpointStore, ProjectorCoordinator, ProjectionAdmin, Protocol
):
    """A backend providing all five capabilities (`EventStore`, `EventReader`,
    `CheckpointStore`, `ProjectorCoordinator`, `ProjectionAdmin`), as the memory and
    PostgreSQL stores do.

    .. versionadded:: 0.1
    """
