"""Projectors: async functions (or classes) that the runtime feeds events to."""

from __future__ import annotations

import enum
import inspect
import reprlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Protocol, final, runtime_checkable

import attrs

from .._errors import InvalidArgument
from .._events import RecordedEvent, UndecodableEvent
from .._filters import EventFilter
from .._partitions import Partition, check_partitions, units_of
from .._positions import Position
from .._protocols import Store
from .._typed import EventRegistry
from .._validation import check_projector_name
from .._versions import check_version, versioned_name
from ._context import BatchHandler, Handler, ProjectionContext, SetupHook


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


ErrorHandler = Callable[[Failure], FailureStrategy]


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
        version: its projection version (see `projector`).
        setup: its setup hook, if any (see `projector`).

    .. versionadded:: 0.1
    .. versionchanged:: 0.4
       ``version`` and ``setup``.
    """

    name: str
    filter: EventFilter
    handler: Handler
    _on_error: ErrorHandler | None = attrs.field(default=None, alias="on_error")
    registry: EventRegistry | None = attrs.field(default=None, kw_only=True)
    partitions: int = attrs.field(default=1, kw_only=True)
    version: int = attrs.field(default=1, kw_only=True)
    setup: SetupHook | None = attrs.field(default=None, kw_only=True)

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
    tags: Iterable[str] = (),
    on_error: ErrorHandler | None = None,
    registry: EventRegistry | None = None,
    partitions: int = 1,
    version: int = 1,
    setup: SetupHook | None = None,
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
        tags: only events carrying every one of these tags (combined with the other
            criteria: all must hold).
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
        version: the projection version (1 to `MAX_VERSION`; default 1). Changing a
            projector's logic? Raise its version: the new version is a projection of its own
            (units, locks, checkpoints, partitions, dead letters) that rebuilds from the
            start beside the serving one, and takes over serving, in one atomic step, once
            every unit of it has caught up; the lower version then stops (its data stays
            until retired). See docs/projections.md, "Changing a projection".
        setup: ``async def setup(db)``: creates the version's tables (idempotently: each
            partition runs it, ``CREATE TABLE IF NOT EXISTS``) whenever a unit starts from
            the beginning: when it starts, in its first batch, and again after a reset. A
            projector with a setup hook runs its batches in a read-model schema of its own
            per version (PostgreSQL: first on the batch's ``search_path``, so the
            unqualified names of ``ctx.db`` land there; readers find it with
            ``store.read_model_schema(name)``).

    Raises:
        InvalidArgument: an invalid name, filter, partition count or version, a setup hook
            that is not an async function, or a handler that is not an async function.

    .. versionadded:: 0.1
    .. versionchanged:: 0.4
       *version*, *setup* and *tags*.
    """
    check_projector_name(name)
    check_partitions(partitions)
    check_version(version, owner=f"projector {name!r}: version")
    if setup is not None and not inspect.iscoroutinefunction(setup):
        raise InvalidArgument(
            f"projector {name!r}: setup must be an async function `async def setup(db)`, "
            f"got {setup!r}"
        )
    event_filter = EventFilter(
        event_types=event_types,
        stream_prefix=stream_prefix,
        stream_pattern=stream_pattern,
        tags=tags,
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
            version=version,
            setup=setup,
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
    # The projection (unit set) its units belong to: the versioned name (see _versions).
    projection: str = attrs.field(kw_only=True)
    partitions: int = attrs.field(default=1, kw_only=True)
    partition: Partition | None = attrs.field(default=None, kw_only=True)
    # The projector's own name (without a version) and its version.
    base: str = attrs.field(kw_only=True)
    version: int = attrs.field(default=1, kw_only=True)
    setup: SetupHook | None = attrs.field(default=None, kw_only=True)

    @property
    def unit_filters(self) -> list[tuple[str, EventFilter]]:
        """Every unit of this projector's version, with the filter it applies."""
        return [(unit.name, unit.filter) for unit in self.units()]

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
    version = getattr(candidate, "version", 1)
    check_version(version, owner=f"projector {name!r}: version")
    setup = getattr(candidate, "setup", None)
    if setup is not None and not inspect.iscoroutinefunction(setup):
        raise InvalidArgument(
            f"projector {name!r}: setup must be an async function `async def setup(db)`"
        )
    projection = versioned_name(name, version)
    return ResolvedProjector(
        name=projection,
        filter=event_filter,
        decode=None if registry is None else registry.decode_all,
        apply=apply,
        apply_batch=apply_batch,
        on_error=on_error or _default_on_error,
        projection=projection,
        partitions=partitions,
        base=name,
        version=version,
        setup=setup,
    )


def resolve_call(function: str, first: object, second: object) -> tuple[Store, ResolvedProjector]:
    """The store and the resolved projector of a ``function(store, projector)`` call.

    The projector-first order of 0.3 is still accepted, with a `DeprecationWarning` that
    points at the caller of *function*, which must call this directly (its stacklevel counts
    on it).
    """
    if isinstance(first, Store):
        if isinstance(second, Store):
            raise InvalidArgument(
                f"{function}(store, projector) got two stores ({_describe(first)}, then "
                f"{_describe(second)}); pass the store, then the projector to run"
            )
        return first, resolve(second)
    if isinstance(second, Store):
        try:
            resolved = resolve(first)
        except InvalidArgument as exc:
            raise InvalidArgument(
                f"{function}(store, projector) takes the store first, then the projector; "
                f"got {_describe(first)}, then {_describe(second)}: {exc}"
            ) from exc
        # The order of 0.3 and before, accepted for one more release.
        warnings.warn(
            f"pass the store first: {function}(store, projector); the old order is removed in 0.5",
            DeprecationWarning,
            stacklevel=3,
        )
        return second, resolved
    raise InvalidArgument(
        f"{function}(store, projector) takes a store first (open_memory_store() or "
        f"open_postgres_store(...)), then the projector; got {_describe(first)}, then "
        f"{_describe(second)}"
    )


def _describe(argument: object) -> str:
    if isinstance(argument, Store):
        return f"a store ({type(argument).__name__})"
    name = getattr(argument, "name", None)
    if isinstance(name, str) and hasattr(argument, "apply"):
        return f"projector {name!r}"
    return f"{reprlib.repr(argument)} ({type(argument).__name__})"
