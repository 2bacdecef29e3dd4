"""The four capabilities a backend provides, as `typing.Protocol` classes.

The projection layer depends only on these; backends implement them. Every method documented
here is a Trio checkpoint, and cancelling it leaves the store unchanged: an append either
commits whole or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

from ._events import AppendResult, NewEvent, RecordedEvent, StreamAppend
from ._filters import EventFilter
from ._positions import Position


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


@runtime_checkable
class EventReader(Protocol):
    """Reads the store's global order: every committed event, each exactly once, in order.

    .. versionadded:: 0.1
    """

    async def read_events(
        self,
        after: Position | None,
        *,
        limit: int,
        filter: EventFilter | None = None,
    ) -> list[RecordedEvent]:
        """Return up to *limit* events strictly after *after*, in position order.

        The cursor is exclusive: passing the last returned position continues where the page
        ended. The filter is applied before the limit, so a page is short only when no more
        matching events are visible. No committed event is ever skipped: an event whose
        transaction commits after a reader passed its neighbours still comes later in the
        order (see the docs on gap-free reads).
        """
        ...


@runtime_checkable
class CheckpointStore(Protocol):
    """Remembers how far each named projection has processed the global order.

    .. versionadded:: 0.1
    """

    async def load_checkpoint(self, name: str) -> Position | None:
        """Return the saved position for *name*, or None if there is none."""
        ...

    async def save_checkpoint(self, name: str, position: Position) -> None:
        """Save *position* for *name*; a checkpoint never moves backwards.

        Saving the current position again is accepted and changes nothing.

        Raises:
            CheckpointConflict: *position* is before the saved one (nothing changed).
        """
        ...


@runtime_checkable
class Leadership(Protocol):
    """Proof that this session leads a name, valid until `lost` is set.

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

    async def wait_lost(self) -> None:
        """Return once the lock is lost (its session ended) or released."""
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


@runtime_checkable
class Store(EventStore, EventReader, CheckpointStore, ProjectorCoordinator, Protocol):
    """A backend providing all four capabilities, as the memory and PostgreSQL stores do.

    .. versionadded:: 0.1
    """
