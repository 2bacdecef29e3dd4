"""Commands over per-stream typed states: loading them from the cache, snapshots and events."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Final, Protocol, cast, runtime_checkable

import attrs
import trio

from .._errors import ConfigurationError, InvalidArgument
from .._events import RecordedEvent
from .._protocols import EventStore, SnapshotStore
from .._snapshots import Snapshot
from .._typed import STATE_FIELDS_KEY, EventRegistry, StateType
from .._util import conforms, raise_single
from ._cache import CachedState, StateCache

logger = logging.getLogger("eventcore_trio.commands")


@runtime_checkable
class StateCommand(Protocol):
    """A decision over the typed states of one or more streams.

    ``streams()`` maps each stream to read to its state class (registered with
    `EventRegistry.state`); `execute` folds each stream's typed events into an instance of
    that class with its ``evolve`` method, starting from ``cls()``, and passes the states to
    ``decide(states)``, which returns the new events per stream or raises a domain error.
    Because each state belongs to one stream, `execute` can keep it in a `StateCache` and in
    snapshots, and read only the events that follow.

    ``decide`` runs again on every attempt: after a version conflict `execute` loads the
    states again and decides again, and only the last decision is written. So it must have
    no side effects (no email, HTTP call, write elsewhere or counter): return events, and
    act on what was written once `execute` has returned (`ExecutionResult.events`) or in a
    projector that handles those events.

    Example::

        @attrs.frozen
        class Deposit:
            account: str
            amount: int

            def streams(self) -> Mapping[str, type[Account]]:
                return {self.account: Account}

            def decide(self, states: Mapping[str, Account]) -> Mapping[str, Sequence[object]]:
                return {self.account: [Deposited(self.amount)]}

    .. versionadded:: 0.3
    """

    def streams(self) -> Mapping[str, type[Any]]:
        """The streams to read, each with its registered state class."""
        ...

    def decide(self, states: Mapping[str, Any]) -> Mapping[str, Sequence[Any]]:
        """The events to append, by stream; raise a domain error to refuse.

        Called once per attempt, so without side effects.
        """
        ...


def state_streams(command: StateCommand, registry: EventRegistry) -> dict[str, StateType]:
    """The command's streams and their state registrations, checked."""
    streams = command.streams()
    if not isinstance(streams, Mapping):
        raise InvalidArgument(
            f"{type(command).__qualname__}.streams() returned {type(streams).__name__}; a "
            "state command maps each stream id to its state class"
        )
    return {stream_id: registry.state_type(cls) for stream_id, cls in streams.items()}


def _snapshot_store(store: EventStore, kind: StateType) -> SnapshotStore:
    if not conforms(store, SnapshotStore):
        raise ConfigurationError(
            f"state {kind.name!r} takes snapshots, but {type(store).__name__} does not keep "
            "them (it is not a SnapshotStore); drop snapshot_every or use a store that does"
        )
    return cast(SnapshotStore, store)


def fold(
    registry: EventRegistry, kind: StateType, state: Any, events: Sequence[RecordedEvent]
) -> Any:
    """Fold *events* (decoded and upcast) into *state* with the state class's ``evolve``."""
    for event in events:
        for item in registry.decode_all(event):
            state = state.evolve(item)
    if type(state) is not kind.cls:
        raise InvalidArgument(
            f"{kind.cls.__qualname__}.evolve returned {type(state).__qualname__}; it must "
            f"return the next {kind.cls.__qualname__}"
        )
    return state


_NOTHING_FOLDED: Final = 0


def _initial(kind: StateType) -> CachedState:
    return CachedState(
        kind.cls(), _NOTHING_FOLDED, _NOTHING_FOLDED, event_id=None, event_recorded_at=None
    )


def _proves(
    version: int,
    event_id: uuid.UUID | None,
    recorded_at: dt.datetime | None,
    events: Sequence[RecordedEvent],
) -> bool:
    # Whether *events*, read from *version* on, begin with the very recorded event that a
    # state folded up to *version* ends at: the same id, recorded at the same time.
    # - The version alone proves only that the stream is that long, which a stream restored
    #   from an older backup and grown back by other writers is too.
    # - The id alone proves only that an event with that id is there. Ids are random, or
    #   given by the writer (an idempotency key), and a writer that retries a request whose
    #   event a restore lost records that id again, at the same version if others grew the
    #   stream back meanwhile, on top of another history.
    # - That event is recorded later: recorded_at is its transaction's start on the
    #   server's clock (on the memory store, a clock that only moves forward), which a
    #   restore does not turn back. A restore does rewind transaction ids and positions (a
    #   quiet server draws the lost ones again), so (tx, position) would not tell them apart.
    # A restore takes a suffix off each stream: while the recorded event at *version* is
    # still there, so is every event before it.
    if event_id is None or recorded_at is None or not events:
        return False
    first = events[0]
    return (
        first.stream_version == version
        and first.event_id == event_id
        and first.recorded_at == recorded_at
    )


def _warn_rewritten(
    stream_id: str,
    kind: StateType,
    source: str,
    version: int,
    event_id: uuid.UUID | None,
    recorded_at: dt.datetime | None,
    events: Sequence[RecordedEvent],
) -> None:
    # Once per load that finds a rewritten stream, whether its cached state, its snapshot
    # or both were folded from the lost history.
    found = (
        f"holds event {events[0].event_id} recorded at {events[0].recorded_at.isoformat()} there"
        if events and events[0].stream_version == version
        else "is shorter"
    )
    logger.warning(
        "stream %r no longer holds the history its %s %r state was folded from (up to "
        "version %d, event %s recorded at %s; the stream now %s): it was rewritten, most "
        "likely restored from an older backup. The state is dropped and folded again from "
        "the stream's events; if no restore happened, find what rewrote the stream (events "
        "are immutable)",
        stream_id,
        source,
        kind.name,
        version,
        event_id,
        None if recorded_at is None else recorded_at.isoformat(),
        found,
    )


# The (state, fingerprint) pairs warned about by _warn_other_fields: once per process each.
_FIELDS_WARNED: set[tuple[StateType, str]] = set()


def _other_fields(registry: EventRegistry, kind: StateType, snapshot: Snapshot) -> bool:
    # Whether *snapshot*, of today's state version, was taken with other fields than the
    # state class has today: it would decode, wrongly. Every field has a default, so data
    # without a new field still fits the class, with the field at its default (limit=0
    # where the events say 500), and cattrs turns 500 into "500" for a field that became a
    # str; only the version tells old data from new, and the fingerprint (names and types)
    # catches a version that was not raised. A snapshot without one (taken before snapshots
    # recorded it, or written by hand) cannot show its fields either. Another version is
    # for decode_state (upcast, or ignored).
    if snapshot.state_version != kind.version:
        return False
    return snapshot.data.get(STATE_FIELDS_KEY) != registry.state_fields(kind)


def _warn_other_fields(stream_id: str, kind: StateType, snapshot: Snapshot) -> None:
    found = snapshot.data.get(STATE_FIELDS_KEY)
    if not isinstance(found, str):
        logger.debug(
            "the snapshot of stream %r under state %r records no fields (taken before "
            "snapshots recorded them, or written by hand): not used",
            stream_id,
            kind.name,
        )
        return
    if (kind, found) in _FIELDS_WARNED:
        logger.debug(
            "the snapshot of stream %r under state %r version %d was taken with other fields: "
            "not used",
            stream_id,
            kind.name,
            kind.version,
        )
        return
    _FIELDS_WARNED.add((kind, found))
    fields = {field.name for field in attrs.fields(kind.cls)}
    kept = set(snapshot.data) - {STATE_FIELDS_KEY}
    differences = []
    if fields - kept:
        names = ", ".join(repr(name) for name in sorted(fields - kept))
        differences.append(f"it has no {names}, which would have kept the default")
    if kept - fields:
        names = ", ".join(repr(name) for name in sorted(kept - fields))
        differences.append(f"it has {names}, which the class no longer has")
    if not differences:
        differences.append("a field's type differs, or a nested class's fields do")
    logger.warning(
        "the snapshot of stream %r under state %r was taken at the same version (%d) with "
        "other fields than %s has now (%s): the fields changed and the version was not "
        "raised. Such snapshots are not used: each stream is folded from its events, and "
        "its next snapshot replaces the old one. Raise the version, "
        "@registry.state(%r, version=%d), whenever the fields change, or what evolve folds "
        "into them, which no check can see (a state_upcaster can then turn old snapshots "
        "into new ones). Logged once per process for these fields",
        stream_id,
        kind.name,
        kind.version,
        kind.cls.__qualname__,
        "; ".join(differences),
        kind.name,
        kind.version + 1,
    )


async def _from_cache(
    store: EventStore, stream_id: str, start: CachedState
) -> tuple[list[RecordedEvent], bool]:
    # The events after the cached state, read from its own last event; and whether that
    # recorded event proves the stream still holds the history the state was folded from
    # (see _proves). It may not
    # (the stream was restored from an older backup, say, but not the cache): a decision
    # that writes nothing would never meet an expected version, and once other writers have
    # grown the stream back to the cached version one that writes would not either, so it
    # must be caught here.
    if start.version == _NOTHING_FOLDED:
        return await store.read_stream(stream_id), True
    events = await store.read_stream(stream_id, after_version=start.version - 1)
    if _proves(start.version, start.event_id, start.event_recorded_at, events):
        return events[1:], True
    return events, False


async def _from_snapshot(
    store: EventStore,
    registry: EventRegistry,
    kind: StateType,
    stream_id: str,
    *,
    warned: bool,
) -> tuple[CachedState, list[RecordedEvent], bool]:
    # The snapshot and the events from it on, in one round trip; whether it was used. A
    # snapshot its stream no longer proves (as in _from_cache) is deleted, with a warning
    # unless this load gave one already (*warned*); the fold from the first event writes
    # the next one.
    snapshots = _snapshot_store(store, kind)
    snapshot, events = await snapshots.read_stream_from_snapshot(stream_id, kind.name)
    if snapshot is None:
        return _initial(kind), events, False
    version, event_id = snapshot.stream_version, snapshot.event_id
    recorded_at = snapshot.event_recorded_at
    if event_id is None or recorded_at is None:
        # Taken before snapshots named their last event: never trusted, as if absent (the
        # stores read it as none; the next snapshot replaces it).
        pass
    elif _proves(version, event_id, recorded_at, events):
        if _other_fields(registry, kind, snapshot):
            # Deleted, or a refold to the same stream version could not replace it (a
            # snapshot never moves backwards at one state version).
            _warn_other_fields(stream_id, kind, snapshot)
            await snapshots.delete_snapshots(stream_id)
            return _initial(kind), await store.read_stream(stream_id), False
        state = registry.decode_state(kind, snapshot.data, snapshot.state_version)
        if state is not None:
            start = CachedState(
                state, version, version, event_id=event_id, event_recorded_at=recorded_at
            )
            return start, events[1:], True
        # An older shape nothing upcasts: fold from the first event (and the next snapshot
        # replaces it).
    else:
        if not warned:
            _warn_rewritten(stream_id, kind, "snapshot", version, event_id, recorded_at, events)
        await snapshots.delete_snapshots(stream_id)
    return _initial(kind), await store.read_stream(stream_id), False


async def _start(
    store: EventStore,
    registry: EventRegistry,
    kind: StateType,
    stream_id: str,
    cache: StateCache | None,
    fresh: bool,
) -> tuple[CachedState, list[RecordedEvent]]:
    # Where folding starts (the cached state, else the snapshot, else nothing) and the
    # events that follow it.
    warned = False
    if cache is not None and not fresh:
        cached = cache.get(store, kind.name, stream_id)
        if cached is not None and type(cached.state) is not kind.cls:
            # Another class's state under this name (a second registry, a reloaded module):
            # not this class's, whatever its fields. Dropped; the stream is loaded anew.
            cache.discard(store, kind.name, stream_id)
            cached = None
        if cached is not None:
            events, proven = await _from_cache(store, stream_id, cached)
            if proven:
                cache.count(hits=1)
                return cached, events
            # Rewritten under the cache: drop the state and start over from the snapshot
            # (proven the same way; a stale one is deleted) or from the first event.
            _warn_rewritten(
                stream_id,
                kind,
                "cached",
                cached.version,
                cached.event_id,
                cached.event_recorded_at,
                events,
            )
            warned = True
            cache.discard(store, kind.name, stream_id)
    if cache is not None:
        cache.count(misses=1)
    if kind.snapshot_every is not None and not fresh:
        start, events, used = await _from_snapshot(store, registry, kind, stream_id, warned=warned)
        if used and cache is not None:
            cache.count(snapshots_read=1)
        return start, events
    return _initial(kind), await store.read_stream(stream_id)


async def load_state(
    store: EventStore,
    registry: EventRegistry,
    kind: StateType,
    stream_id: str,
    cache: StateCache | None,
    *,
    fresh: bool = False,
) -> CachedState:
    """One stream's state at its current version: cached or snapshot state plus new events.

    *fresh* folds from the first event, ignoring the cache and snapshots (after they proved
    to be ahead of the stream).
    """
    start, events = await _start(store, registry, kind, stream_id, cache, fresh)
    state = fold(registry, kind, start.state, events)
    version, event_id, recorded_at = start.version, start.event_id, start.event_recorded_at
    if events:
        last = events[-1]
        version, event_id, recorded_at = last.stream_version, last.event_id, last.recorded_at
    snapshot_version = start.snapshot_version
    if kind.snapshot_every is not None and version - snapshot_version >= kind.snapshot_every:
        await _snapshot_store(store, kind).write_snapshot(
            Snapshot(
                stream_id,
                kind.name,
                kind.version,
                version,
                registry.encode_state(kind, state),
                event_id=event_id,
                event_recorded_at=recorded_at,
            )
        )
        snapshot_version = version
        if cache is not None:
            cache.count(snapshots_written=1)
    loaded = CachedState(
        state, version, snapshot_version, event_id=event_id, event_recorded_at=recorded_at
    )
    if cache is not None:
        cache.count(events_folded=len(events))
        if fresh:
            cache.discard(store, kind.name, stream_id)
        cache.put(store, kind.name, stream_id, loaded)
    return loaded


async def load_states(
    store: EventStore,
    registry: EventRegistry,
    streams: Mapping[str, StateType],
    cache: StateCache | None,
    fresh: Collection[str],
) -> tuple[dict[str, Any], dict[str, int]]:
    """Every stream's state and version, for one attempt of a state command.

    Several streams load concurrently (each on a pooled connection): a transfer waits for one
    round trip, not two.
    """
    loaded: dict[str, CachedState] = {}

    async def load(stream_id: str, kind: StateType) -> None:
        loaded[stream_id] = await load_state(
            store, registry, kind, stream_id, cache, fresh=stream_id in fresh
        )

    if len(streams) == 1:
        [(stream_id, kind)] = streams.items()
        await load(stream_id, kind)
    else:
        try:
            async with trio.open_nursery() as nursery:
                for stream_id, kind in streams.items():
                    nursery.start_soon(load, stream_id, kind)
        except BaseExceptionGroup as group:
            # The first failure cancels the other loads: the caller sees that one error.
            raise_single(group)
    states = {stream_id: loaded[stream_id].state for stream_id in streams}
    versions = {stream_id: loaded[stream_id].version for stream_id in streams}
    return states, versions


async def take_snapshot(
    store: EventStore, registry: EventRegistry, state: type[Any], stream_id: str
) -> Snapshot | None:
    """Fold *stream_id* into *state* (from its last snapshot) and keep a snapshot of it now.

    For streams you know are long (an import, a migration), so that the next process does not
    fold them from the first event. Commands take snapshots on their own every
    ``snapshot_every`` events (`EventRegistry.state`).

    Returns:
        The snapshot written, or None for a stream with no events.

    Raises:
        InvalidArgument: *state* is not a registered state class.
        ConfigurationError: the state has no ``snapshot_every`` (its snapshots would never be
            read), or *store* keeps no snapshots.

    .. versionadded:: 0.3
    """
    kind = registry.state_type(state)
    if kind.snapshot_every is None:
        raise ConfigurationError(
            f"state {kind.name!r} is registered without snapshot_every, so commands never read "
            "its snapshots; register it with snapshot_every=N"
        )
    loaded = await load_state(store, registry, kind, stream_id, None)
    if loaded.version == 0:
        return None
    snapshot = Snapshot(
        stream_id,
        kind.name,
        kind.version,
        loaded.version,
        registry.encode_state(kind, loaded.state),
        event_id=loaded.event_id,
        event_recorded_at=loaded.event_recorded_at,
    )
    await _snapshot_store(store, kind).write_snapshot(snapshot)
    return snapshot
