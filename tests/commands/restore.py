"""A point-in-time restore of a store's events, as an operator would run one, for tests.

`backup(store)` keeps the events as they are now; `restore(store, saved)` brings them back,
so that every event appended in between is gone and the streams are as long as they were.
Only the events are restored, not snapshots or checkpoints (an operator who restores the
events table from a dump, or a process whose memory outlives the restore). On PostgreSQL the
events table is immutable (its triggers refuse UPDATE, DELETE and TRUNCATE), so the restore
disables them for its own transaction, as an operator's restore into the table would, and
puts the position sequence back where it was.
"""

from __future__ import annotations

import uuid

import attrs

from eventcore_trio import Store
from eventcore_trio.memory import MemoryStore
from eventcore_trio.memory._admin import MemoryBackup
from eventcore_trio.postgres import PostgresStore


@attrs.frozen
class PostgresBackup:
    """Copies of the events and streams tables, in the store's schema."""

    events: str
    streams: str


async def backup(store: Store) -> MemoryBackup | PostgresBackup:
    """Keep the store's events as they are now, for `restore`."""
    if isinstance(store, MemoryStore):
        return store.admin.backup()
    assert isinstance(store, PostgresStore)
    schema = store.schema
    name = f"backup_{uuid.uuid4().hex[:12]}"
    saved = PostgresBackup(f'"{schema}".{name}_events', f'"{schema}".{name}_streams')
    await store.admin.execute(
        f'CREATE TABLE {saved.events} AS SELECT * FROM "{schema}".events; '
        f'CREATE TABLE {saved.streams} AS SELECT * FROM "{schema}".streams'
    )
    return saved


async def restore(store: Store, saved: MemoryBackup | PostgresBackup) -> None:
    """Bring back the events `backup` kept: everything appended since is gone."""
    if isinstance(store, MemoryStore):
        assert isinstance(saved, MemoryBackup)
        store.admin.restore(saved)
        return
    assert isinstance(store, PostgresStore)
    assert isinstance(saved, PostgresBackup)
    events = f'"{store.schema}".events'
    # One transaction (a multi-statement string runs in one); the triggers are back on at
    # its end, and no append can interleave with it (DELETE takes row locks, ALTER TABLE an
    # exclusive table lock).
    await store.admin.execute(
        f"ALTER TABLE {events} DISABLE TRIGGER USER; "
        f"DELETE FROM {events}; "
        f"ALTER TABLE {events} ENABLE TRIGGER USER; "
        f"INSERT INTO {events} OVERRIDING SYSTEM VALUE SELECT * FROM {saved.events}; "
        f'DELETE FROM "{store.schema}".streams; '
        f'INSERT INTO "{store.schema}".streams SELECT * FROM {saved.streams}; '
        # The sequence as it was too: new events may get the positions of lost ones.
        f"SELECT setval(pg_get_serial_sequence('{events}', 'position'), "
        f"coalesce((SELECT max(position) FROM {saved.events}), 1), "
        f"(SELECT count(*) > 0 FROM {saved.events})); "
        f"DROP TABLE {saved.events}, {saved.streams}"
    )
