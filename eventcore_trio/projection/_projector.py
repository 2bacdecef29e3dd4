"""Projectors: async functions (or classes) that the runtime feeds events to."""

from __future__ import annotations

import enum
import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, final, runtime_checkable

import attrs

from .._errors import InvalidArgument
from .._events import (
    AppendResult,
    NewEvent,
    RecordedEvent,
    StreamAppend,
    UndecodableEvent,
    caused_by,
    prepare_appends,
)
from .._filters import EventFilter
from .._partitions import Partition, check_partitions, units_of
from .._positions import Position
from .._protocols import Database, ProjectionBatch, Store
from .._typed import EventRegistry
from .._validation import check_projector_name


class FailureStrategy(enum.Enum):
    """What the runtime does with an event that a projector failed on.

    .. versionadded:: 0.1
    """

    #: Stop with `ProjectionFailed`; the batch rolls back and the checkpoint stays before the
    #: failing event, so the next run starts with it. The default.
    FATAL = "fatal"
    #: Record the event and the error as a dead letter (durable, listable, replayable), move
    #: the checkpoint past it, and continue.
    SKIP = "skip"
    #: Roll back, wait (exponential backoff with a cap), and try the event again; after
    #: ``ProjectionConfig.max_retries`` retries the failure is fatal.
    RETRY = "retry"


@final
@attrs.frozen(kw_only=True)
class Failure:
    """What ``on_error`` is told about a failure.

    Attributes:
        error: the exception: the projector's own, or `EventDecodeError` for a stored event
            that does not decode.
        event: the failing event; an `UndecodableEvent` when it does not decode.
        position: the failing event's position.
        retries: how many times this event has been retried already.

    .. versionadded:: 0.1
    """

    error: BaseException
    event: RecordedEvent | UndecodableEvent
    position: Position
    retries: int


@final
class ProjectionContext:
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
        self._position: Position | None = None
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
        return self._position

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

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None = None,
    ) -> AppendResult:
        """Append *events* to a stream in this batch: a reactor, or process manager.

        They commit in the same transaction as the checkpoint, or not at all: each handled
        event causes its events exactly once, even when the host is killed mid-batch (the
        batch is applied again by the next leader, and its appends with it). Each event's
        metadata gets the handled event's correlation id and its id as the causation id
        (`caused_by`), unless it sets them itself. ``expected_version`` works as for
        `EventStore.append`.

        Example::

            @projector("shipping", event_types=["OrderPaid"])
            async def ship(event: RecordedEvent, ctx: ProjectionContext) -> None:
                await ctx.append(f"shipment-{event.stream_id}", [NewEvent("ShipmentRequested",
                    {"order": event.stream_id})], expected_version=0)

        Raises:
            VersionConflict: the stream's version is not *expected_version*; the event fails
                like any handler error (``on_error``: RETRY applies the batch again).

        .. versionadded:: 0.3
        """
        return await self.append_atomic(
            [StreamAppend(stream_id, events, expected_version=expected_version)]
        )

    async def append_atomic(self, appends: Sequence[StreamAppend]) -> AppendResult:
        """Append to several streams in this batch, with causal metadata (see `append`).

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
ErrorHandler = Callable[[Failure], FailureStrategy]
BatchHandler = Callable[[Sequence[RecordedEvent], ProjectionContext], Awaitable[None]]


@runtime_checkable
class Projector(Protocol):
    """What the runtime runs: a name, a filter and an async ``apply``.

    Optional members are honoured when present: ``on_error(failure) -> FailureStrategy``
    (default: FATAL) and ``async apply_batch(events, ctx)``, which receives each batch whole
    instead of one event at a time.

    .. versionadded:: 0.1
    """

    @property
    def name(self) -> str:
        """The name: it keys the checkpoint and the leadership lock."""
        ...

    @property
    def filter(self) -> EventFilter:
        """Which events to apply; pushed into the store's query."""
        ...

    # Optional: ``partitions: int`` (default 1) runs the projector as that many units, each
    # with the streams of one partition (see `projector`).

    async def apply(self, event: RecordedEvent, ctx: ProjectionContext) -> None:
        """Apply one event."""
        ...


@final
@attrs.frozen
class FunctionProjector:
    """A projector made from an async function by `projector`; call it like the function.

    Attributes:
        name: the projector's name.
        filter: its event filter.
        handler: the decorated function.
        registry: the `EventRegistry` its events are decoded with, if any.
        partitions: how many partitions (units) it runs as.

    .. versionadded:: 0.1
    """

    name: str
    filter: EventFilter
    handler: Handler
    _on_error: ErrorHandler | None = attrs.field(default=None, alias="on_error")
    registry: EventRegistry | None = attrs.field(default=None, kw_only=True)
    partitions: int = attrs.field(default=1, kw_only=True)

    async def __call__(self, event: RecordedEvent, ctx: ProjectionContext) -> None:
        """Call the handler, exactly as the undecorated function."""
        await self.handler(event, ctx)

    async def apply(self, event: RecordedEvent, ctx: ProjectionContext) -> None:
        """Apply one event: call the handler."""
        await self.handler(event, ctx)

    def on_error(self, failure: Failure) -> FailureStrategy:
        """The strategy for *failure*: the given ``on_error``, else FATAL."""
        if self._on_error is None:
            return FailureStrategy.FATAL
        return self._on_error(failure)


def projector(
    name: str,
    *,
    event_types: Iterable[str] | None = None,
    stream_prefix: str | None = None,
    stream_pattern: str | None = None,
    on_error: ErrorHandler | None = None,
    registry: EventRegistry | None = None,
    partitions: int = 1,
) -> Callable[[Handler], FunctionProjector]:
    """Make an async function ``handler(event, ctx)`` into a `Projector`.

    Example::

        @projector("balances", event_types=["Deposited", "Withdrawn"])
        async def balances(event: RecordedEvent, ctx: ProjectionContext) -> None:
            await ctx.db.execute("...", event.stream_id, event.data["amount"])

    Args:
        name: the projector's name (1-120 characters, no control characters); it keys the
            checkpoint and the leadership lock, so renaming it starts a new projection.
        event_types: only these event types; None for all.
        stream_prefix: only streams whose id starts with this literal prefix.
        stream_pattern: only streams whose id matches this glob.
        on_error: called with a `Failure`; returns a `FailureStrategy` (default: FATAL).
        registry: decode each event with this `EventRegistry` and pass the typed object to
            the handler (``ctx.event`` keeps the recorded event); an unregistered type or
            data that does not fit its class reaches ``on_error`` as `EventDecodeError`.
        partitions: run as this many units (1 to `MAX_PARTITIONS`), each applying the
            events of the streams in one `Partition`, with its own lock, checkpoint and
            failover, so that several processes share the work. Each stream's events still
            arrive in order, in one partition; there is no order across partitions. Change
            it only to a multiple (a split, which continues from the checkpoints); anything
            else needs a reset (`PartitionsChanged`).

    Raises:
        InvalidArgument: an invalid name, filter or partition count, or a handler that is
            not an async function.

    .. versionadded:: 0.1
    """
    check_projector_name(name)
    check_partitions(partitions)
    event_filter = EventFilter(
        event_types=event_types, stream_prefix=stream_prefix, stream_pattern=stream_pattern
    )
    if on_error is not None and not callable(on_error):
        raise InvalidArgument(f"on_error must be callable, got {type(on_error).__name__}")

    def decorate(handler: Handler) -> FunctionProjector:
        if not inspect.iscoroutinefunction(handler):
            raise InvalidArgument(
                f"@projector({name!r}) needs an async function `async def "
                f"handler(event, ctx)`, got {handler!r}"
            )
        return FunctionProjector(
            name,
            event_filter,
            handler,
            on_error=on_error,
            registry=registry,
            partitions=partitions,
        )

    return decorate


@attrs.frozen
class ResolvedProjector:
    """A projector checked and normalised for the runtime, or one unit of it (internal).

    ``name`` keys the lock and the checkpoint: the projector's name, or a unit's
    (``"name[2/4]"``), whose ``filter`` then includes its partition.
    """

    name: str
    filter: EventFilter
    apply: Handler
    apply_batch: BatchHandler | None
    on_error: ErrorHandler
    # The registry's decode_all: an upcast event may stand for several typed events.
    decode: Callable[[RecordedEvent], tuple[Any, ...]] | None = None
    projection: str = attrs.field(kw_only=True)
    partitions: int = attrs.field(default=1, kw_only=True)
    partition: Partition | None = attrs.field(default=None, kw_only=True)

    def units(self) -> list[ResolvedProjector]:
        """One resolved projector per unit (itself when unpartitioned)."""
        if self.partitions == 1:
            return [self]
        return [
            attrs.evolve(
                self,
                name=unit.name,
                filter=attrs.evolve(self.filter, partition=unit.partition),
                partition=unit.partition,
            )
            for unit in units_of(self.projection, self.partitions)
        ]

    def context(self, batch: ProjectionBatch, store: Store) -> ProjectionContext:
        """The ``ctx`` handlers get in *batch*."""
        return ProjectionContext(
            batch=batch, store=store, projector=self.projection, partition=self.partition
        )


def _default_on_error(_: Failure) -> FailureStrategy:
    return FailureStrategy.FATAL


def check_projector(candidate: object) -> str:
    """Check that *candidate* is a usable projector (a name, a filter and ``async apply``, or
    an ``@projector`` function) and return its name.

    For tools that load projectors named on a command line (``eventcore-trio run``, the
    dashboard) and want a clear error before anything runs.

    Raises:
        InvalidArgument: *candidate* is not a projector, or one of its members is invalid.

    .. versionadded:: 0.3
    """
    return resolve(candidate).name


def resolve(candidate: object) -> ResolvedProjector:
    """Check that *candidate* is a usable projector and normalise its optional members."""
    name = getattr(candidate, "name", None)
    if not isinstance(name, str):
        raise InvalidArgument(
            f"{candidate!r} is not a projector: it needs a `name` (str), a `filter` "
            "(EventFilter) and `async apply(event, ctx)`; or decorate an async function "
            "with @projector(name)"
        )
    check_projector_name(name)
    partitions = getattr(candidate, "partitions", 1)
    if partitions is None:
        partitions = 1
    check_partitions(partitions, owner=f"projector {name!r}: partitions")
    event_filter = getattr(candidate, "filter", None)
    if event_filter is None:
        event_filter = EventFilter()
    if not isinstance(event_filter, EventFilter):
        raise InvalidArgument(
            f"projector {name!r} has a filter of type {type(event_filter).__name__}; "
            "it must be an EventFilter"
        )
    if event_filter.partition is not None:
        raise InvalidArgument(
            f"projector {name!r}: its filter names a partition; set partitions=K on the "
            "projector instead, and the runtime runs each partition as a unit"
        )
    apply = getattr(candidate, "apply", None)
    if not inspect.iscoroutinefunction(apply):
        raise InvalidArgument(f"projector {name!r} needs an `async def apply(event, ctx)`")
    apply_batch = getattr(candidate, "apply_batch", None)
    if apply_batch is not None and not inspect.iscoroutinefunction(apply_batch):
        raise InvalidArgument(f"projector {name!r}: apply_batch must be an async method")
    on_error = getattr(candidate, "on_error", None)
    if on_error is not None and not callable(on_error):
        raise InvalidArgument(f"projector {name!r}: on_error must be callable")
    if isinstance(candidate, FunctionProjector):
        # Call the decorated function itself: one coroutine frame less per event.
        apply = candidate.handler
    registry = getattr(candidate, "registry", None)
    if registry is not None and not isinstance(registry, EventRegistry):
        raise InvalidArgument(f"projector {name!r}: registry must be an EventRegistry")
    return ResolvedProjector(
        name=name,
        filter=event_filter,
        decode=None if registry is None else registry.decode_all,
        apply=apply,
        apply_batch=apply_batch,
        on_error=on_error or _default_on_error,
        projection=name,
        partitions=partitions,
    )
