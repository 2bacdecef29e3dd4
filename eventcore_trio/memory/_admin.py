"""`MemoryAdmin`: the one door for tests and tooling that need what the public API does not
offer, through ``store.admin``, as `PostgresStore.admin` is on PostgreSQL.

A dying leader's session, an event a foreign writer stored, a point-in-time restore, a look
at the registered hosts or the waiting standbys: the contract suite and the tests need them;
they get them here instead of reaching into the store's private attributes. Nothing here
keeps the store's guarantees.
"""

from __future__ import annotations

from typing import final

import attrs

from .._positions import Position
from ._appends import append_undecodable
from ._leadership import revoke
from ._state import MemoryState, StoredEvent


@final
@attrs.frozen
class MemoryBackup:
    """The events of a `MemoryStore` at one moment, from `MemoryAdmin.backup`."""

    log: list[StoredEvent]
    streams: dict[str, list[StoredEvent]]
    commit: int


@final
class MemoryAdmin:
    """Tests' and tools' door into one `MemoryStore` (``store.admin``)."""

    def __init__(self, state: MemoryState) -> None:
        self._state = state

    @property
    def state(self) -> MemoryState:
        """The store's data, to look at (hosts, leaders, standbys) or to plant a value in
        behind the store's checks, as an operator's UPDATE could on PostgreSQL."""
        return self._state

    def revoke_leadership(self, name: str) -> None:
        """End the leadership of *name*, if led, as if its session had died (as
        ``pg_terminate_backend`` on its lock session would)."""
        revoke(self._state, name)

    def drop_cached_keys(self) -> None:
        """Drop this process's unwrapped data keys, as a new process would start: the next
        reads unwrap them again with the key-encryption key."""
        self._state.personal.keyring.clear()

    def store_undecodable(self, stream_id: str) -> Position:
        """Store an event whose data is not a JSON object, as a foreign writer could."""
        return append_undecodable(self._state, stream_id)

    def backup(self) -> MemoryBackup:
        """The events as they are now, for `restore`."""
        state = self._state
        return MemoryBackup(
            log=list(state.log),
            streams={stream_id: list(events) for stream_id, events in state.streams.items()},
            commit=state.commit,
        )

    def restore(self, backup: MemoryBackup) -> None:
        """A point-in-time restore of the events (not of snapshots, checkpoints or anything
        else): every event appended since *backup* is gone, and positions are drawn from
        where they were then, as a restored sequence would. The clock of ``recorded_at`` is
        not turned back, as a server's is not."""
        state = self._state
        state.log = list(backup.log)
        state.positions = [stored.position for stored in state.log]
        state.streams = {stream_id: list(events) for stream_id, events in backup.streams.items()}
        state.event_ids = {stored.event_id for stored in state.log}
        state.commit = backup.commit
