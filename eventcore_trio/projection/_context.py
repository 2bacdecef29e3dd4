"""What a projector's handlers run in: `ProjectionContext`, and the loop that applies events.

The runner and the dead-letter replay hand `apply_and_commit` the events of one batch; it
opens the batch, points the context at each event in turn, calls ``apply`` (or
``apply_batch``), flushes the queued writes, lets the caller stage the rest (checkpoint, dead
letter) and commits. A failure that belongs to the handlers comes back as a value, with the
index of the event it fell on when that is known; anything else propagates.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, final

import attrs

from .._errors import DatabaseError
from .._events import (
    AppendResult,
    RecordedEvent,
    StreamAppend,
    UndecodableEvent,
    caused_by,
    prepare_appends,
)
from .._partitions import Partition
from .._positions import Position
from .._protocols import Database, Leadership, OneStreamAppend, ProjectionBatch, Store

if TYPE_CHECKING:
    from ._projector import ResolvedProjector

logger = logging.getLogger("eventcore_trio.projection")


@final
class ProjectionContext(OneStreamAppend):
    """What a projector's handler gets besides the event; created only by the runtime.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        *,
        batch: ProjectionBatch,
        store: Store,
        projector: str,
        partition: Partition | None = None,
    ) -> None:
        self._batch = batch
        self._store = store
        self._projector = projector
        self._partition = partition
        self._event: RecordedEvent | None = None

    @property
    def db(self) -> Database:
        """The projector's transaction (PostgreSQL), committed with the checkpoint or not at all.

        ``execute``, ``executemany``, ``fetch``, ``fetchrow`` and ``fetchval`` are Trio
        calls; each is one round trip on the leader's own session.

        Raises:
            DatabaseNotAvailable: the store has no database (the in-memory store).
        """
        return self._batch.db

    @property
    def store(self) -> Store:
        """The store the projection reads from (for reads; writes through `db` are atomic)."""
        return self._store

    @property
    def position(self) -> Position | None:
        """The position of the event being applied (the last one, in a batch hook)."""
        return None if self._event is None else self._event.position

    @property
    def projector(self) -> str:
        """The name of the projector being run."""
        return self._projector

    @property
    def partition(self) -> int | None:
        """Which partition of a partitioned projector this handler runs in (0 to
        ``partitions - 1``), or None when the projector is not partitioned.

        A partition sees every event of its streams, in each stream's order, and nothing of
        the other partitions' streams.

        .. versionadded:: 0.2
        """
        return None if self._partition is None else self._partition.index

    @property
    def partitions(self) -> int:
        """How many partitions the projector has (1 when it is not partitioned).

        .. versionadded:: 0.2
        """
        return 1 if self._partition is None else self._partition.count

    @property
    def event(self) -> RecordedEvent | None:
        """The recorded event being applied (its metadata, id, stream), also when the handler
        receives a typed event decoded from it."""
        return self._event

    async def append_atomic(self, appends: Sequence[StreamAppend]) -> AppendResult:
        """Append to several streams in this batch, with causal metadata; `append` (inherited)
        for one stream: a reactor, or process manager.

        They commit in the same transaction as the checkpoint, or not at all: each handled
        event causes its events exactly once, even when the host is killed mid-batch (the
        batch is applied again by the next leader, and its appends with it). Each event's
        metadata gets the handled event's correlation id and its id as the causation id
        (`caused_by`), unless it sets them itself. Expected versions work as for
        `EventStore.append`.

        Example::

            @projector("shipping", event_types=["OrderPaid"])
            async def ship(event: RecordedEvent, ctx: ProjectionContext) -> None:
                await ctx.append(f"shipment-{event.stream_id}", [NewEvent("ShipmentRequested",
                    {"order": event.stream_id})], expected_version=0)

        Raises:
            VersionConflict: a stream's version is not its expected version; the event fails
                like any handler error (``on_error``: RETRY applies the batch again).

        .. versionadded:: 0.3
        """
        cause = {} if self._event is None else caused_by(self._event)
        stamped = [
            StreamAppend(
                request.stream_id,
                [attrs.evolve(e, metadata={**cause, **e.metadata}) for e in request.events],
                expected_version=request.expected_version,
            )
            for request in prepare_appends(appends)
        ]
        return await self._batch.append_atomic(stamped)


# The event is a RecordedEvent, or the typed object decoded from it with a registry.
Handler = Callable[[Any, ProjectionContext], Awaitable[None]]
BatchHandler = Callable[[Sequence[RecordedEvent], ProjectionContext], Awaitable[None]]
#: A projector's setup hook: ``async def setup(db)``, creating its version's tables.
SetupHook = Callable[[Database], Awaitable[None]]


class HandlerFailed(Exception):
    """A batch failed because of its handlers: one raised (``index``: its event's index in
    the batch, or None for the batch hook), a write they queued failed at the flush, the
    batch broke under them (`ProjectionBatch.failure`), or the database refused to commit
    what they wrote (index None in the last three)."""

    def __init__(self, index: int | None, error: BaseException) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


async def apply_and_commit(
    projector: ResolvedProjector,
    store: Store,
    leadership: Leadership,
    events: Sequence[RecordedEvent],
    *,
    then: Callable[[ProjectionBatch], Awaitable[None]],
    use_batch_hook: bool = False,
    from_start: bool = False,
) -> HandlerFailed | None:
    """In one batch of *leadership*: apply *events* to *projector*'s handlers, stage what
    *then* adds (the checkpoint, a dead letter), and commit. Returns None once committed, or
    the handlers' failure (nothing committed); other errors propagate (a setup hook's too).

    With *from_start* (the unit has no checkpoint: its first batch, or its first after a
    reset) the projector's setup hook runs first, in the same transaction.
    """
    staged = False
    staging: _Staging | None = None
    read_model = projector.setup is not None
    try:
        async with leadership.open_batch(read_model=read_model) as batch:
            if from_start and projector.setup is not None:
                await batch.run_setup(projector.setup)
                await batch.flush()
            if events:
                ctx = ProjectionContext(
                    batch=batch,
                    store=store,
                    projector=projector.projection,
                    partition=projector.partition,
                )
                await _run_handlers(projector, ctx, events, use_batch_hook=use_batch_hook)
            staging = _Staging(batch)
            await then(staging)
            staged = True
    except HandlerFailed as failed:
        return failed
    except DatabaseError as exc:
        if not (staged and events):
            raise
        # The database refused the commit itself (a deferred constraint, a serialization
        # failure) on a session that still holds the lock: some event's writes caused it.
        # The caller finds which (the pipeline applies the batch one event at a time), so
        # the projector's on_error decides, as for any handler error.
        return HandlerFailed(None, exc)
    # Said once each dead letter has committed: a batch that rolled back recorded nothing.
    assert staging is not None
    for event, error, retries in staging.dead_letters:
        logger.warning(
            "unit %s: skipped event %s (%s, id %s, stream %s) into a dead letter%s: %s: %s",
            projector.name,
            event.position,
            event.type,
            event.event_id,
            event.stream_id,
            f" after {retries} retries" if retries else "",
            type(error).__name__,
            error,
        )
    return None


@final
class _Staging:
    """The batch as *then* sees it in `apply_and_commit`: every call goes to the batch, and
    the dead letters it records are remembered, to be logged once they have committed."""

    def __init__(self, batch: ProjectionBatch) -> None:
        self._batch = batch
        self.dead_letters: list[tuple[RecordedEvent | UndecodableEvent, BaseException, int]] = []

    @property
    def db(self) -> Database:
        """The batch's transaction."""
        return self._batch.db

    @property
    def failure(self) -> BaseException | None:
        """Why the batch can no longer commit, or None."""
        return self._batch.failure

    async def flush(self) -> None:
        """Send the batch's queued writes."""
        await self._batch.flush()

    async def run_setup(self, setup: SetupHook) -> None:
        """Run a setup hook in the batch (see `ProjectionBatch.run_setup`)."""
        await self._batch.run_setup(setup)

    async def save_checkpoint(self, expected: Position | None, position: Position) -> None:
        """Move the checkpoint at commit (compare-and-set)."""
        await self._batch.save_checkpoint(expected, position)

    async def record_dead_letter(
        self, event: RecordedEvent | UndecodableEvent, error: BaseException, *, retries: int
    ) -> None:
        """Record *event* as skipped because of *error*, and remember it for the log."""
        await self._batch.record_dead_letter(event, error, retries=retries)
        self.dead_letters.append((event, error, retries))

    async def resolve_dead_letter(self, dead_letter_id: uuid.UUID) -> None:
        """Delete a dead letter of this unit as replayed, in this transaction."""
        await self._batch.resolve_dead_letter(dead_letter_id)

    async def append_atomic(self, appends: Sequence[StreamAppend]) -> AppendResult:
        """Append events that commit with the checkpoint."""
        return await self._batch.append_atomic(appends)


async def _run_handlers(
    projector: ResolvedProjector,
    ctx: ProjectionContext,
    events: Sequence[RecordedEvent],
    *,
    use_batch_hook: bool,
) -> None:
    # The pipeline decides whether a batch goes to the batch hook in one call; a projector
    # that has only a batch hook gets single events as batches of one.
    decode = projector.decode
    if use_batch_hook and projector.apply_batch is not None:
        ctx._event = events[-1]
        try:
            payload: Sequence[Any] = (
                events if decode is None else [item for e in events for item in decode(e)]
            )
            await projector.apply_batch(payload, ctx)
        except Exception as exc:
            raise HandlerFailed(None, exc) from exc
        _check_batch(ctx, None)
        await _flush(ctx)
        return
    batch_hook = projector.apply_batch
    for index, event in enumerate(events):
        ctx._event = event
        try:
            if decode is None:
                # The common case, once per event: no decoding, no tuple of one.
                if batch_hook is None:
                    await projector.apply(event, ctx)
                else:
                    await batch_hook([event], ctx)
            else:
                # An upcast event may stand for several typed events, or none.
                for item in decode(event):
                    if batch_hook is None:
                        await projector.apply(item, ctx)
                    else:
                        await batch_hook([item], ctx)
        except Exception as exc:
            raise HandlerFailed(index, exc) from exc
        _check_batch(ctx, index)
    await _flush(ctx)


async def _flush(ctx: ProjectionContext) -> None:
    # Writes queued through ctx.db.queue go out once per batch. Which event's write failed
    # is not known here (index None): the pipeline then applies the batch's events one at a
    # time, where it is.
    try:
        await ctx._batch.flush()
    except Exception as exc:
        raise HandlerFailed(None, exc) from exc
    _check_batch(ctx, None)


def _check_batch(ctx: ProjectionContext, index: int | None) -> None:
    # A handler that swallowed the error of an interrupted ctx.db statement (or the
    # cancellation of its own timeout) returned normally, but its batch cannot commit: the
    # failure is that handler's.
    failure = ctx._batch.failure
    if failure is not None:
        raise HandlerFailed(index, failure) from failure
