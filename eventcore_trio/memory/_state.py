"""`MemoryState`: the in-process data every part of a `MemoryStore` shares, as plain attributes.

What PostgreSQL keeps in tables the memory store keeps here: events and streams, snapshots,
checkpoints, projection records and dead letters, partition counts, leaders and their
standbys, registered hosts. The modules beside this one read and change it; nothing else
does, except the tests and tools that go through `MemoryAdmin`. Every change is synchronous:
between two Trio checkpoints one task sees and changes it alone, which is what makes the
memory store's appends and batches atomic.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter
from typing import TYPE_CHECKING, final

import attrs
import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .._backend._decoding import decode_stored
from .._errors import CheckpointAhead, StoreClosed
from .._events import RecordedEvent, UndecodableEvent
from .._filters import EventFilter
from .._partitions import Unit, units_of
from .._personal._forget import ForgetRecord
from .._personal._keys import Keyring
from .._positions import Position, position_parts
from .._snapshots import Snapshot
from .._status import DeadLetter, HostState, LeaderInfo, ProjectionState
from .._versions import VersionSwitch

if TYPE_CHECKING:
    from ._leadership import MemoryLeadership


def now() -> dt.datetime:
    """The current time, timezone-aware (UTC)."""
    return dt.datetime.now(dt.UTC)


@final
@attrs.frozen
class StoredEvent:
    """One stored event, as a row of PostgreSQL's ``events`` table would hold it.

    Data and metadata are kept as the JSON text that was validated at append, so readers get
    fresh dicts with exactly the types PostgreSQL would return, and nothing a caller mutates
    later can change what is stored.
    """

    event_id: uuid.UUID
    stream_id: str
    stream_version: int
    position: Position
    type: str
    data_json: str
    metadata_json: str
    recorded_at: dt.datetime
    tags: tuple[str, ...] = ()
    # The subject, and the personal fields whose values data_json holds sealed.
    subject: str | None = None
    personal: tuple[str, ...] = ()
    # Where the subject's key is looked up, as a row joined with the keys table would be;
    # set exactly when *personal* is not empty.
    keys: PersonalTables | None = attrs.field(default=None, eq=False, repr=False)

    def decode(self, *, keep_sealed: bool = False) -> RecordedEvent | UndecodableEvent:
        """This event as a `RecordedEvent`, or an `UndecodableEvent` saying why not: its
        personal fields opened (without them once its subject is forgotten), or, with
        *keep_sealed*, still sealed.

        Raises:
            ConfigurationError: the subject's key does not unwrap (the wrong KEK).
        """
        data_key = None
        if self.keys is not None and self.subject is not None and not keep_sealed:
            data_key = self.keys.data_key(self.subject)
        return decode_stored(
            self.position,
            self.stream_id,
            self.stream_version,
            self.event_id,
            self.type,
            self.data_json,
            self.metadata_json,
            self.recorded_at,
            tags=self.tags,
            subject=self.subject,
            personal=self.personal,
            data_key=data_key,
            keep_sealed=keep_sealed,
        )


@final
class PersonalTables:
    """Personal data, where PostgreSQL will have a keys table: each subject's data key,
    wrapped; the forgets; which streams hold whose personal events. And this process's
    `Keyring` (the KEK, and the keys it unwrapped)."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring
        # Subject -> its data key, wrapped by the KEK; deleted by a forget, never replaced.
        self.keys: dict[str, bytes] = {}
        # Subject -> the record of its forget; a subject here has no key and never again
        # gets one.
        self.forgets: dict[str, ForgetRecord] = {}
        # Subject -> the streams holding its personal events, and stream -> the subjects
        # whose personal events it holds (kept after a forget: see _personal.seal_snapshot).
        self.streams: dict[str, set[str]] = {}
        self.subjects: dict[str, set[str]] = {}

    def data_key(self, subject: str) -> AESGCM | None:
        """*subject*'s data key, or None when it has none (forgotten).

        Raises:
            ConfigurationError: the key does not unwrap (the wrong KEK).
        """
        wrapped = self.keys.get(subject)
        return None if wrapped is None else self.keyring.open(subject, wrapped)

    def note(self, subject: str, stream_id: str) -> None:
        """Record that *stream_id* holds personal events of *subject*."""
        self.streams.setdefault(subject, set()).add(stream_id)
        self.subjects.setdefault(stream_id, set()).add(subject)


@final
@attrs.define
class ProjectionRecord:
    """What `MemoryStore.projection_status` reports for one unit; updated by its leaders."""

    state: ProjectionState = ProjectionState.STOPPED
    filter: EventFilter | None = None
    last_error: str | None = None
    leader: LeaderInfo | None = None
    updated_at: dt.datetime | None = None


@final
class MemoryState:
    """The data of one `MemoryStore`; see the module docstring."""

    def __init__(self, keyring: Keyring | None = None) -> None:
        # Personal data's keys and records (see PersonalTables).
        self.personal = PersonalTables(keyring or Keyring(None, max_cached=None))
        # Every event in position order; positions strictly increase along the list.
        self.log: list[StoredEvent] = []
        self.positions: list[Position] = []
        # stream id -> that stream's events; len() is the stream's version.
        self.streams: dict[str, list[StoredEvent]] = {}
        self.event_ids: set[uuid.UUID] = set()
        self.snapshots: dict[tuple[str, str], Snapshot] = {}
        self.checkpoints: dict[str, Position] = {}
        self.leaders: dict[str, MemoryLeadership] = {}
        # How many standbys wait for each unit.
        self.waiting: Counter[str] = Counter()
        # Resets waiting for a leader to stop: not standbys, so not counted as such.
        self.reset_waiting: Counter[str] = Counter()
        self.projections: dict[str, ProjectionRecord] = {}
        # Projection name -> its partition count, as recorded by set_partitions.
        self.partitions: dict[str, int] = {}
        # Registered hosts and what they published; the event is replaced on every change.
        self.hosts: dict[str, HostState] = {}
        # When each registered host joined (what `live_hosts` says and orders by).
        self.hosts_joined: dict[str, dt.datetime] = {}
        self.hosts_event = trio.Event()
        # How many registrations, departures and publications there were.
        self.hosts_changes = 0
        self.dead_letters: dict[str, list[DeadLetter]] = {}
        # Projection name -> its serving version, the versions withdrawn by a switch back,
        # and every switch in order (see _versions).
        self.serving: dict[str, int] = {}
        self.withdrawn: dict[str, set[int]] = {}
        self.switches: list[VersionSwitch] = []
        # Set (and replaced) on every switch, for runners waiting to hear of one.
        self.versions_event = trio.Event()
        # Set (and replaced) on every append, for wait_for_events.
        self.appended = trio.Event()
        # Ordinal of the last append ("transaction"); the commit part of every position.
        self.commit = 0
        # The recorded_at of the last append: each append's is later (see recording_time).
        # A restore keeps it, as a server's clock is not turned back by one.
        self.last_recorded_at = dt.datetime.min.replace(tzinfo=dt.UTC)
        self.closed = False

    def check_open(self) -> None:
        """Raise `StoreClosed` once the store was closed."""
        if self.closed:
            raise StoreClosed(
                "this MemoryStore was closed; open a new one with open_memory_store()"
            )

    # -- events ---------------------------------------------------------------------------

    def add_event(self, stored: StoredEvent) -> None:
        """Keep *stored* at the end of the log and of its stream."""
        self.streams.setdefault(stored.stream_id, []).append(stored)
        self.log.append(stored)
        self.positions.append(stored.position)
        self.event_ids.add(stored.event_id)

    def next_position(self) -> Position:
        """The position of the next event of the current commit."""
        return Position(self.commit, len(self.log) + 1)

    def recording_time(self) -> dt.datetime:
        """The recorded_at of one append's events.

        Now, but strictly after every earlier append's, even within one tick of a coarse
        clock, and after a restore. With the event id it names a recorded event, which state
        commands rely on (a writer's retry of an event a restore lost records the same id
        again, but later: see commands/_states.py, _proves).
        """
        current = max(now(), self.last_recorded_at + dt.timedelta(microseconds=1))
        self.last_recorded_at = current
        return current

    def wake_readers(self) -> None:
        """Wake every `wait_for_events` after an append."""
        self.appended.set()
        self.appended = trio.Event()

    def ahead(self, position: Position) -> bool:
        """Whether *position* is beyond every position this store has drawn.

        That is a greater commit ordinal than the last append's, or a greater sequence than
        the number of events (positions are drawn as (commit, len(log) + 1)). After a
        restore positions are drawn from where they were then, so a checkpoint at an event
        it removed is ahead, as on PostgreSQL once its sequence is put back.
        """
        commit, sequence = position_parts(position)
        return commit > self.commit or sequence > len(self.log)

    def check_not_ahead(self, name: str, position: Position) -> None:
        """Raise `CheckpointAhead` when *position* is beyond the store (see `ahead`)."""
        if self.ahead(position):
            raise CheckpointAhead(name, position, stored=False)

    # -- projections and hosts -----------------------------------------------------------

    def projection(self, name: str) -> ProjectionRecord:
        """The record of unit *name*, made on first use."""
        return self.projections.setdefault(name, ProjectionRecord())

    def partition_count(self, name: str) -> int | None:
        """How many units projection *name* runs as, or None when it never ran here."""
        if name in self.partitions:
            return self.partitions[name]
        return 1 if name in self.checkpoints or name in self.projections else None

    def unit_names(self, name: str) -> list[str]:
        """*name*'s units at its recorded count (*name* itself when it names a partition)."""
        if Unit.parse(name).partition is not None:
            return [name]
        return [unit.name for unit in units_of(name, self.partition_count(name) or 1)]

    def versions_changed(self) -> None:
        """Wake everyone waiting for a switch of a serving version."""
        self.versions_event.set()
        self.versions_event = trio.Event()

    def hosts_changed(self) -> None:
        """Wake everyone waiting for a registration, departure or publication."""
        self.hosts_changes += 1
        self.hosts_event.set()
        self.hosts_event = trio.Event()
