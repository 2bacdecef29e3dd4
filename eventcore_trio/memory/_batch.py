"""The projection batch: its checkpoint, dead letters and appends are staged, then applied
whole when its ``async with`` block ends without an exception, or not at all.

The commit is synchronous: no other task runs between its checks and its changes, so the
whole batch becomes visible at once, or (on an error) nothing does.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, final

import trio

from .._errors import CheckpointConflict, DatabaseNotAvailable, DeadLetterNotFound, LeadershipLost
from .._events import AppendResult, RecordedEvent, StreamAppend, UndecodableEvent
from .._partitions import Unit
from .._positions import Position
from .._protocols import Database
from .._status import DeadLetter
from ._appends import Staged, apply, check_appends, stage
from ._personal import redacted_if_forgotten, seal_appends, sealed_letter_event
from ._state import MemoryState, now

if TYPE_CHECKING:
    from ._leadership import MemoryLeadership


@final
class MemoryBatch:
    """A staged transaction of a `MemoryLeadership`; applied whole when its block ends.

    .. versionadded:: 0.1
    """

    def __init__(self, state: MemoryState, leadership: MemoryLeadership) -> None:
        self._state = state
        self._leadership = leadership
        self._checkpoint: tuple[Position | None, Position] | None = None
        self._dead_letters: list[DeadLetter] = []
        self._resolved: set[uuid.UUID] = set()
        self._appends: list[Staged] = []

    async def __aenter__(self) -> MemoryBatch:
        if not self._leadership.is_held:
            raise LeadershipLost(f"leadership of {self._leadership.name!r} was lost")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        # An exception in the block discards the batch (nothing was applied yet) and goes on.
        if exc_type is None:
            await trio.lowlevel.checkpoint()
            self._commit()

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
        self._state.check_not_ahead(self._leadership.name, position)
        self._checkpoint = (expected, position)

    @property
    def failure(self) -> BaseException | None:
        """Always None: nothing can interrupt a memory batch half-way."""
        return None

    async def run_setup(self, setup: Callable[[Database], Awaitable[None]]) -> None:
        """Run a setup hook with `db`: which the memory store does not have (it raises
        `DatabaseNotAvailable`, as a handler's ``ctx.db`` does)."""
        await setup(self.db)

    async def flush(self) -> None:
        """Nothing to send: the memory store has no ``ctx.db``."""
        await trio.lowlevel.checkpoint()

    async def record_dead_letter(
        self, event: RecordedEvent | UndecodableEvent, error: BaseException, *, retries: int
    ) -> None:
        """Stage a dead letter for *event* (its personal fields kept sealed)."""
        await trio.lowlevel.checkpoint()
        unit = Unit.parse(self._leadership.name)
        self._dead_letters.append(
            DeadLetter(
                id=uuid.uuid4(),
                projection=unit.projection,
                partition=None if unit.partition is None else unit.partition.index,
                event=sealed_letter_event(self._state, event),
                error_type=f"{type(error).__module__}.{type(error).__qualname__}",
                error_message=str(error),
                retries=retries,
                recorded_at=now(),
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
        letters = self._state.dead_letters.get(self._leadership.name, ())
        return any(d.id == dead_letter_id for d in letters)

    async def append_atomic(self, appends: Sequence[StreamAppend]) -> AppendResult:
        """Stage an append, checked now against the store and this batch's earlier appends,
        and again when the batch commits (see `ProjectionBatch.append_atomic`).

        The result's versions are known now; its position once the batch commits (None
        until then: the memory store numbers positions by commit).
        """
        staged = stage(await seal_appends(self._state, appends))
        await trio.lowlevel.checkpoint()
        after = check_appends(self._state, [*self._appends, staged])
        self._appends.append(staged)
        return AppendResult(None, {r.stream_id: after[r.stream_id] for r in staged[0]})

    def _commit(self) -> None:
        # Synchronous: the whole batch becomes visible at once, or (on an error) nothing.
        state, name = self._state, self._leadership.name
        if not self._leadership.is_held:
            raise LeadershipLost(f"leadership of {name!r} was lost; the batch was not committed")
        if self._checkpoint is not None:
            expected, position = self._checkpoint
            current = state.checkpoints.get(name)
            if current != expected:
                raise CheckpointConflict(name, position, current)
        # Every staged append and resolved dead letter is checked before anything changes.
        check_appends(state, self._appends)
        for dead_letter_id in self._resolved:
            if not self._has_letter(dead_letter_id):
                raise DeadLetterNotFound(dead_letter_id, name)
        if self._checkpoint is not None:
            state.checkpoints[name] = self._checkpoint[1]
        for staged in self._appends:
            apply(state, staged)
        letters = state.dead_letters.setdefault(name, [])
        letters[:] = [d for d in letters if d.id not in self._resolved]
        letters.extend(redacted_if_forgotten(state, letter) for letter in self._dead_letters)
        state.projection(name).updated_at = now()
