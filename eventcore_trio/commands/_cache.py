"""`StateCache`: folded stream states kept in memory at their versions, per store, bounded."""

from __future__ import annotations

import datetime as dt
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Collection
from typing import Any, final

import attrs

from .._errors import ConfigurationError
from .._personal._forget import watch_forgets


@final
@attrs.frozen
class CachedState:
    """A stream's state folded up to *version*; *snapshot_version*: the newest snapshot's.

    *event_id* and *event_recorded_at* name the last event folded, as recorded (the
    stream's event at *version*; both None at version 0). They, not *version*, prove that
    the stream still holds the history the state was folded from: a stream restored from an
    older backup and grown back to *version* by other writers is just as long, but its event
    there is another one. The id alone is not enough: a writer that retries a lost event
    with its own id (an idempotency key) records that id again at the same version, on top
    of another history, but later (see `_states._proves`).
    """

    state: Any
    version: int
    snapshot_version: int
    event_id: uuid.UUID | None = attrs.field(kw_only=True)
    event_recorded_at: dt.datetime | None = attrs.field(kw_only=True)


@final
@attrs.frozen
class CacheStats:
    """What a `StateCache` has done since it was made or last cleared.

    Attributes:
        hits: stream loads that started from a cached state.
        misses: stream loads that did not (they started from a snapshot or from nothing).
        events_folded: events read and folded into states, cache hits and misses alike.
        snapshots_read: misses that started from a snapshot.
        snapshots_written: snapshots taken by commands.

    .. versionadded:: 0.3
    """

    hits: int = 0
    misses: int = 0
    events_folded: int = 0
    snapshots_read: int = 0
    snapshots_written: int = 0


@final
class StateCache:
    """Keeps the states `execute` folds, so a command reads only a stream's new events.

    One cache serves any number of Trio tasks and stores: entries are kept per store (a
    state folded from one store is never used with another) and per state name and stream,
    each at the version it was folded to; the least recently used go first once a store has
    *max_entries*. A stale entry never decides: every command still reads the events after
    the cached version, from the event the state ends at, whose identity (its id and when it
    was recorded) proves that the stream still holds the history the state was folded from
    (after a restore it may not: the state is then dropped, with a warning, and folded again
    from the stream's events), and its append checks the expected versions, so a state that
    another process made stale costs a retry, never a wrong decision.

    A forget (`PersonalDataStore.forget`) in this process drops the states of the streams
    holding the subject's personal events, and they are not kept again: a load that was
    under way during the forget may have folded the personal data.

    Args:
        max_entries: the most states kept per store (default 10,000).

    .. versionadded:: 0.3
    .. versionchanged:: 0.4
       Forgets drop states.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        if type(max_entries) is not int or max_entries < 1:
            raise ConfigurationError(
                f"StateCache(max_entries=...) must be an int >= 1, got {max_entries!r}"
            )
        self._max_entries = max_entries
        self._stores: weakref.WeakKeyDictionary[object, OrderedDict[tuple[str, str], CachedState]]
        self._stores = weakref.WeakKeyDictionary()
        # Per store, the streams of forgotten subjects' personal events: never kept again.
        self._forgotten: weakref.WeakKeyDictionary[object, set[str]] = weakref.WeakKeyDictionary()
        self._stats = CacheStats()
        watch_forgets(self)

    @property
    def max_entries(self) -> int:
        """The most states kept per store."""
        return self._max_entries

    @property
    def stats(self) -> CacheStats:
        """Counts of hits, misses, events folded and snapshots since the last `clear`."""
        return self._stats

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._stores.values())

    def clear(self) -> None:
        """Forget every state and reset the counts."""
        self._stores.clear()
        self._stats = CacheStats()

    def get(self, store: object, state: str, stream_id: str) -> CachedState | None:
        """The cached state of *stream_id* under *state*, marking it recently used."""
        entries = self._stores.get(store)
        if entries is None:
            return None
        found = entries.get((state, stream_id))
        if found is not None:
            entries.move_to_end((state, stream_id))
        return found

    def put(self, store: object, state: str, stream_id: str, entry: CachedState) -> None:
        """Keep *entry* unless a state folded further is kept already (another task's), or
        its stream held a forgotten subject's personal events."""
        if stream_id in self._forgotten.get(store, ()):
            return
        entries = self._stores.get(store)
        if entries is None:
            entries = self._stores[store] = OrderedDict()
        key = (state, stream_id)
        kept = entries.get(key)
        if kept is None or kept.version <= entry.version:
            entries[key] = entry
            entries.move_to_end(key)
        while len(entries) > self._max_entries:
            entries.popitem(last=False)

    def discard(self, store: object, state: str, stream_id: str) -> None:
        """Forget one stream's state (after it proved wrong: a restore rewrote the stream)."""
        entries = self._stores.get(store)
        if entries is not None:
            entries.pop((state, stream_id), None)

    def forgotten(self, store: object, stream_ids: Collection[str]) -> None:
        """Drop the states of *stream_ids* of *store*, whose subject was forgotten, and keep
        none of them again (internal: the store calls it)."""
        self._forgotten.setdefault(store, set()).update(stream_ids)
        entries = self._stores.get(store)
        if entries is not None:
            for key in [key for key in entries if key[1] in stream_ids]:
                del entries[key]

    def count(self, **increments: int) -> None:
        """Add to the stats (internal)."""
        current = self._stats
        self._stats = attrs.evolve(
            current, **{name: getattr(current, name) + n for name, n in increments.items()}
        )
