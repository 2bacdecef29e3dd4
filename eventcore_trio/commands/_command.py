"""Commands: read streams, fold them into state, decide, append atomically; retry conflicts."""

from __future__ import annotations

import random
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, Protocol, TypeVar, cast, final, runtime_checkable

import attrs
import trio

from .._errors import ConfigurationError, InvalidArgument, RetriesExhausted, VersionConflict
from .._events import (
    CAUSATION_ID,
    CORRELATION_ID,
    AppendResult,
    NewEvent,
    RecordedEvent,
    StreamAppend,
    caused_by,
)
from .._protocols import EventStore
from .._typed import EventRegistry
from .._util import conforms
from ._cache import StateCache
from ._query_command import QueryCommand, execute_query_command
from ._states import StateCommand, load_states, state_streams

S = TypeVar("S")


@runtime_checkable
class Command(Protocol[S]):
    """A decision over one or more streams.

    ``streams()`` names the streams to read; ``evolve`` folds each of their events (in stream
    order, each stream oldest first) into the state, starting from ``initial_state()``;
    ``decide(state)`` returns the new events per stream, or raises a domain error (which
    `execute` never retries). Optionally, ``more_streams(state)`` names further streams
    discovered from the state read so far; they are read and folded too.

    ``evolve`` receives each `RecordedEvent` (its stream, version and metadata included; call
    ``registry.decode(event)`` for the typed object). ``decide`` returns `NewEvent` objects,
    or registered typed event objects when `execute` is given the registry.

    ``decide`` runs again on every attempt (as do ``evolve`` and ``more_streams``): after a
    version conflict `execute` reads the streams again and decides again, and only the last
    decision is written. So it must have no side effects (no email, HTTP call, write
    elsewhere or counter): return events, and act on what was written once `execute` has
    returned (`ExecutionResult.events`) or in a projector that handles those events.

    .. versionadded:: 0.1
    """

    def streams(self) -> Sequence[str]:
        """The streams to read before deciding."""
        ...

    def initial_state(self) -> S:
        """The state before any event."""
        ...

    def evolve(self, state: S, event: RecordedEvent) -> S:
        """Fold one event into the state (pure)."""
        ...

    def decide(self, state: S) -> Mapping[str, Sequence[Any]]:
        """The events to append, by stream; raise a domain error to refuse.

        Called once per attempt, so without side effects.
        """
        ...


def _positive_int(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if type(value) is not int or value < 1:
        raise ConfigurationError(f"RetryPolicy.{attribute.name} must be an int >= 1, got {value!r}")


def _seconds(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if type(value) not in (int, float) or not 0 <= value < float("inf"):
        raise ConfigurationError(
            f"RetryPolicy.{attribute.name} must be a finite number of seconds >= 0, got {value!r}"
        )


@final
@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How `execute` retries a command that met a version conflict.

    Attributes:
        max_attempts: attempts in all, the first included (default 10).
        initial_backoff: the delay cap before the second attempt, in seconds (default 0.005);
            doubled for each further attempt.
        max_backoff: the largest delay cap (default 0.5).
        jitter: wait a uniformly random time up to the cap ("full jitter", the default) so
            that writers that collided do not collide again; False waits the cap exactly.

    .. versionadded:: 0.1
    """

    max_attempts: int = attrs.field(default=10, validator=_positive_int)
    initial_backoff: float = attrs.field(default=0.005, validator=_seconds)
    max_backoff: float = attrs.field(default=0.5, validator=_seconds)
    jitter: bool = True

    def backoff(self, failed_attempts: int, rng: random.Random | None = None) -> float:
        """The delay after *failed_attempts* conflicts (>= 1)."""
        cap = min(self.initial_backoff * 2.0 ** (failed_attempts - 1), self.max_backoff)
        if not self.jitter:
            return cap
        return (rng or random).uniform(0, cap)


@final
@attrs.frozen(kw_only=True)
class ExecutionResult:
    """What `execute` wrote.

    Attributes:
        append: the append's result, or None when the decision was to write nothing.
        events: the events written, by stream.
        attempts: how many attempts it took (1 without conflicts).
        correlation_id: the correlation id stamped on the events.

    .. versionadded:: 0.1
    """

    append: AppendResult | None
    events: Mapping[str, tuple[NewEvent, ...]]
    attempts: int
    correlation_id: str


async def _read_state(store: EventStore, command: Command[Any]) -> tuple[Any, dict[str, int]]:
    state = command.initial_state()
    versions: dict[str, int] = {}
    pending = list(command.streams())
    more = getattr(command, "more_streams", None)
    while pending:
        stream_id = pending.pop(0)
        if stream_id in versions:
            continue
        events: list[RecordedEvent] = await store.read_stream(stream_id)
        versions[stream_id] = len(events)
        for event in events:
            state = command.evolve(state, event)
        if more is not None:
            pending.extend(s for s in more(state) if s not in versions)
    return state, versions


async def execute(
    store: EventStore,
    command: Command[Any] | StateCommand | QueryCommand,
    *,
    retry: RetryPolicy | None = None,
    registry: EventRegistry | None = None,
    metadata: Mapping[str, Any] | None = None,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    caused_by_event: RecordedEvent | None = None,
    cache: StateCache | None = None,
) -> ExecutionResult:
    """Run *command*: read its streams, decide, and append atomically, retrying conflicts.

    Each attempt reads every stream, folds it, decides, and calls `append_atomic` with
    the expected version of **every** stream it read, including those it writes nothing to
    (read-only participants), so a decision based on a stream that changed meanwhile is
    retried. On `VersionConflict` it backs off (exponential, with jitter) and starts over, up
    to ``retry.max_attempts``; a domain error raised by ``decide`` propagates at once and is
    never retried.

    Starting over means calling ``decide`` again, on the state read by that attempt: it runs
    once per attempt, and only the last attempt's decision is written (or none, after a
    domain error, `RetriesExhausted` or a cancellation). ``decide`` must therefore have no
    side effects: do what should follow a write after this returns, from the
    `ExecutionResult` (at most once: a crash in between loses it), or in a projector or
    reactor that handles the written events (reliably).

    A `Command` folds every event of its streams on every attempt. A `StateCommand` folds
    each stream into its registered state class and, given a *cache*, keeps the states: the
    next attempt or command reads only the events after the cached version (a conflict
    refreshes from there, not from the first event). States registered with
    ``snapshot_every`` are also kept as snapshots, for processes whose cache is cold.

    Every written event's metadata gets *metadata*, a ``correlation_id`` (given, taken from
    *caused_by_event*, or new) and a ``causation_id`` (given, *caused_by_event*'s id, or the
    correlation id), so a causal chain can be followed across commands and projectors.

    Args:
        store: the store to read from and append to.
        command: the `Command`, `StateCommand` or `QueryCommand` (a decision over the
            events a query matches: see docs/commands.md).
        retry: the `RetryPolicy` for version conflicts (default: `RetryPolicy()`).
        registry: encodes typed event objects that ``decide`` returns.
        metadata: extra metadata for every event written.
        correlation_id: defaults to *caused_by_event*'s, else a new UUID.
        causation_id: defaults to *caused_by_event*'s id, else the correlation id.
        caused_by_event: the event this command reacts to (see `caused_by`).
        cache: keeps a `StateCommand`'s folded states between attempts and commands
            (ignored by a `Command`).

    Returns:
        An `ExecutionResult`: what was written and how many attempts it took.

    Raises:
        RetriesExhausted: every attempt met a conflict; nothing was written.

    This is a checkpoint; cancelling it writes nothing or the whole decision.

    .. versionadded:: 0.1
    .. versionchanged:: 0.3
        `StateCommand` and *cache*.
    .. versionchanged:: 0.4
        `QueryCommand`: read the query, fold, decide, append on the condition that no
        matching event was written since, retried on `AppendConditionFailed` like a conflict.
    """
    policy = retry or RetryPolicy()
    if callable(getattr(command, "query", None)) and callable(getattr(command, "streams", None)):
        raise InvalidArgument(
            f"{type(command).__qualname__} has both query() and streams(): a command decides "
            "over a query (a QueryCommand) or over streams (a Command or StateCommand), not "
            "both; rename one of them"
        )
    if conforms(command, QueryCommand) and not conforms(command, Command):
        return await _execute_query(
            store,
            cast(QueryCommand, command),
            policy,
            metadata,
            correlation_id,
            causation_id,
            caused_by_event,
            registry,
        )
    stream_command = cast("Command[Any] | StateCommand", command)
    read = _reader(store, stream_command, registry, cache)
    stamp = _stamp(metadata, correlation_id, causation_id, caused_by_event)
    correlation = stamp[CORRELATION_ID]
    attempt = 0
    fresh: set[str] = set()
    while True:
        attempt += 1
        state, versions = await read(fresh)
        decision = stream_command.decide(state)
        written: dict[str, tuple[NewEvent, ...]] = {}
        for stream_id, produced in decision.items():
            events = tuple(_to_new_event(e, stamp, registry) for e in produced)
            if events:
                written[stream_id] = events
        if not written:
            return ExecutionResult(
                append=None, events={}, attempts=attempt, correlation_id=correlation
            )
        appends = [
            StreamAppend(stream_id, events, expected_version=versions.get(stream_id))
            for stream_id, events in written.items()
        ]
        appends += [
            StreamAppend(stream_id, [], expected_version=version)
            for stream_id, version in versions.items()
            if stream_id not in written
        ]
        try:
            result = await store.append_atomic(appends)
        except VersionConflict as conflict:
            if conflict.actual < conflict.expected:
                # A cached state or snapshot ahead of its stream (the store was rebuilt):
                # fold that stream from its first event from now on.
                fresh.add(conflict.stream_id)
            if attempt >= policy.max_attempts:
                raise RetriesExhausted(
                    f"{type(command).__name__} met a version conflict on each of {attempt} "
                    f"attempts (last on stream {conflict.stream_id!r}); nothing was written",
                    attempts=attempt,
                ) from conflict
            await trio.sleep(policy.backoff(attempt))
            continue
        return ExecutionResult(
            append=result, events=written, attempts=attempt, correlation_id=correlation
        )


async def _execute_query(
    store: EventStore,
    command: QueryCommand,
    policy: RetryPolicy,
    metadata: Mapping[str, Any] | None,
    correlation_id: str | None,
    causation_id: str | None,
    caused_by_event: RecordedEvent | None,
    registry: EventRegistry | None,
) -> ExecutionResult:
    stamp = _stamp(metadata, correlation_id, causation_id, caused_by_event)
    result, written, attempts = await execute_query_command(
        store,
        command,
        backoff=policy.backoff,
        max_attempts=policy.max_attempts,
        to_new_event=lambda event: _to_new_event(event, stamp, registry),
    )
    return ExecutionResult(
        append=result, events=written, attempts=attempts, correlation_id=stamp[CORRELATION_ID]
    )


def _stamp(
    metadata: Mapping[str, Any] | None,
    correlation_id: str | None,
    causation_id: str | None,
    caused_by_event: RecordedEvent | None,
) -> dict[str, Any]:
    # What every written event's metadata gets: the caller's, a correlation id and a
    # causation id (see `execute`).
    stamp: dict[str, Any] = dict(metadata or {})
    if caused_by_event is not None:
        stamp.update(caused_by(caused_by_event))
    correlation = correlation_id or stamp.get(CORRELATION_ID) or str(uuid.uuid4())
    stamp[CORRELATION_ID] = correlation
    stamp[CAUSATION_ID] = causation_id or stamp.get(CAUSATION_ID) or correlation
    return stamp


Reader = Callable[[Collection[str]], Awaitable[tuple[Any, Mapping[str, int]]]]


def _reader(
    store: EventStore,
    command: object,
    registry: EventRegistry | None,
    cache: StateCache | None,
) -> Reader:
    # How each attempt reads: a fold command folds every event of its streams into one
    # state; a state command loads each stream's state (cache, snapshot, then new events).
    if cache is not None and not isinstance(cache, StateCache):
        raise InvalidArgument(f"cache must be a StateCache, got {type(cache).__name__}")
    if conforms(command, Command):
        fold_command = cast("Command[Any]", command)

        async def read_folded(_: Collection[str]) -> tuple[Any, Mapping[str, int]]:
            return await _read_state(store, fold_command)

        return read_folded
    if conforms(command, StateCommand):
        half_a_fold = [
            name for name in ("initial_state", "evolve") if callable(getattr(command, name, None))
        ]
        if half_a_fold:
            # One of a fold command's two methods without the other: a misspelt name, not a
            # state command missing its registry.
            (present,) = half_a_fold
            absent = "evolve" if present == "initial_state" else "initial_state"
            raise InvalidArgument(
                f"{type(command).__qualname__} has {present}() but no {absent}(): a Command "
                f"folds its streams with both (check the spelling of {absent}); a state "
                "command has neither and is given registry=..."
            )
        if registry is None:
            raise InvalidArgument(
                f"{type(command).__qualname__} is a state command; pass registry=... to "
                "execute(), the registry its state classes are registered in"
            )
        state_registry = registry
        streams = state_streams(cast(StateCommand, command), registry)

        async def read_states(fresh: Collection[str]) -> tuple[Any, Mapping[str, int]]:
            return await load_states(store, state_registry, streams, cache, fresh)

        return read_states
    raise InvalidArgument(
        f"{command!r} is not a command: it needs streams() and decide(), and either "
        "initial_state() and evolve() (a Command) or streams() mapping each stream to a "
        "registered state class (a StateCommand)"
    )


def _to_new_event(
    event: object, stamp: Mapping[str, Any], registry: EventRegistry | None
) -> NewEvent:
    if isinstance(event, NewEvent):
        return attrs.evolve(event, metadata={**stamp, **event.metadata})
    if registry is None:
        raise InvalidArgument(
            f"decide() returned {type(event).__qualname__}, not a NewEvent; pass "
            "registry=... to execute() to write typed events"
        )
    return registry.new_event(event, metadata=stamp)
