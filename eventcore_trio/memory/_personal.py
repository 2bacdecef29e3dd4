"""Personal data on the memory store: sealing appends, the sealed snapshots and dead
letters, forgetting a subject, rewrapping the keys.

As PostgreSQL will, the store keeps each subject's data key only wrapped by the KEK
(`PersonalTables.keys`) and personal values only sealed (in the events' JSON, snapshots and
dead letters); this process keeps the plain keys it made or unwrapped in the `Keyring`. Every
change here is synchronous after its last await, so a forget is atomic: the key, the
snapshots and the ``SubjectForgotten`` event go together.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import attrs
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .._errors import ConfigurationError, SubjectForgottenError, SubjectNotFound
from .._events import NewEvent, RecordedEvent, StreamAppend, UndecodableEvent, prepare_appends
from .._personal._envelope import (
    open_recorded,
    open_snapshot,
    seal_event,
    seal_snapshot,
    snapshot_subjects,
    without_personal,
)
from .._personal._fields import forgotten_stream
from .._personal._forget import REDACTED_ERROR, ForgetRecord, forgotten_event, this_process
from .._personal._keys import resolve_key_encryption_key
from .._snapshots import Snapshot
from .._status import DeadLetter
from .._validation import encode_json_object
from . import _snapshots
from ._appends import apply, check_appends, stage
from ._state import MemoryState, PersonalTables, now

# -- appends -------------------------------------------------------------------------------


async def _key_for(tables: PersonalTables, event: NewEvent) -> AESGCM:
    # The subject's data key, made on its first personal event; a forgotten subject's
    # personal data is refused here, and again when the append is applied (check_appends).
    subject = event.subject
    assert subject is not None  # NewEvent refuses personal fields without one
    if subject in tables.forgets:
        raise SubjectForgottenError(subject)
    wrapped = tables.keys.get(subject)
    if wrapped is None:
        made, _ = await tables.keyring.new_key(subject)
        # Another task may have made one while this one waited: the first stored wins. (No
        # forget can have come between: a subject without a key cannot be forgotten.)
        wrapped = tables.keys.setdefault(subject, made)
        if wrapped != made:
            tables.keyring.discard(made)
    return tables.keyring.open(subject, wrapped)


async def seal_events(state: MemoryState, events: Sequence[NewEvent]) -> Sequence[NewEvent]:
    """*events* with their personal fields sealed, making subjects' keys as needed (what is
    not a list of `NewEvent` is left for `stage` to refuse).

    Raises:
        ConfigurationError: personal fields, and no KEK (the message says what to set).
        SubjectForgottenError: personal fields of a forgotten subject.
    """
    candidate: object = events
    if not isinstance(candidate, list | tuple):
        return events
    if not any(isinstance(e, NewEvent) and e.personal for e in events):
        return events
    sealed = []
    for event in events:
        if isinstance(event, NewEvent) and event.personal:
            event = seal_event(event, await _key_for(state.personal, event))
        sealed.append(event)
    return sealed


async def seal_appends(
    state: MemoryState, appends: Sequence[StreamAppend]
) -> Sequence[StreamAppend]:
    """*appends* (checked as `append_atomic` checks them) with personal fields sealed.

    Raises:
        InvalidArgument: a malformed request.
        ConfigurationError, SubjectForgottenError: as `seal_events`.
    """
    requests = prepare_appends(appends)
    if not any(event.personal for request in requests for event in request.events):
        return requests
    return [
        attrs.evolve(request, events=await seal_events(state, request.events))
        for request in requests
    ]


# -- snapshots -----------------------------------------------------------------------------


def seal_for_keeping(
    state: MemoryState, snapshot: Snapshot, text: str
) -> tuple[Snapshot, str] | None:
    """What to keep of *snapshot* (its data as JSON *text*): sealed under the keys of the
    subjects whose personal events its stream holds; as it is for a stream without any; or
    nothing (None) once one of them was forgotten, since a state folded before that forget
    may hold its personal data and a snapshot outlives the process."""
    tables = state.personal
    subjects = sorted(tables.subjects.get(snapshot.stream_id, ()))
    if not subjects:
        return snapshot, text
    keys = []
    for subject in subjects:
        key = tables.data_key(subject)
        if key is None:
            return None
        keys.append((subject, key))
    data = seal_snapshot(text, snapshot.stream_id, keys)
    return attrs.evolve(snapshot, data=data), encode_json_object("snapshot", data)


def open_kept(state: MemoryState, snapshot: Snapshot | None) -> Snapshot | None:
    """A kept snapshot as written: opened when sealed; None when a subject's key is gone."""
    if snapshot is None:
        return None
    subjects = snapshot_subjects(snapshot.data)
    if subjects is None:
        return snapshot
    tables = state.personal
    opened = open_snapshot(
        snapshot.data, snapshot.stream_id, {s: tables.data_key(s) for s in subjects}
    )
    return None if opened is None else attrs.evolve(snapshot, data=opened)


# -- dead letters --------------------------------------------------------------------------


def sealed_letter_event(
    state: MemoryState, event: RecordedEvent | UndecodableEvent
) -> RecordedEvent | UndecodableEvent:
    """What a dead letter keeps of *event*: its personal fields as stored, sealed."""
    if not isinstance(event, RecordedEvent) or not event.personal:
        return event
    index = bisect.bisect_left(state.positions, event.position)
    if index < len(state.log) and state.log[index].event_id == event.event_id:
        return state.log[index].decode(keep_sealed=True)
    # Gone from the log (a restore): keep nothing personal rather than plain values.
    return attrs.evolve(event, data=without_personal(event), forgotten=event.personal)


def open_letter(state: MemoryState, letter: DeadLetter) -> DeadLetter:
    """*letter* as listed: its event's personal fields opened (or left out, forgotten)."""
    event = letter.event
    if not isinstance(event, RecordedEvent) or not event.personal or event.subject is None:
        return letter
    if event.forgotten:
        return letter
    return attrs.evolve(letter, event=open_recorded(event, state.personal.data_key(event.subject)))


# -- forgetting ----------------------------------------------------------------------------


def forget(state: MemoryState, subject: str) -> tuple[ForgetRecord, set[str]]:
    """Forget *subject* at once: delete its key and the snapshots of its streams, append its
    ``SubjectForgotten`` event, keep the record. Returns the record and the streams that
    held its personal events (for the process's caches); a second forget returns the first
    one's record and no streams.

    Raises:
        SubjectNotFound: the store never had a key of *subject*.
    """
    tables = state.personal
    done = tables.forgets.get(subject)
    if done is not None:
        return done, set()
    wrapped = tables.keys.get(subject)
    if wrapped is None:
        raise SubjectNotFound(subject)
    forgotten_at = now()
    host, pid = this_process()
    staged = stage(
        [
            StreamAppend(
                forgotten_stream(subject), [forgotten_event(subject, forgotten_at, host, pid)]
            )
        ]
    )
    check_appends(state, [staged])
    # Nothing can fail from here on: the key, the snapshots and the event go together.
    del tables.keys[subject]
    tables.keyring.discard(wrapped)
    streams = tables.streams.pop(subject, set())
    for stream_id in streams:
        _snapshots.delete(state, stream_id)
    redact_letters(state, subject)
    result = apply(state, staged)
    assert result.position is not None  # one event was written
    record = ForgetRecord(
        subject=subject, forgotten_at=forgotten_at, host=host, pid=pid, position=result.position
    )
    tables.forgets[subject] = record
    return record, streams


def forget_records(state: MemoryState, subject: str | None) -> list[ForgetRecord]:
    """The forgets' records, oldest first (*subject*'s only, when given)."""
    records = state.personal.forgets.values()
    return sorted(
        (r for r in records if subject is None or r.subject == subject), key=lambda r: r.position
    )


async def rewrap(state: MemoryState, key_encryption_key: object) -> int:
    """Wrap every data key with *key_encryption_key* instead of the current KEK, then use it
    for new keys; return how many keys were rewrapped.

    Keys made while it runs are rewrapped too (it goes round until none is left), and the
    switch is one synchronous step: no key is left wrapped by the old KEK.

    Raises:
        ConfigurationError: *key_encryption_key* is not a KEK, or a key does not unwrap.
    """
    if key_encryption_key is None:
        raise ConfigurationError(
            "rewrap() needs the new key_encryption_key (32 bytes or a KeyWrapper)"
        )
    wrapper = resolve_key_encryption_key(key_encryption_key)
    assert wrapper is not None  # only None resolves to None
    tables = state.personal
    done: dict[str, tuple[bytes, bytes]] = {}
    while True:
        pending = [(s, w) for s, w in tables.keys.items() if done.get(s, (b"",))[0] != w]
        if not pending:
            break
        rewrapped = await tables.keyring.rewrap(pending, wrapper)
        state.check_open()
        for subject, wrapped in pending:
            done[subject] = (wrapped, rewrapped[subject])
    count = 0
    for subject, (old, new) in done.items():
        if tables.keys.get(subject) == old:
            tables.keys[subject] = new
            count += 1
    tables.keyring.use(wrapper)
    return count


def redacted_if_forgotten(state: MemoryState, letter: DeadLetter) -> DeadLetter:
    """*letter*, its error text replaced if its event's subject is forgotten by now (a
    letter staged before a forget and committed after it, which `redact_letters` missed)."""
    event = letter.event
    if (
        isinstance(event, RecordedEvent)
        and event.personal
        and event.subject in state.personal.forgets
    ):
        return attrs.evolve(letter, error_message=REDACTED_ERROR)
    return letter


def redact_letters(state: MemoryState, subject: str) -> None:
    """Replace the error text of *subject*'s personal events' dead letters: a handler's
    error may quote a value it was given, and the text is kept in plain."""
    for name, letters in state.dead_letters.items():
        state.dead_letters[name] = [
            attrs.evolve(letter, error_message=REDACTED_ERROR)
            if getattr(letter.event, "subject", None) == subject
            and getattr(letter.event, "personal", ())
            else letter
            for letter in letters
        ]
