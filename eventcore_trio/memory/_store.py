"""The in-memory backend: all four protocols in pure Trio, for tests, examples and embedding."""

from __future__ import annotations

import bisect
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import final

import attrs
import trio

from .._errors import (
    CheckpointConflict,
    DuplicateEventId,
    InvalidArgument,
    LeadershipUnavailable,
    StoreClosed,
    VersionConflict,
)
from .._events import AppendResult, NewEvent, RecordedEvent, StreamAppend, prepare_appends
from .._filters import EventFilter
from .._positions import Position
from .._validation import (
    check_expected_version,
    check_limit,
    check_name,
    check_stream_id,
    check_version_cursor,
    encode_json_object,
)


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

    def to_recorded(self) -> RecordedEvent:
        return RecordedEvent(
            event_id=self.event_id,
            stream_id=self.stream_id,
            stream_version=self.stream_version,
            position=self.position,
            type=self.type,
            data=json.loads(self.data_json),
            metadata=json.loads(self.metadata_json),
            recorded_at=self.recorded_at,
        )


@final
class MemoryLeadership:
    """Leadership of a name in a `MemoryStore`; obtained only from `MemoryStore.try_acquire`.

    .. versionadded:: 0.1
    """

    def __init__(self, name: str) -> None:
        self._name = name
        # Set once: when the leadership is released or revoked. Never cleared.
        self._lost = trio.Event()

    @property
    def name(self) -> str:
        """The name this leadership was acquired for."""
        return self._name

    @property
    def is_held(self) -> bool:
        """False once the leadership is released or revoked."""
        return not self._lost.is_set()

    async def wait_lost(self) -> None:
        """Return once the leadership is released or revoked."""
        await self._lost.wait()


@final
class MemoryStore:
    """An event store, event reader, checkpoint store and coordinator held in memory.

    Obtain one with `open_memory_store`. It has the same semantics as the PostgreSQL store,
    checked by the same contract suite, but it is process-local and lost when closed; its
    leadership is exclusive among tasks of one process only.

    .. versionadded:: 0.1
    """

    def __init__(self) -> None:
        # Every event in position order; positions strictly increase along the list.
        self._log: list[_StoredEvent] = []
        self._positions: list[Position] = []
        # stream id -> that stream's events; len() is the stream's version.
        self._streams: dict[str, list[_StoredEvent]] = {}
        self._event_ids: set[uuid.UUID] = set()
        self._checkpoints: dict[str, Position] = {}
        self._leaders: dict[str, MemoryLeadership] = {}
        # Ordinal of the last append ("transaction"); the commit part of every position.
        self._commit = 0
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(
                "this MemoryStore was closed; open a new one with open_memory_store()"
            )

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
        requests = sorted(prepare_appends(appends), key=lambda a: a.stream_id)
        encoded = [
            [
                (e, encode_json_object("data", e.data), encode_json_object("metadata", e.metadata))
                for e in request.events
            ]
            for request in requests
        ]
        await trio.lowlevel.checkpoint()
        self._check_open()
        # From here on there is no checkpoint: the append is atomic with respect to other tasks.
        for request in requests:
            actual = len(self._streams.get(request.stream_id, ()))
            if request.expected_version is not None and request.expected_version != actual:
                raise VersionConflict(request.stream_id, request.expected_version, actual)
        new_ids: set[uuid.UUID] = set()
        for batch in encoded:
            for event, _, _ in batch:
                if event.event_id is not None:
                    if event.event_id in self._event_ids or event.event_id in new_ids:
                        raise DuplicateEventId(
                            f"event id {event.event_id} is already stored; nothing was written",
                            event_id=str(event.event_id),
                        )
                    new_ids.add(event.event_id)
        if not any(encoded):
            return AppendResult(
                None, {r.stream_id: len(self._streams.get(r.stream_id, ())) for r in requests}
            )
        self._commit += 1
        now = dt.datetime.now(dt.UTC)
        versions: dict[str, int] = {}
        position: Position | None = None
        for request, batch in zip(requests, encoded, strict=True):
            stream = self._streams.setdefault(request.stream_id, [])
            for event, data_json, metadata_json in batch:
                position = Position(self._commit, len(self._log) + 1)
                stored = _StoredEvent(
                    event_id=event.event_id or uuid.uuid4(),
                    stream_id=request.stream_id,
                    stream_version=len(stream) + 1,
                    position=position,
                    type=event.type,
                    data_json=data_json,
                    metadata_json=metadata_json,
                    recorded_at=now,
                )
                stream.append(stored)
                self._log.append(stored)
                self._positions.append(position)
                self._event_ids.add(stored.event_id)
            versions[request.stream_id] = len(stream)
        return AppendResult(position, versions)

    async def read_stream(self, stream_id: str, *, after_version: int = 0) -> list[RecordedEvent]:
        """Return a stream's events after *after_version* (see `EventStore.read_stream`)."""
        check_stream_id(stream_id)
        check_version_cursor(after_version)
        await trio.lowlevel.checkpoint()
        self._check_open()
        stream = self._streams.get(stream_id, [])
        return [e.to_recorded() for e in stream[after_version:]]

    async def read_events(
        self,
        after: Position | None,
        *,
        limit: int,
        filter: EventFilter | None = None,
    ) -> list[RecordedEvent]:
        """Return up to *limit* events after *after* (see `EventReader.read_events`)."""
        if after is not None and not isinstance(after, Position):
            raise InvalidArgument(f"after must be a Position or None, got {type(after).__name__}")
        check_limit(limit)
        if filter is not None and not isinstance(filter, EventFilter):
            raise InvalidArgument(f"filter must be an EventFilter, got {type(filter).__name__}")
        await trio.lowlevel.checkpoint()
        self._check_open()
        start = 0 if after is None else bisect.bisect_right(self._positions, after)
        page: list[RecordedEvent] = []
        for stored in self._log[start:]:
            if filter is None or filter.matches(stored.stream_id, stored.type):
                page.append(stored.to_recorded())
                if len(page) == limit:
                    break
        return page

    async def load_checkpoint(self, name: str) -> Position | None:
        """Return the saved position for *name* (see `CheckpointStore.load_checkpoint`)."""
        check_name(name)
        await trio.lowlevel.checkpoint()
        self._check_open()
        return self._checkpoints.get(name)

    async def save_checkpoint(self, name: str, position: Position) -> None:
        """Save a checkpoint; it never moves backwards (see `CheckpointStore`)."""
        check_name(name)
        if not isinstance(position, Position):
            raise InvalidArgument(f"position must be a Position, got {type(position).__name__}")
        await trio.lowlevel.checkpoint()
        self._check_open()
        current = self._checkpoints.get(name)
        if current is not None and position < current:
            raise CheckpointConflict(name, position, current)
        self._checkpoints[name] = position

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
        leadership = MemoryLeadership(name)
        self._leaders[name] = leadership
        try:
            yield leadership
        finally:
            # Synchronous on purpose: release cannot be interrupted by cancellation.
            self._release(leadership)

    def _release(self, leadership: MemoryLeadership) -> None:
        if self._leaders.get(leadership.name) is leadership:
            del self._leaders[leadership.name]
        leadership._lost.set()

    def _revoke_leadership(self, name: str) -> None:
        # Test hook: simulates the leader's session dying, like pg_terminate_backend.
        leadership = self._leaders.get(name)
        if leadership is not None:
            self._release(leadership)


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
