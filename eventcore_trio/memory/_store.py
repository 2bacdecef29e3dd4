"""The in-memory backend: every protocol in pure Trio, for tests, examples and embedding.

Long on purpose: this is the reference implementation of the protocols, read side by side with
the PostgreSQL backend, so its batch, leadership and store stay together (about 600 lines).
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as dt
import os
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Literal, final, overload

import attrs
import trio

from .._backend._decoding import (
    check_read_arguments,
    decode_json_object,
    decode_stored,
    require_decoded,
)
from .._backend._leadership import LeadershipState
from .._errors import (
    CheckpointAhead,
    CheckpointConflict,
    DatabaseNotAvailable,
    DeadLetterNotFound,
    DuplicateEventId,
    InvalidArgument,
    LeadershipLost,
    LeadershipUnavailable,
    ProjectionNotFound,
    ProjectionRunning,
    StoreClosed,
    VersionConflict,
)
from .._events import (
    AppendResult,
    NewEvent,
    RecordedEvent,
    StreamAppend,
    UndecodableEvent,
    prepare_appends,
)
from .._filters import EventFilter
from .._partitions import (
    Unit,
    check_partitions,
    partition_of,
    plan_repartition,
    split_parent,
    units_of,
)
from .._positions import Position, position_parts
from .._protocols import Database
from .._snapshots import Snapshot, check_snapshot
from .._status import (
    ClusterView,
    DeadLetter,
    HostState,
    LeaderInfo,
    ProjectionState,
    ProjectionStatus,
    ahead_error,
    count_change,
    host_coverage,
    status_order,
    unit_state,
)
from .._validation import (
    MAX_EVENT_TYPE_LENGTH,
    check_expected_version,
    check_identifier,
    check_name,
    check_projector_name,
    check_stream_id,
    check_version_cursor,
    encode_json_object,
)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@attrs.frozen
class _StoredEvent:
    # Data and metadata are kept as the JSON text that was validated at append, so readers get
    # fresh dicts with exactly the types PostgreSQL would return, and nothing a caller mutates
    # later can change what is stored.
    event_id: uuid.UUID
    stream_id: str
    stream_version: int
    position: Position
    type: str
    data_json: str
    metadata_json: str
    recorded_at: dt.datetime

    def decode(self) -> RecordedEvent | UndecodableEvent:
        return decode_stored(
            self.position,
            self.stream_id,
            self.stream_version,
            self.event_id,
            self.type,
            self.data_json,
            self.metadata_json,
            self.recorded_at,
        )


@attrs.frozen
class _Backup:
    # The events of a MemoryStore at one moment (its _backup/_restore test hooks).
    log: list[_StoredEvent]
    streams: dict[str, list[_StoredEvent]]
    commit: int


@attrs.define
class _Projection:
    # What projection_status reports for one name; updated by leaders through report().
    state: ProjectionState = ProjectionState.STOPPED
    filter: EventFilter | None = None
    last_error: str | None = None
    leader: LeaderInfo | None = None
    updated_at: dt.datetime | None = None


# Seconds between a waiting change of partition count's looks while a unit of the old count
# is awaited but not led (a standby about to take it).
_REPARTITION_RETRY = 0.01

# An append_atomic request validated and encoded: requests in stream order, and per request
# each event with its data and metadata as JSON.
_Staged = tuple[list[StreamAppend], list[list[tuple[NewEvent, str, str]]]]


def _stage(appends: Sequence[StreamAppend]) -> _Staged:
    requests = sorted(prepare_appends(appends), key=lambda a: a.stream_id)
    encoded = [
        [
            (e, encode_json_object("data", e.data), encode_json_object("metadata", e.metadata))
            for e in request.events
        ]
        for request in requests
    ]
    return requests, encoded


@final
class MemoryBatch:
    """A staged transaction of a `MemoryLeadership`; applied whole when its block ends.

    .. versionadded:: 0.1
    """

    def __init__(self, store: MemoryStore, leadership: MemoryLeadership) -> None:
        self._store = store
        self._leadership = leadership
        self._checkpoint: tuple[Position | None, Position] | None = None
        self._dead_letters: list[DeadLetter] = []
        self._resolved: set[uuid.UUID] = set()
        self._appends: list[_Staged] = []

    @property
    def db(self) -> Database:
        """Not available on the memory store.

        Raises:
            DatabaseNotAvailable: always.
        """
        raise DatabaseNotAvailable(
            "the in-memory store has no database, so ctx.db is unavailable: use "
            "open_postgres_store() for projections that write through ctx.db, or keep the read "
            "model in the projector object"
        )

    async def save_checkpoint(self, expected: Position | None, position: Position) -> None:
        """Stage moving the checkpoint from *expected* to *position*.

        Raises:
            CheckpointAhead: *position* is beyond the store's last position.
        """
        await trio.lowlevel.checkpoint()
        self._store._check_not_ahead(self._leadership.name, position)
        self._checkpoint = (expected, position)

    @property
    def failure(self) -> BaseException | None:
        """Always None: nothing can interrupt a memory batch half-way."""
        return None

    async def flush(self) -> None:
        """Nothing to send: the memory store has no ``ctx.db``."""
        await trio.lowlevel.checkpoint()

    async def record_dead_letter(
        self, event: RecordedEvent | UndecodableEvent, error: BaseException, *, retries: int
    ) -> None:
        """Stage a dead letter for *event*."""
        await trio.lowlevel.checkpoint()
        unit = Unit.parse(self._leadership.name)
        self._dead_letters.append(
            DeadLetter(
                id=uuid.uuid4(),
                projection=unit.projection,
                partition=None if unit.partition is None else unit.partition.index,
                event=event,
                error_type=f"{type(error).__module__}.{type(error).__qualname__}",
                error_message=str(error),
                retries=retries,
                recorded_at=_now(),
            )
        )

    async def resolve_dead_letter(self, dead_letter_id: uuid.UUID) -> None:
        """Stage removing a replayed dead letter of this batch's unit.

        Raises:
            DeadLetterNotFound: the unit has no such dead letter (or this batch resolved
                it already); the batch cannot commit.
        """
        await trio.lowlevel.checkpoint()
        if dead_letter_id in self._resolved or not self._has_letter(dead_letter_id):
            raise DeadLetterNotFound(dead_letter_id, self._leadership.name)
        self._resolved.add(dead_letter_id)

    def _has_letter(self, dead_letter_id: uuid.UUID) -> bool:
        letters = self._store._dead_letters.get(self._leadership.name, ())
        return any(d.id == dead_letter_id for d in letters)

    async def append_atomic(self, appends: Sequence[StreamAppend]) -> AppendResult:
        """Stage an append, checked now against the store and this batch's earlier appends,
        and again when the batch commits (see `ProjectionBatch.append_atomic`).

        The result's versions are known now; its position once the batch commits (None
        until then: the memory store numbers positions by commit).
        """
        staged = _stage(appends)
        await trio.lowlevel.checkpoint()
        after = self._store._check_appends([*self._appends, staged])
        self._appends.append(staged)
        return AppendResult(None, {r.stream_id: after[r.stream_id] for r in staged[0]})

    def _commit(self) -> None:
        # Synchronous: the whole batch becomes visible at once, or (on an error) nothing.
        store, name = self._store, self._leadership.name
        if not self._leadership.is_held:
            raise LeadershipLost(f"leadership of {name!r} was lost; the batch was not committed")
        if self._checkpoint is not None:
            expected, position = self._checkpoint
            current = store._checkpoints.get(name)
            if current != expected:
                raise CheckpointConflict(name, position, current)
        # Every staged append and resolved dead letter is checked before anything changes.
        store._check_appends(self._appends)
        for dead_letter_id in self._resolved:
            if not self._has_letter(dead_letter_id):
                raise DeadLetterNotFound(dead_letter_id, name)
        if self._checkpoint is not None:
            store._checkpoints[name] = self._checkpoint[1]
        for staged in self._appends:
            store._apply(staged)
        letters = store._dead_letters.setdefault(name, [])
        letters[:] = [d for d in letters if d.id not in self._resolved]
        letters.extend(self._dead_letters)
        store._projection(name).updated_at = _now()


@final
class MemoryLeadership(LeadershipState):
    """Leadership of a name in a `MemoryStore`; obtained only from its ``*_acquire`` methods.

    .. versionadded:: 0.1
    """

    def __init__(self, store: MemoryStore, name: str) -> None:
        super().__init__(name)
        self._store = store

    @asynccontextmanager
    async def open_batch(self) -> AsyncIterator[MemoryBatch]:
        """Stage a batch; it is applied when the block ends without an exception.

        Raises:
            LeadershipLost: the leadership was lost before or during the batch.
        """
        if not self.is_held:
            raise LeadershipLost(f"leadership of {self._name!r} was lost")
        batch = MemoryBatch(self._store, self)
        yield batch
        await trio.lowlevel.checkpoint()
        batch._commit()

    async def report(
        self,
        state: ProjectionState,
        *,
        error: str | None = None,
        filter: EventFilter | None = None,
    ) -> None:
        """Record this leader's state for `MemoryStore.projection_status`."""
        await trio.lowlevel.checkpoint()
        if not self.is_held:
            raise LeadershipLost(f"leadership of {self._name!r} was lost")
        record = self._store._projection(self._name)
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
        record.updated_at = _now()


@final
class MemoryMembership:
    """A host's registration in a `MemoryStore`; obtained from its ``register_host``.

    .. versionadded:: 0.2
    """

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._host_id = uuid.uuid4().hex
        self._registered = True

    @property
    def host_id(self) -> str:
        """This host's id."""
        return self._host_id

    @property
    def is_held(self) -> bool:
        """True while registered."""
        return self._registered

    async def publish(self, leading: frozenset[str], standing_by: frozenset[str]) -> None:
        """Record what this host leads and stands by for (what it runs stays as registered)."""
        await trio.lowlevel.checkpoint()
        if self._registered:
            hosts = self._store._hosts
            hosts[self._host_id] = attrs.evolve(
                hosts[self._host_id], leading=leading, standing_by=standing_by
            )
            self._store._hosts_changed()

    async def view(self, units: Sequence[str]) -> ClusterView:
        """Every registered host, and which of *units* are led."""
        await trio.lowlevel.checkpoint()
        store = self._store
        return ClusterView(
            hosts=dict(store._hosts),
            held=frozenset(unit for unit in units if unit in store._leaders),
        )

    async def wait_changed(self) -> None:
        """Return after the next registration, departure or publication."""
        await self._store._hosts_event.wait()


@final
class MemoryStore:
    """An event store, reader, checkpoint store, coordinator and admin held in memory.

    Obtain one with `open_memory_store`. It has the same semantics as the PostgreSQL store,
    checked by the same contract suite, but it is process-local and lost when closed; its
    leadership is exclusive among the tasks of one process only.

    .. versionadded:: 0.1
    """

    def __init__(self) -> None:
        # Every event in position order; positions strictly increase along the list.
        self._log: list[_StoredEvent] = []
        self._positions: list[Position] = []
        # stream id -> that stream's events; len() is the stream's version.
        self._streams: dict[str, list[_StoredEvent]] = {}
        self._snapshots: dict[tuple[str, str], Snapshot] = {}
        self._event_ids: set[uuid.UUID] = set()
        self._checkpoints: dict[str, Position] = {}
        self._leaders: dict[str, MemoryLeadership] = {}
        self._waiting: Counter[str] = Counter()
        # Resets waiting for a leader to stop: not standbys, so not counted as such.
        self._reset_waiting: Counter[str] = Counter()
        self._projections: dict[str, _Projection] = {}
        # Projection name -> its partition count, as recorded by set_partitions.
        self._partitions: dict[str, int] = {}
        # Registered hosts and what they published; the event is replaced on every change.
        self._hosts: dict[str, HostState] = {}
        self._hosts_event = trio.Event()
        # How many registrations, departures and publications there were (a test hook).
        self._hosts_changes = 0
        self._dead_letters: dict[str, list[DeadLetter]] = {}
        # Set (and replaced) on every append, for wait_for_events.
        self._appended = trio.Event()
        # Ordinal of the last append ("transaction"); the commit part of every position.
        self._commit = 0
        # The recorded_at of the last append: each append's is later (see _recording_time).
        # A restore (_restore) keeps it, as a server's clock is not turned back by one.
        self._last_recorded_at = dt.datetime.min.replace(tzinfo=dt.UTC)
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(
                "this MemoryStore was closed; open a new one with open_memory_store()"
            )

    def _projection(self, name: str) -> _Projection:
        return self._projections.setdefault(name, _Projection())

    # -- EventStore ---------------------------------------------------------------------

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None = None,
    ) -> AppendResult:
        """Append *events* to one stream, all or none (see `EventStore.append`)."""
        request = StreamAppend(
            check_stream_id(stream_id),
            events,  # the converter validates and freezes it
            expected_version=check_expected_version(expected_version),
        )
        return await self.append_atomic([request])

    async def append_atomic(self, appends: Sequence[StreamAppend]) -> AppendResult:
        """Append to several streams, all or none (see `EventStore.append_atomic`)."""
        staged = _stage(appends)
        await trio.lowlevel.checkpoint()
        self._check_open()
        # From here on there is no checkpoint: the append is atomic with respect to other tasks.
        self._check_appends([staged])
        return self._apply(staged)

    def _check_appends(self, batches: Sequence[_Staged]) -> dict[str, int]:
        # Every expected version and event id of *batches*, applied in order, before any
        # is: one conflict and none is written. Returns each stream's version after them.
        versions: dict[str, int] = {}
        new_ids: set[uuid.UUID] = set()
        for requests, encoded in batches:
            for request in requests:
                stream_id = request.stream_id
                actual = versions.get(stream_id, len(self._streams.get(stream_id, ())))
                if request.expected_version is not None and request.expected_version != actual:
                    raise VersionConflict(stream_id, request.expected_version, actual)
                versions[stream_id] = actual + len(request.events)
            for batch in encoded:
                for event, _, _ in batch:
                    if event.event_id is not None:
                        if event.event_id in self._event_ids or event.event_id in new_ids:
                            raise DuplicateEventId(
                                f"event id {event.event_id} is already stored; nothing was written",
                                event_id=str(event.event_id),
                            )
                        new_ids.add(event.event_id)
        return versions

    def _recording_time(self) -> dt.datetime:
        # The recorded_at of one append's events: now, but strictly after every earlier
        # append's, even within one tick of a coarse clock, and after a restore. With the
        # event id it names a recorded event, which state commands rely on (a writer's
        # retry of an event a restore lost records the same id again, but later: see
        # commands/_states.py, _proves).
        now = max(_now(), self._last_recorded_at + dt.timedelta(microseconds=1))
        self._last_recorded_at = now
        return now

    def _apply(self, staged: _Staged) -> AppendResult:
        requests, encoded = staged
        if not any(encoded):
            return AppendResult(
                None, {r.stream_id: len(self._streams.get(r.stream_id, ())) for r in requests}
            )
        self._commit += 1
        now = self._recording_time()
        versions: dict[str, int] = {}
        position: Position | None = None
        for request, batch in zip(requests, encoded, strict=True):
            stream = self._streams.setdefault(request.stream_id, [])
            for event, data_json, metadata_json in batch:
                position = Position(self._commit, len(self._log) + 1)
                self._store(
                    _StoredEvent(
                        event_id=event.event_id or uuid.uuid4(),
                        stream_id=request.stream_id,
                        stream_version=len(stream) + 1,
                        position=position,
                        type=event.type,
                        data_json=data_json,
                        metadata_json=metadata_json,
                        recorded_at=now,
                    )
                )
            versions[request.stream_id] = len(stream)
        self._appended.set()
        self._appended = trio.Event()
        return AppendResult(position, versions)

    def _store(self, stored: _StoredEvent) -> None:
        self._streams.setdefault(stored.stream_id, []).append(stored)
        self._log.append(stored)
        self._positions.append(stored.position)
        self._event_ids.add(stored.event_id)

    async def read_stream(self, stream_id: str, *, after_version: int = 0) -> list[RecordedEvent]:
        """Return a stream's events after *after_version* (see `EventStore.read_stream`)."""
        check_stream_id(stream_id)
        check_version_cursor(after_version)
        await trio.lowlevel.checkpoint()
        self._check_open()
        stream = self._streams.get(stream_id, [])
        return [require_decoded(e.decode()) for e in stream[after_version:]]

    # -- SnapshotStore -------------------------------------------------------------------

    async def read_snapshot(self, stream_id: str, state: str) -> Snapshot | None:
        """The snapshot of *stream_id* under *state* (see `SnapshotStore.read_snapshot`)."""
        check_stream_id(stream_id)
        check_identifier("state", state, max_length=MAX_EVENT_TYPE_LENGTH)
        await trio.lowlevel.checkpoint()
        self._check_open()
        kept = self._snapshots.get((stream_id, state))
        if kept is None:
            return None
        # A copy, as a database would hand back: callers cannot change what is kept.
        data = decode_json_object(encode_json_object("snapshot", kept.data))
        return attrs.evolve(kept, data=data or {})

    async def read_stream_from_snapshot(
        self, stream_id: str, state: str
    ) -> tuple[Snapshot | None, list[RecordedEvent]]:
        """A snapshot and the events from it on (see
        `SnapshotStore.read_stream_from_snapshot`)."""
        snapshot = await self.read_snapshot(stream_id, state)
        if snapshot is not None and None in (snapshot.event_id, snapshot.event_recorded_at):
            # Never trusted (see Snapshot.event_id): read as none, as on PostgreSQL.
            snapshot = None
        start = 0 if snapshot is None else snapshot.stream_version - 1
        return snapshot, await self.read_stream(stream_id, after_version=start)

    async def write_snapshot(self, snapshot: Snapshot) -> None:
        """Keep *snapshot* (see `SnapshotStore.write_snapshot`)."""
        check_snapshot(snapshot)
        text = encode_json_object("snapshot", snapshot.data)
        await trio.lowlevel.checkpoint()
        self._check_open()
        key = (snapshot.stream_id, snapshot.state)
        kept = self._snapshots.get(key)
        if (
            kept is not None
            and kept.state_version == snapshot.state_version
            and kept.stream_version >= snapshot.stream_version
            and self._proves(kept)
        ):
            return
        self._snapshots[key] = attrs.evolve(
            snapshot, data=decode_json_object(text) or {}, taken_at=_now()
        )

    def _proves(self, snapshot: Snapshot) -> bool:
        # Whether the stream's event at the snapshot's version is still the recorded event
        # it ended at, id and recorded_at (a restore may have rewritten the stream since,
        # and a writer's retry put the same id back: see commands/_states.py, _proves); one
        # that is not is replaced by any newer write, as on PostgreSQL.
        stream = self._streams.get(snapshot.stream_id, [])
        if (
            snapshot.event_id is None
            or snapshot.event_recorded_at is None
            or len(stream) < snapshot.stream_version
        ):
            return False
        event = stream[snapshot.stream_version - 1]
        return (
            event.event_id == snapshot.event_id and event.recorded_at == snapshot.event_recorded_at
        )

    async def delete_snapshots(self, stream_id: str | None = None) -> int:
        """Delete snapshots (see `SnapshotStore.delete_snapshots`)."""
        if stream_id is not None:
            check_stream_id(stream_id)
        await trio.lowlevel.checkpoint()
        self._check_open()
        doomed = [key for key in self._snapshots if stream_id is None or key[0] == stream_id]
        for key in doomed:
            del self._snapshots[key]
        return len(doomed)

    # -- EventReader --------------------------------------------------------------------

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
        """Return up to *limit* events after *after* (see `EventReader.read_events`)."""
        check_read_arguments(after, limit, filter, undecodable)
        await trio.lowlevel.checkpoint()
        self._check_open()
        start = 0 if after is None else bisect.bisect_right(self._positions, after)
        page: list[RecordedEvent | UndecodableEvent] = []
        for stored in self._log[start:]:
            if filter is None or filter.matches(stored.stream_id, stored.type):
                decoded = stored.decode()
                page.append(require_decoded(decoded) if undecodable == "raise" else decoded)
                if len(page) == limit:
                    break
        return page

    async def last_position(self, filter: EventFilter | None = None) -> Position | None:
        """The position of the last stored event matching *filter*, or None."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        for stored in reversed(self._log):
            if filter is None or filter.matches(stored.stream_id, stored.type):
                return stored.position
        return None

    async def wait_for_events(self) -> None:
        """Return after the next append (see `EventReader.wait_for_events`)."""
        self._check_open()
        await self._appended.wait()

    # -- CheckpointStore ----------------------------------------------------------------

    async def load_checkpoint(self, name: str) -> Position | None:
        """Return the saved position for *name* (see `CheckpointStore.load_checkpoint`).

        Raises:
            CheckpointAhead: the stored checkpoint is beyond the store's last position.
        """
        check_name(name)
        await trio.lowlevel.checkpoint()
        self._check_open()
        position = self._checkpoints.get(name)
        if position is not None and self._ahead(position):
            raise CheckpointAhead(name, position, stored=True)
        return position

    async def save_checkpoint(self, name: str, position: Position) -> None:
        """Save a checkpoint; it never moves backwards (see `CheckpointStore`).

        Raises:
            CheckpointAhead: *position* is beyond the store's last position; nothing changed.
            CheckpointConflict: *position* is behind the saved one; nothing changed.
        """
        check_name(name)
        if not isinstance(position, Position):
            raise InvalidArgument(f"position must be a Position, got {type(position).__name__}")
        await trio.lowlevel.checkpoint()
        self._check_open()
        self._check_not_ahead(name, position)
        current = self._checkpoints.get(name)
        if current is not None and position < current:
            raise CheckpointConflict(name, position, current)
        self._checkpoints[name] = position
        self._projection(name).updated_at = _now()

    def _ahead(self, position: Position) -> bool:
        # Whether *position* is beyond every position this store has drawn: a greater
        # commit ordinal than the last append's, or a greater sequence than the number of
        # events (positions are drawn as (commit, len(log) + 1)). After a restore (_restore)
        # positions are drawn from where they were then, so a checkpoint at an event it
        # removed is ahead, as on PostgreSQL once its sequence is put back.
        commit, sequence = position_parts(position)
        return commit > self._commit or sequence > len(self._log)

    def _check_not_ahead(self, name: str, position: Position) -> None:
        if self._ahead(position):
            raise CheckpointAhead(name, position, stored=False)

    # -- ProjectorCoordinator -----------------------------------------------------------

    @asynccontextmanager
    async def try_acquire(self, name: str) -> AsyncIterator[MemoryLeadership]:
        """Lead *name* for the duration of an ``async with``, without waiting.

        Raises:
            LeadershipUnavailable: another task leads *name*.
        """
        check_name(name)
        await trio.lowlevel.checkpoint()
        self._check_open()
        if name in self._leaders:
            raise LeadershipUnavailable(name)
        async with self._lead(name) as leadership:
            yield leadership

    @asynccontextmanager
    async def wait_acquire(
        self, name: str, *, on_standby: Callable[[], None] | None = None
    ) -> AsyncIterator[MemoryLeadership]:
        """Lead *name* for the block, first waiting while another task leads it."""
        check_name(name)
        await trio.lowlevel.checkpoint()
        self._check_open()
        async with self._wait_lead(name, self._waiting, on_standby) as leadership:
            yield leadership

    def _hosts_changed(self) -> None:
        self._hosts_changes += 1
        self._hosts_event.set()
        self._hosts_event = trio.Event()

    @asynccontextmanager
    async def register_host(
        self, *, runs: Collection[str] | None = None
    ) -> AsyncIterator[MemoryMembership]:
        """Join the host registry for the block (see `ProjectorCoordinator.register_host`).

        .. versionchanged:: 0.3
           *runs*.
        """
        await trio.lowlevel.checkpoint()
        self._check_open()
        membership = MemoryMembership(self)
        self._hosts[membership.host_id] = HostState(runs=None if runs is None else frozenset(runs))
        self._hosts_changed()
        try:
            yield membership
        finally:
            membership._registered = False
            del self._hosts[membership.host_id]
            self._hosts_changed()

    async def set_partitions(
        self, name: str, partitions: int, *, on_waiting: Callable[[], None] | None = None
    ) -> None:
        """Record that projection *name* runs as *partitions* units (see `ProjectorCoordinator`).

        As on PostgreSQL, a change waits (calling *on_waiting* once) until no unit of the
        current count is led or awaited, and then happens at once; it never holds some of
        those units while it waits for others.

        Raises:
            PartitionsChanged: *partitions* is neither the current count nor a multiple of it,
                and events were applied; raised before any wait.

        .. versionchanged:: 0.3
           *on_waiting*.
        """
        check_name(name)
        check_partitions(partitions)
        await trio.lowlevel.checkpoint()
        self._check_open()
        waiting = False
        while (current := self._partition_count(name)) != partitions:
            if current is None:
                self._partitions[name] = partitions
                return
            old = [unit.name for unit in units_of(name, current)]
            plan_repartition(name, current, partitions, applied=self._applied(old))
            busy = [
                unit
                for unit in old
                if unit in self._leaders or self._waiting[unit] or self._reset_waiting[unit]
            ]
            if not busy:
                # No unit of the current count runs, and none can start before this
                # synchronous change is made.
                self._repartition(name, current, partitions, old)
                return
            if not waiting:
                waiting = True
                if on_waiting is not None:
                    on_waiting()
            leader = self._leaders.get(busy[0])
            if leader is not None:
                await leader.wait_lost()
            else:
                await trio.sleep(_REPARTITION_RETRY)  # a standby about to take the unit

    async def recorded_partitions(self, name: str) -> int | None:
        """How many units projection *name* runs as (see `ProjectorCoordinator`)."""
        check_projector_name(name)
        await trio.lowlevel.checkpoint()
        self._check_open()
        return self._partition_count(name)

    def _partition_count(self, name: str) -> int | None:
        if name in self._partitions:
            return self._partitions[name]
        return 1 if name in self._checkpoints or name in self._projections else None

    def _applied(self, units: list[str]) -> bool:
        return any(unit in self._checkpoints or self._dead_letters.get(unit) for unit in units)

    def _repartition(self, name: str, current: int, requested: int, old: list[str]) -> None:
        applied = self._applied(old)
        if plan_repartition(name, current, requested, applied=applied) == "split":
            for child in units_of(name, requested):
                parent = split_parent(child, current).name
                if parent in self._checkpoints:
                    self._checkpoints[child.name] = self._checkpoints[parent]
                parent_filter = self._projections.get(parent, _Projection()).filter
                if parent_filter is not None:
                    self._projection(child.name).filter = attrs.evolve(
                        parent_filter, partition=child.partition
                    )
            for unit in old:
                for letter in self._dead_letters.get(unit, ()):
                    moved = partition_of(letter.event.stream_id, requested)
                    self._dead_letters.setdefault(Unit(name, moved).name, []).append(
                        attrs.evolve(letter, partition=moved.index)
                    )
        for unit in old:
            self._checkpoints.pop(unit, None)
            self._projections.pop(unit, None)
            self._dead_letters.pop(unit, None)
        self._partitions[name] = requested

    def _unit_names(self, name: str) -> list[str]:
        if Unit.parse(name).partition is not None:
            return [name]
        return [unit.name for unit in units_of(name, self._partition_count(name) or 1)]

    @asynccontextmanager
    async def _wait_lead(
        self,
        name: str,
        waiters: Counter[str],
        on_standby: Callable[[], None] | None = None,
    ) -> AsyncIterator[MemoryLeadership]:
        # *waiters* counts who waits: standbys (self._waiting) or resets (self._reset_waiting).
        if name in self._leaders:
            if on_standby is not None:
                on_standby()
            waiters[name] += 1
            try:
                while (current := self._leaders.get(name)) is not None:
                    await current.wait_lost()
            finally:
                waiters[name] -= 1
        async with self._lead(name) as leadership:
            yield leadership

    @asynccontextmanager
    async def _lead(self, name: str) -> AsyncIterator[MemoryLeadership]:
        leadership = MemoryLeadership(self, name)
        self._leaders[name] = leadership
        try:
            yield leadership
        finally:
            # Synchronous on purpose: release cannot be interrupted by cancellation.
            self._release(leadership)

    def _release(self, leadership: MemoryLeadership) -> None:
        if self._leaders.get(leadership.name) is leadership:
            del self._leaders[leadership.name]
            record = self._projections.get(leadership.name)
            if record is not None:
                record.leader = None
        leadership.mark_lost()

    def _revoke_leadership(self, name: str) -> None:
        # Test hook: simulates the leader's session dying, like pg_terminate_backend.
        leadership = self._leaders.get(name)
        if leadership is not None:
            self._release(leadership)

    def _backup(self) -> _Backup:
        # Test hook: the events as they are now, for _restore.
        return _Backup(
            log=list(self._log),
            streams={stream_id: list(events) for stream_id, events in self._streams.items()},
            commit=self._commit,
        )

    def _restore(self, backup: _Backup) -> None:
        # Test hook: a point-in-time restore of the events (not of snapshots, checkpoints or
        # anything else): every event appended since *backup* is gone, and positions are
        # drawn from where they were then, as a restored sequence would. The clock of
        # recorded_at is not turned back (_last_recorded_at stays), as a server's is not.
        self._log = list(backup.log)
        self._positions = [stored.position for stored in self._log]
        self._streams = {stream_id: list(events) for stream_id, events in backup.streams.items()}
        self._event_ids = {stored.event_id for stored in self._log}
        self._commit = backup.commit

    def _store_undecodable(self, stream_id: str) -> Position:
        # Test hook: store a row whose data is not a JSON object, as a foreign writer could.
        self._commit += 1
        position = Position(self._commit, len(self._log) + 1)
        self._store(
            _StoredEvent(
                event_id=uuid.uuid4(),
                stream_id=stream_id,
                stream_version=len(self._streams.get(stream_id, ())) + 1,
                position=position,
                type="Undecodable",
                data_json="[1, 2, 3]",
                metadata_json="{}",
                recorded_at=self._recording_time(),
            )
        )
        self._appended.set()
        self._appended = trio.Event()
        return position

    # -- ProjectionAdmin ----------------------------------------------------------------

    async def projection_status(self) -> list[ProjectionStatus]:
        """One record per unit that has run or checkpointed here, or that a live host runs.

        A unit with no record yet shows no checkpoint and counts every event (of its
        partition) as lag, since its filter is recorded when it first runs. A unit of a
        partition count other than the recorded one is listed while a live host runs it or
        a task leads or awaits it, as on PostgreSQL.

        .. versionchanged:: 0.3
           ``runnable_by`` and ``lacking_hosts``; units that a live host runs are listed;
           units of another partition count.
        """
        await trio.lowlevel.checkpoint()
        self._check_open()
        now = _now()
        hosts = [
            (
                state,
                LeaderInfo(
                    pid=os.getpid(),
                    host=socket.gethostname(),
                    application_name=f"memory host {host_id}",
                ),
            )
            for host_id, state in sorted(self._hosts.items())
        ]
        runnable = {unit for state, _ in hosts for unit in state.can_run}
        in_use = self._leaders.keys() | {u for u, n in self._waiting.items() if n}

        def other_count(unit: Unit) -> int | None:
            # The projection's recorded count, when *unit* is of another one.
            count = self._partitions.get(unit.projection)
            return None if count is None or count == unit.partitions else count

        # Projections with something applied under their recorded count.
        applied = {
            Unit.parse(unit).projection
            for unit in self._checkpoints.keys() | {u for u, d in self._dead_letters.items() if d}
            if other_count(Unit.parse(unit)) is None
        }
        result = []
        # A unit of a count the projection does not have (a change of count under way, or
        # refused) is listed while a live host runs it or a task leads or awaits it.
        others = {u for u in in_use if other_count(Unit.parse(u)) is not None}
        names = self._projections.keys() | self._checkpoints.keys() | runnable | others
        for name in sorted(names):
            parsed = Unit.parse(name)
            recorded = other_count(parsed)
            if recorded is not None and name not in runnable and name not in in_use:
                continue  # a unit of a count the projection no longer has, or never had
            record = self._projections.get(name) or _Projection(
                filter=None if parsed.partition is None else EventFilter(partition=parsed.partition)
            )
            checkpoint = self._checkpoints.get(name)
            ahead = checkpoint is not None and self._ahead(checkpoint)
            lag_from, lag_filter = checkpoint, record.filter
            runnable_by, lacking = host_coverage(name, hosts)
            holder = None
            last_error = record.last_error
            if recorded is not None:
                # It applies nothing: it waits for the count to change (its lag counts from
                # the checkpoint it will continue from), or its hosts are refused.
                change = count_change(parsed, recorded, applied=parsed.projection in applied)
                holder, last_error = change.state, change.error or last_error
                if change.parent is not None and change.parent.name in self._checkpoints:
                    lag_from = self._checkpoints[change.parent.name]
                    parent_filter = self._projections.get(change.parent.name, _Projection()).filter
                    if parent_filter is not None:
                        lag_filter = attrs.evolve(parent_filter, partition=parsed.partition)
            elif name in self._leaders:
                replaying = record.state is ProjectionState.REPLAYING
                holder = ProjectionState.REPLAYING if replaying else ProjectionState.RUNNING
            if checkpoint is not None and ahead:
                last_error = ahead_error(name, checkpoint, last_error)
            if lag_from is not None and self._ahead(lag_from):
                lag_from = None  # a reset rebuilds from the beginning: all of it is lag
            start = 0 if lag_from is None else bisect.bisect_right(self._positions, lag_from)
            pending = [
                e
                for e in self._log[start:]
                if lag_filter is None or lag_filter.matches(e.stream_id, e.type)
            ]
            state = unit_state(holder=holder, standbys=self._waiting[name], last=record.state)
            result.append(
                ProjectionStatus(
                    name=parsed.projection,
                    partition=None if parsed.partition is None else parsed.partition.index,
                    partitions=parsed.partitions,
                    checkpoint=checkpoint,
                    lag_events=len(pending),
                    lag_seconds=(now - pending[0].recorded_at).total_seconds() if pending else 0.0,
                    leader=record.leader if state is ProjectionState.RUNNING else None,
                    standbys=self._waiting[name],
                    state=state,
                    last_error=last_error,
                    updated_at=record.updated_at,
                    dead_letters=len(self._dead_letters.get(name, ())),
                    runnable_by=runnable_by,
                    lacking_hosts=lacking,
                    checkpoint_ahead=ahead,
                )
            )
        return sorted(result, key=status_order)

    async def reset_projection(self, name: str, *, wait: bool = False) -> None:
        """Forget *name*'s checkpoint and dead letters (see `ProjectionAdmin`)."""
        check_name(name)
        await trio.lowlevel.checkpoint()
        self._check_open()
        units = self._unit_names(name)
        if not any(unit in self._projections or unit in self._checkpoints for unit in units):
            raise ProjectionNotFound(f"no projection named {name!r} has run against this store")
        while True:
            if not wait and any(unit in self._leaders for unit in units):
                raise ProjectionRunning(name)
            async with contextlib.AsyncExitStack() as stack:
                for unit in sorted(units):
                    await stack.enter_async_context(self._wait_lead(unit, self._reset_waiting))
                now = self._unit_names(name)
                if now == units:
                    for unit in units:
                        self._checkpoints.pop(unit, None)
                        self._dead_letters.pop(unit, None)
                        record = self._projection(unit)
                        record.state, record.last_error, record.updated_at = (
                            ProjectionState.STOPPED,
                            None,
                            _now(),
                        )
                    return
            units = now

    async def dead_letters(self, name: str) -> list[DeadLetter]:
        """The events *name* skipped and that were not replayed, in position order."""
        check_name(name)
        await trio.lowlevel.checkpoint()
        self._check_open()
        letters = [d for unit in self._unit_names(name) for d in self._dead_letters.get(unit, ())]
        return sorted(letters, key=lambda d: d.position)


@asynccontextmanager
async def open_memory_store() -> AsyncIterator[MemoryStore]:
    """Open an empty in-memory store for the duration of an ``async with`` block.

    Example::

        async with open_memory_store() as store:
            await store.append("account-1", [NewEvent("Opened", {"owner": "ada"})])

    .. versionadded:: 0.1
    """
    store = MemoryStore()
    try:
        yield store
    finally:
        store._closed = True
        for leadership in list(store._leaders.values()):
            store._release(leadership)
