"""`MemoryStore`, the facade: validates arguments and hands each call to the module that owns it.

The in-memory backend is the reference implementation of the protocols, built like the
PostgreSQL one, file for file: `_state` holds the data (where PostgreSQL has tables),
`_appends`, `_reads`, `_snapshots` and `_subscriptions` answer one question each, `_batch`,
`_leadership` and `_membership` are what a leader and a host hold, `_admin` is the door for
tests and tooling, `_open` opens and closes a store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from typing import final

import trio

from .._backend._reader import Page, ReadEventsBase, Undecodable
from .._errors import InvalidArgument, LeadershipUnavailable
from .._events import AppendResult, NewEvent, RecordedEvent, StreamAppend
from .._filters import EventFilter
from .._partitions import check_partitions
from .._personal._fields import check_subject
from .._personal._forget import ForgetRecord, notify_forgotten
from .._personal._keys import KeyWrapper
from .._positions import Position
from .._protocols import OneStreamAppend
from .._queries import (
    AppendCondition,
    EventQuery,
    QueryResult,
    check_append_tagged,
    check_read_query,
)
from .._snapshots import Snapshot, check_snapshot
from .._status import DeadLetter, LiveHost, ProjectionStatus
from .._validation import (
    check_name,
    check_projection_name,
    check_projector_name,
    check_state_name,
    check_stream_id,
    check_version_cursor,
    encode_json_object,
)
from .._versions import VersionRole, VersionSwitch, check_version
from . import _membership, _personal, _queries, _reads, _snapshots, _subscriptions, _versions
from ._admin import MemoryAdmin
from ._appends import apply, check_appends, stage
from ._leadership import MemoryLeadership, lead, wait_lead
from ._membership import MemoryMembership, register
from ._state import MemoryState


@final
class MemoryStore(ReadEventsBase, OneStreamAppend):
    """An event store, reader, checkpoint store, coordinator and admin held in memory.

    Obtain one with `open_memory_store`. It has the same semantics as the PostgreSQL store,
    checked by the same contract suite, but it is process-local and lost when closed; its
    leadership is exclusive among the tasks of one process only.

    It keeps personal data as the PostgreSQL store will (`PersonalDataStore`): sealed
    values, data keys wrapped by the key-encryption key, a forget that deletes the key.

    .. versionadded:: 0.1
    .. versionchanged:: 0.4
       Personal data (`forget`, `forget_records`, `rewrap`).
    """

    def __init__(self, state: MemoryState | None = None) -> None:
        self._state = MemoryState() if state is None else state
        self._admin = MemoryAdmin(self._state)

    @property
    def admin(self) -> MemoryAdmin:
        """The door for tests and tooling (a revoked leadership, a foreign event, a restore).

        Not for applications: nothing it does keeps the store's guarantees.

        .. versionadded:: 0.4
        """
        return self._admin

    async def _ready(self) -> MemoryState:
        # Every call is a Trio checkpoint, as a database round trip would be, and then finds
        # the store open.
        await trio.lowlevel.checkpoint()
        self._state.check_open()
        return self._state

    # -- EventStore ---------------------------------------------------------------------

    async def append_atomic(self, appends: Sequence[StreamAppend]) -> AppendResult:
        """Append to several streams, all or none (see `EventStore.append_atomic`).

        Personal fields are sealed first (their subjects' keys made as needed).

        Raises:
            ConfigurationError: an event has personal fields and the store has no
                key-encryption key.
            SubjectForgottenError: an event has personal fields of a forgotten subject.
        """
        staged = stage(await _personal.seal_appends(self._state, appends))
        state = await self._ready()
        # From here on there is no checkpoint: the append is atomic with respect to other tasks.
        check_appends(state, [staged])
        return apply(state, staged)

    async def read_query(
        self, query: EventQuery, *, after: Position | None = None, limit: int | None = None
    ) -> QueryResult:
        """The events matching *query* after *after* (see `TaggedEventStore.read_query`).

        .. versionadded:: 0.4
        """
        check_read_query(query, after, limit)
        return _queries.read_query(await self._ready(), query, after, limit)

    async def append_tagged(
        self,
        events: Sequence[NewEvent],
        *,
        condition: AppendCondition | None = None,
        stream_id: str | None = None,
        expected_version: int | None = None,
    ) -> AppendResult:
        """Append *events* if *condition* holds (see `TaggedEventStore.append_tagged`).

        .. versionadded:: 0.4
        """
        check_append_tagged(condition, stream_id, expected_version)
        sealed = await _personal.seal_events(self._state, events)
        return _queries.append_tagged(
            await self._ready(), sealed, condition, stream_id, expected_version
        )

    async def read_stream(self, stream_id: str, *, after_version: int = 0) -> list[RecordedEvent]:
        """Return a stream's events after *after_version* (see `EventStore.read_stream`)."""
        check_stream_id(stream_id)
        check_version_cursor(after_version)
        return _reads.read_stream(await self._ready(), stream_id, after_version)

    # -- SnapshotStore -------------------------------------------------------------------

    async def read_snapshot(self, stream_id: str, state: str) -> Snapshot | None:
        """The snapshot of *stream_id* under *state* (see `SnapshotStore.read_snapshot`)."""
        check_stream_id(stream_id)
        check_state_name(state)
        ready = await self._ready()
        # A sealed one is opened; one whose subject was forgotten reads as none.
        return _personal.open_kept(ready, _snapshots.read(ready, stream_id, state))

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
        """Keep *snapshot* (see `SnapshotStore.write_snapshot`).

        The snapshot of a stream holding personal events is kept sealed under their
        subjects' keys; once one of them was forgotten the stream gets no snapshot (its
        state is folded from the events, whose personal fields are gone).

        .. versionchanged:: 0.4
           Sealed for streams with personal events.
        """
        check_snapshot(snapshot)
        text = encode_json_object("snapshot", snapshot.data)
        state = await self._ready()
        kept = _personal.seal_for_keeping(state, snapshot, text)
        if kept is not None:
            _snapshots.write(state, *kept)

    async def delete_snapshots(self, stream_id: str | None = None) -> int:
        """Delete snapshots (see `SnapshotStore.delete_snapshots`)."""
        if stream_id is not None:
            check_stream_id(stream_id)
        return _snapshots.delete(await self._ready(), stream_id)

    # -- EventReader --------------------------------------------------------------------

    async def _read_page(
        self, after: Position | None, limit: int, filter: EventFilter | None, mode: Undecodable
    ) -> Page:
        return _reads.read_page(await self._ready(), after, limit, filter, mode)

    async def last_position(self, filter: EventFilter | None = None) -> Position | None:
        """The position of the last stored event matching *filter*, or None."""
        return _reads.last_position(await self._ready(), filter)

    async def wait_for_events(self) -> None:
        """Return after the next append (see `EventReader.wait_for_events`)."""
        self._state.check_open()
        await self._state.appended.wait()

    # -- CheckpointStore ----------------------------------------------------------------

    async def load_checkpoint(self, name: str) -> Position | None:
        """Return the saved position for *name* (see `CheckpointStore.load_checkpoint`).

        Raises:
            CheckpointAhead: the stored checkpoint is beyond the store's last position.
        """
        check_name(name)
        return _subscriptions.load_checkpoint(await self._ready(), name)

    async def save_checkpoint(self, name: str, position: Position) -> None:
        """Save a checkpoint; it never moves backwards (see `CheckpointStore`).

        Raises:
            CheckpointAhead: *position* is beyond the store's last position; nothing changed.
            CheckpointConflict: *position* is behind the saved one; nothing changed.
        """
        check_name(name)
        if not isinstance(position, Position):
            raise InvalidArgument(f"position must be a Position, got {type(position).__name__}")
        _subscriptions.save_checkpoint(await self._ready(), name, position)

    # -- ProjectorCoordinator -----------------------------------------------------------

    @asynccontextmanager
    async def try_acquire(self, name: str) -> AsyncIterator[MemoryLeadership]:
        """Lead *name* for the duration of an ``async with``, without waiting.

        Raises:
            LeadershipUnavailable: another task leads *name*.
        """
        check_name(name)
        state = await self._ready()
        if name in state.leaders:
            raise LeadershipUnavailable(name)
        async with lead(state, name) as leadership:
            yield leadership

    @asynccontextmanager
    async def wait_acquire(
        self, name: str, *, on_standby: Callable[[], None] | None = None
    ) -> AsyncIterator[MemoryLeadership]:
        """Lead *name* for the block, first waiting while another task leads it."""
        check_name(name)
        state = await self._ready()
        async with wait_lead(state, name, state.waiting, on_standby) as leadership:
            yield leadership

    @asynccontextmanager
    async def register_host(
        self, *, runs: Collection[str] | None = None
    ) -> AsyncIterator[MemoryMembership]:
        """Join the host registry for the block (see `ProjectorCoordinator.register_host`).

        .. versionchanged:: 0.3
           *runs*.
        """
        async with register(await self._ready(), runs) as membership:
            yield membership

    async def set_partitions(
        self, name: str, partitions: int, *, on_waiting: Callable[[], None] | None = None
    ) -> None:
        """Record that projection *name* runs as *partitions* units (see `ProjectorCoordinator`).

        As on PostgreSQL, a change waits (calling *on_waiting* once) until no unit of the
        current count is led or awaited, and then happens at once; it never holds some of
        those units while it waits for others. Raises as the protocol says.

        .. versionchanged:: 0.3
           *on_waiting*.
        """
        check_name(name)
        check_partitions(partitions)
        await _subscriptions.set_partitions(await self._ready(), name, partitions, on_waiting)

    async def recorded_partitions(self, name: str) -> int | None:
        """How many units projection *name* runs as (see `ProjectorCoordinator`)."""
        check_projection_name(name)
        return (await self._ready()).partition_count(name)

    async def version_role(self, name: str, version: int) -> VersionRole:
        """What *version* of *name* does now (see `ProjectorCoordinator.version_role`).

        .. versionadded:: 0.4
        """
        check_projector_name(name)
        check_version(version)
        return _versions.role(await self._ready(), name, version)

    async def switch_if_caught_up(
        self, name: str, version: int, units: Sequence[tuple[str, EventFilter]]
    ) -> VersionRole:
        """Make *version* of *name* serve if it builds and has caught up (see
        `ProjectorCoordinator.switch_if_caught_up`).

        .. versionadded:: 0.4
        """
        check_projector_name(name)
        check_version(version)
        return _versions.switch_if_caught_up(await self._ready(), name, version, units)

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
        return _subscriptions.projection_status(await self._ready())

    async def live_hosts(self) -> list[LiveHost]:
        """Every registered host, idle ones too, oldest first (see `ProjectionAdmin`); each
        is this process.

        .. versionadded:: 0.4
        """
        return _membership.live_hosts(await self._ready())

    async def serving_version(self, name: str) -> int | None:
        """The version of *name* that serves reads (see `ProjectionAdmin.serving_version`).

        .. versionadded:: 0.4
        """
        check_projector_name(name)
        return (await self._ready()).serving.get(name)

    async def version_switches(self, name: str) -> list[VersionSwitch]:
        """*name*'s switches of serving version, oldest first (see `ProjectionAdmin`).

        .. versionadded:: 0.4
        """
        check_projector_name(name)
        return _versions.switches(await self._ready(), name)

    async def serve_version(self, name: str, version: int) -> None:
        """Make *version* of *name* serve now (see `ProjectionAdmin.serve_version`).

        .. versionadded:: 0.4
        """
        check_projector_name(name)
        check_version(version)
        _versions.serve(await self._ready(), name, version)

    async def retire_version(self, name: str, version: int, *, wait: bool = False) -> None:
        """Drop a version that does not serve (see `ProjectionAdmin.retire_version`).

        .. versionadded:: 0.4
        """
        check_projector_name(name)
        check_version(version)
        await _versions.retire(await self._ready(), name, version, wait=wait)

    async def reset_projection(self, name: str, *, wait: bool = False) -> None:
        """Forget *name*'s checkpoint and dead letters (see `ProjectionAdmin`)."""
        check_name(name)
        await _subscriptions.reset_projection(await self._ready(), name, wait=wait)

    async def dead_letters(self, name: str) -> list[DeadLetter]:
        """The events *name* skipped and that were not replayed, in position order.

        A dead letter keeps an event's personal fields sealed; they are opened when listed
        (and left out once the subject is forgotten).
        """
        check_name(name)
        state = await self._ready()
        return [_personal.open_letter(state, d) for d in _subscriptions.dead_letters(state, name)]

    # -- PersonalDataStore ----------------------------------------------------------------

    async def forget(self, subject: str) -> ForgetRecord:
        """Forget *subject*'s personal data (see `PersonalDataStore.forget`).

        .. versionadded:: 0.4
        """
        check_subject(subject)
        record, streams = _personal.forget(await self._ready(), subject)
        if streams:
            notify_forgotten(self, streams)
        return record

    async def forget_records(self, subject: str | None = None) -> list[ForgetRecord]:
        """The audit of forgets (see `PersonalDataStore.forget_records`).

        .. versionadded:: 0.4
        """
        if subject is not None:
            check_subject(subject)
        return _personal.forget_records(await self._ready(), subject)

    async def rewrap(self, key_encryption_key: bytes | KeyWrapper) -> int:
        """Wrap every data key under a new key-encryption key (see
        `PersonalDataStore.rewrap`).

        .. versionadded:: 0.4
        """
        return await _personal.rewrap(await self._ready(), key_encryption_key)
