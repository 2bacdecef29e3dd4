"""Attacks on personal data sealed in one envelope per event and opened when `data` is first
read (issue 29; decision record 15, items 2 and 5), on the memory store and below it: an
unopened `RecordedEvent` under attrs tools, the type checker and threads; tampering with the
stored envelope, markers and columns; the read paths; forget races. A test here that fails
is a hole found, named in its docstring. The PostgreSQL attacks are in
tests/postgres/test_personal_attack.py."""

from __future__ import annotations

import base64
import copy
import json
import os
import pickle
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import pytest
import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from eventcore_trio import (
    EventDecodeError,
    NewEvent,
    ProjectionFailed,
    RecordedEvent,
    SubjectForgottenError,
    UndecodableEvent,
    execute,
    open_memory_store,
)
from eventcore_trio._events import _key_slot, _sealed_slot, install_sealed_opener, unopened
from eventcore_trio._personal._envelope import (
    ENVELOPE_PREFIX,
    NONCE_BYTES,
    SEALED_WITH_FIRST,
    _fields_context,
    open_event,
)
from eventcore_trio.memory import MemoryStore
from eventcore_trio.memory._personal import sealed_letter_event
from eventcore_trio.memory._state import MemoryState, StoredEvent
from eventcore_trio.projection import (
    Failure,
    FailureStrategy,
    ProjectionContext,
    projector,
    replay_dead_letters,
    run_projection,
)
from eventcore_trio.testing._contract._customers import (
    ADA_EMAIL,
    ADA_NAME,
    CustomerRegistered,
    registered,
    registry,
)

SUBJECT = "customer-1"
PLAIN = {"customer": SUBJECT, "email": ADA_EMAIL, "name": ADA_NAME, "plan": "basic"}


def _store() -> Any:
    return open_memory_store(key_encryption_key=os.urandom(32))


def _stored(store: MemoryStore, stream_id: str, version: int = 1) -> StoredEvent:
    return store.admin.state.streams[stream_id][version - 1]


def _replace(store: MemoryStore, stored: StoredEvent, **changes: Any) -> None:
    """Change a stored event (found by its id) behind the store's checks, as an operator's
    UPDATE would."""
    state = store.admin.state
    new = attrs.evolve(stored, **changes)
    for rows in (state.log, state.streams[stored.stream_id]):
        [index] = [i for i, row in enumerate(rows) if row.event_id == stored.event_id]
        rows[index] = new


def _stored_data(stored: StoredEvent) -> dict[str, Any]:
    data = json.loads(stored.data_json)
    assert isinstance(data, dict)
    return data


def _with_data(store: MemoryStore, stored: StoredEvent, data: Mapping[str, Any]) -> None:
    _replace(store, stored, data_json=json.dumps(data))


async def _one(store: MemoryStore, stream_id: str = SUBJECT) -> RecordedEvent:
    [event] = await store.read_stream(stream_id)
    return event


def _data_key(store: MemoryStore, subject: str = SUBJECT) -> AESGCM:
    key = store.admin.state.personal.data_key(subject)
    assert key is not None
    return key


def _envelope_of(key: AESGCM, plain: bytes, stored: StoredEvent, personal: tuple[str, ...]) -> str:
    """An envelope of any *plain* bytes for the event *stored*: what only a holder of the
    key can make."""
    nonce = os.urandom(NONCE_BYTES)
    assert stored.subject is not None
    context = _fields_context(stored.event_id, stored.subject, personal)
    sealed = key.encrypt(nonce, plain, context)
    return ENVELOPE_PREFIX + base64.b64encode(nonce + sealed).decode("ascii")


def _plain_or_refused(read: Callable[[], RecordedEvent | UndecodableEvent]) -> object:
    """What reading the data of the event *read* returns gives: its data, or the type of
    the refusal (an `UndecodableEvent`, or `EventDecodeError` raised when data is read)."""
    event = read()
    if isinstance(event, UndecodableEvent):
        return UndecodableEvent
    try:
        return event.data
    except EventDecodeError:
        return EventDecodeError


# -- an unopened RecordedEvent as an attrs value -----------------------------------------------


class TestUnopenedEvent:
    """attrs tools, the type checker and threads meet an event whose data is not opened."""

    async def test_every_copy_and_comparison_sees_the_plain_data(self) -> None:
        """copy, deepcopy, astuple, asdict, ``match``, getattr/hasattr and hash each see
        the data opened, never the sealed form; vars() stays refused (slots), as for any
        event."""
        async with _store() as store:
            await store.append(SUBJECT, [registered(SUBJECT)] * 9)
            events = await store.read_stream(SUBJECT)
            assert all(unopened(e) is not None for e in events)
            assert copy.copy(events[0]).data == PLAIN
            assert copy.deepcopy(events[1]).data == PLAIN
            assert PLAIN in attrs.astuple(events[2])
            assert attrs.asdict(events[3], recurse=False)["data"] == PLAIN
            match events[4]:
                case RecordedEvent(data={"email": email}):
                    assert email == ADA_EMAIL
                case _:
                    pytest.fail("the data did not match")
            assert getattr(events[5], "data", None) == PLAIN
            assert hasattr(events[6], "data")
            with pytest.raises(TypeError, match="unhashable"):
                hash(events[7])
            with pytest.raises(TypeError):
                vars(events[8])
            assert not [e for e in events if e.data != PLAIN]

    async def test_an_unknown_attribute_is_refused_at_run_time_and_by_mypy(self) -> None:
        """``event.dat`` raises `AttributeError`, and mypy --strict rejects it: the ignore
        below is an error (unused) the day mypy accepts any name through ``__getattr__``."""
        async with _store() as store:
            await store.append(SUBJECT, [registered(SUBJECT)])
            event = await _one(store)
            with pytest.raises(AttributeError, match="no attribute 'dat'"):
                event.dat  # type: ignore[attr-defined]  # noqa: B018
            assert unopened(event) is not None  # a wrong name opened nothing

    async def test_repr_of_an_event_whose_envelope_does_not_open(self) -> None:
        """HOLE: repr() of an event whose envelope does not open raises `EventDecodeError`
        (and so do ==, copy and pickle). repr must not raise: `Failure` and
        `ProjectionFailed` hold the event, and a debugger, a test report or a
        ``logger.warning("%r", failure)`` in an ``on_error`` show it."""
        async with _store() as store:
            await store.append(SUBJECT, [registered(SUBJECT)])
            stored = _stored(store, SUBJECT)
            data = _stored_data(stored)
            data["email"] = _envelope_of(AESGCM(os.urandom(32)), b"{}", stored, ("email",))
            _with_data(store, stored, data)
            event = await _one(store)
            with pytest.raises(EventDecodeError):
                event.data  # noqa: B018
            assert SUBJECT in repr(event)


def _slots(event: RecordedEvent | UndecodableEvent) -> tuple[bool, bool]:
    """Whether *event* holds sealed data, and whether it holds a key."""
    if isinstance(event, UndecodableEvent):
        return False, False
    try:
        key = _key_slot.__get__(event)
    except AttributeError:  # never set
        key = None
    return unopened(event) is not None, key is not None


class TestSealAndKey:
    """The two slots of an unopened event, set and cleared together on every path."""

    async def test_every_decode_sets_both_or_neither(self) -> None:
        """A live subject's event holds both until its data is read, then neither (and
        no key: pickling it needs no opener); kept sealed (a dead letter) or forgotten,
        neither; an envelope that does not open keeps both, so every read fails alike,
        and repr still works; evolve with new data leaves the original unopened."""
        async with _store() as store:
            await store.append(SUBJECT, [registered(SUBJECT)] * 2)
            stored = _stored(store, SUBJECT)
            live = stored.decode()
            assert _slots(live) == (True, True)
            assert isinstance(live, RecordedEvent)
            assert attrs.evolve(live, data={}).data == {}
            assert _slots(live) == (True, True)
            assert live.data == PLAIN
            assert _slots(live) == (False, False)
            assert _slots(pickle.loads(pickle.dumps(live))) == (False, False)
            assert _slots(stored.decode(keep_sealed=True)) == (False, False)
            data = _stored_data(stored)
            _with_data(store, stored, {**data, "email": data["email"][:-8] + "AAAAAAA="})
            broken = _stored(store, SUBJECT).decode()
            assert isinstance(broken, RecordedEvent)
            for _ in range(2):
                with pytest.raises(EventDecodeError):
                    broken.data  # noqa: B018
                assert _slots(broken) == (True, True)
            assert "do not open" in repr(broken)
            await store.forget(SUBJECT)
            gone = _stored(store, SUBJECT, 2).decode()
            assert _slots(gone) == (False, False)
            assert isinstance(gone, RecordedEvent)
            assert gone.forgotten == ("email", "name")

    async def test_a_dead_letter_without_its_subject_is_undecodable(self) -> None:
        """HOLE: a row with personal names but no subject read for a dead letter (kept
        sealed) came back as a decoded event whose data held the envelope and the
        marker as values (and the store's listing passed it on as it was); the events
        read path calls the same row undecodable."""
        async with _store() as store:
            await store.append(SUBJECT, [registered(SUBJECT)])
            stored = attrs.evolve(_stored(store, SUBJECT), subject=None)
            for keep_sealed in (False, True):
                read = stored.decode(keep_sealed=keep_sealed)
                assert isinstance(read, UndecodableEvent)
                assert "without a subject" in read.error


class TestThreads:
    """Two threads reading one event's data for the first time (``trio.to_thread``)."""

    async def test_a_thread_that_loses_the_race_to_open_still_gets_the_data(self) -> None:
        """HOLE: a thread finds the data slot empty and enters ``__getattr__``; meanwhile
        another thread opens the data and clears the sealed slot; the first then finds
        neither and raises `AttributeError` ('no attribute data'). Replayed here in that
        order, without threads: the call the losing thread makes, after the winner."""
        async with _store() as store:
            await store.append(SUBJECT, [registered(SUBJECT)])
            event = await _one(store)
            assert event.data == PLAIN  # the winner
            # Hidden from type checkers (so that they refuse unknown names): looked up.
            losing: Callable[[object, str], object] = getattr(type(event), "__getattr__")  # noqa: B009
            assert losing(event, "data") == PLAIN

    async def test_a_thread_that_opens_second_still_gets_the_data(self) -> None:
        """HOLE: two threads both find the event unopened and both open it; the first
        writes the opened values into the shared dict, so the second finds a plain value
        where the envelope was and raises `EventDecodeError` ('does not hold the event's
        sealed values') for a sound event. Replayed here in that order."""
        async with _store() as store:
            await store.append(SUBJECT, [registered(SUBJECT)])
            event = await _one(store)
            sealed, key = unopened(event), _key_slot.__get__(event)
            assert sealed is not None
            assert event.data == PLAIN  # the first thread
            assert (
                open_event(event, sealed, key) == PLAIN
            )  # the second, which read the slots before

    async def test_a_thread_that_finds_the_seal_but_not_the_key_gets_the_data(self) -> None:
        """The sealed data and the key are two slots: a thread can read the sealed data,
        then find the key cleared by another thread that opened the event in between. It
        must return the opened data (not open with no key, not raise). Replayed here: the
        state that thread sees, the sealed slot as it read it and the key gone."""
        async with _store() as store:
            await store.append(SUBJECT, [registered(SUBJECT)])
            event = await _one(store)
            sealed = unopened(event)
            assert event.data == PLAIN  # the winner, which clears both slots
            _sealed_slot.__set__(event, sealed)  # what the loser read first
            losing: Callable[[object, str], object] = getattr(type(event), "__getattr__")  # noqa: B009
            assert losing(event, "data") == PLAIN

    async def test_threads_opening_at_once_get_the_event_s_one_dict(self) -> None:
        """HOLE: two threads that both find the event unopened both open it and each set
        the data slot with its own dict; the event kept the last one set, so the other
        thread's dict was not the event's data (a change it made to it was lost for later
        reads, and ``event.data is data`` was False), which never happens to an opened
        event. Replayed in that order: the opener, run for the first thread, lets a second
        one open the event first."""
        async with _store() as store:
            await store.append(SUBJECT, [registered(SUBJECT)])
            event = await _one(store)
            calls: list[dict[str, Any]] = []
            second: list[dict[str, Any]] = []

            def second_opens_meanwhile(
                event: RecordedEvent, sealed: dict[str, Any], key: Any
            ) -> dict[str, Any]:
                calls.append(sealed)
                if len(calls) == 1:
                    second.append(event.data)  # the second thread, while the first opens
                return open_event(event, sealed, key)

            install_sealed_opener(second_opens_meanwhile)
            try:
                first = event.data
            finally:
                install_sealed_opener(open_event)
            assert len(calls) == 2
            assert first is second[0] is event.data

    async def test_threads_reading_the_same_events(self) -> None:
        """HOLE (the two above, for real): four worker threads read the data of the same
        freshly read events at once; every read must give the plain data, the dict the
        event then holds. With a short switch interval, some reads raised
        `AttributeError` or `EventDecodeError`."""
        async with _store() as store:
            await store.append(SUBJECT, [registered(SUBJECT)] * 300)
            failures: list[str] = []

            def read_all(events: Sequence[RecordedEvent], start: threading.Barrier) -> None:
                start.wait(timeout=10)  # the four threads read together
                for event in events:
                    try:
                        data = event.data
                        if data != PLAIN:
                            failures.append("wrong data")
                        elif data is not event.data:
                            failures.append("another dict")
                    except (AttributeError, EventDecodeError) as exc:
                        failures.append(type(exc).__name__)

            interval = sys.getswitchinterval()
            sys.setswitchinterval(1e-6)
            try:
                for _ in range(20):
                    events = await store.read_stream(SUBJECT)
                    start = threading.Barrier(4)
                    async with trio.open_nursery() as nursery:
                        for _ in range(4):
                            nursery.start_soon(trio.to_thread.run_sync, read_all, events, start)
            finally:
                sys.setswitchinterval(interval)
            assert failures == []


# -- tampering -------------------------------------------------------------------------------


class TestTampering:
    """What an operator with write access to the stored events can do to one: each case
    reads as the plain, correct data, an `UndecodableEvent`, or `EventDecodeError` when the
    data is read, never as other values."""

    @pytest.fixture
    async def store(self) -> Any:
        """A store holding one personal event of `SUBJECT` (email, name) on its stream."""
        async with _store() as store:
            await store.append(SUBJECT, [registered(SUBJECT)])
            yield store

    async def _read(self, store: MemoryStore) -> object:
        [event] = await store.read_events(None, limit=10, undecodable="include")
        return _plain_or_refused(lambda: event)

    async def test_markers_replaced_or_removed_read_the_sealed_values(
        self, store: MemoryStore
    ) -> None:
        """The marker of the second field replaced by a value, or removed: the field reads
        as sealed (the envelope holds every field)."""
        stored = _stored(store, SUBJECT)
        data = _stored_data(stored)
        assert data["name"] == SEALED_WITH_FIRST
        _with_data(store, stored, {**data, "name": "Mallory"})
        assert await self._read(store) == PLAIN
        _with_data(store, stored, {k: v for k, v in data.items() if k != "name"})
        assert await self._read(store) == PLAIN

    async def test_a_personal_field_renamed_in_data_only(self, store: MemoryStore) -> None:
        """The second personal field renamed in the stored data ("name" to "nick"), its
        declaration unchanged: the personal values still come from the envelope, and
        "nick" is a plain field holding the marker (documented: plain fields are not
        authenticated; changing one is like changing any plain value). The first field
        renamed: no envelope where it belongs, undecodable."""
        stored = _stored(store, SUBJECT)
        data = _stored_data(stored)
        _with_data(store, stored, {("nick" if k == "name" else k): v for k, v in data.items()})
        assert await self._read(store) == {**PLAIN, "nick": SEALED_WITH_FIRST}
        _with_data(store, stored, {("mail" if k == "email" else k): v for k, v in data.items()})
        assert await self._read(store) is UndecodableEvent

    async def test_the_declared_names_changed(self, store: MemoryStore) -> None:
        """The stored personal names renamed, extended, shortened or out of order: the
        envelope is bound to them; never other values."""
        stored = _stored(store, SUBJECT)
        for personal in (
            ("email", "nick"),
            ("email",),
            ("email", "name", "plan"),
            ("name", "email"),
        ):
            _replace(store, stored, personal=personal)
            assert await self._read(store) in (UndecodableEvent, EventDecodeError), personal
            stored = _stored(store, SUBJECT)

    async def test_the_declaration_removed(self, store: MemoryStore) -> None:
        """The stored personal names emptied (``UPDATE events SET personal = '{}'``): the
        event reads as one without personal fields, its data holding the envelope and the
        marker as they are stored (documented limit: the declaration is trusted; no
        personal value is shown, and nothing can tell an envelope from a plain string
        that looks like one)."""
        stored = _stored(store, SUBJECT)
        data = _stored_data(stored)
        _replace(store, stored, personal=())
        read = await self._read(store)
        assert read == data
        assert isinstance(read, dict)
        assert str(read["email"]).startswith(ENVELOPE_PREFIX)

    async def test_the_subject_changed(self, store: MemoryStore) -> None:
        """The stored subject changed to another subject with a key: does not open. To a
        subject the store has no key of (unknown, or forgotten): the event reads as its
        subject's forgotten event, without the fields (documented here: no value leaks,
        and no error either)."""
        await store.append("customer-2", [registered("customer-2")])
        stored = _stored(store, SUBJECT)
        _replace(store, stored, subject="customer-2")
        [event, _] = await store.read_events(None, limit=10, undecodable="include")
        assert _plain_or_refused(lambda: event) is EventDecodeError
        _replace(store, _stored(store, SUBJECT), subject="customer-9")
        [event, _] = await store.read_events(None, limit=10, undecodable="include")
        assert isinstance(event, RecordedEvent)
        assert (event.data, event.forgotten) == (
            {"customer": SUBJECT, "plan": "basic"},
            ("email", "name"),
        )

    async def test_an_envelope_from_the_subject_s_other_event(self, store: MemoryStore) -> None:
        """An envelope copied from another event of the same subject, with the same
        personal names or others: it is bound to its event and does not open."""
        await store.append(SUBJECT, [registered(SUBJECT, "eve@example.org", "Eve")])
        await store.append(
            SUBJECT,
            [NewEvent("Noted", {"email": "x@y"}, subject=SUBJECT, personal=["email"])],
        )
        first, second, third = (_stored(store, SUBJECT, v) for v in (1, 2, 3))
        data = _stored_data(first)
        _with_data(store, first, {**data, "email": _stored_data(second)["email"]})
        event = (await store.read_stream(SUBJECT))[0]
        assert _plain_or_refused(lambda: event) is EventDecodeError
        _with_data(store, _stored(store, SUBJECT), {**data, "email": _stored_data(third)["email"]})
        event = (await store.read_stream(SUBJECT))[0]
        assert _plain_or_refused(lambda: event) is EventDecodeError

    async def test_malformed_envelopes(self, store: MemoryStore) -> None:
        """Truncated base64 (at any length), padding removed, non-ASCII, the prefix
        alone, a flipped character: `EventDecodeError` on reading data."""
        stored = _stored(store, SUBJECT)
        data = _stored_data(stored)
        envelope: str = data["email"]
        body = envelope[len(ENVELOPE_PREFIX) :]
        flipped = body[:20] + ("A" if body[20] != "A" else "B") + body[21:]
        for bad in (
            envelope[:-1],
            envelope[:-4],
            envelope[: len(ENVELOPE_PREFIX) + 40],
            envelope.rstrip("="),
            envelope + "é",
            ENVELOPE_PREFIX,
            ENVELOPE_PREFIX + flipped,
            ENVELOPE_PREFIX + " " + body,
        ):
            _with_data(store, _stored(store, SUBJECT), {**data, "email": bad})
            assert await self._read(store) is EventDecodeError, bad

    async def test_plaintexts_of_the_wrong_shape(self, store: MemoryStore) -> None:
        """Envelopes that authenticate (made with the subject's key) around plaintext that
        is not the object of the event's personal fields: not JSON, not UTF-8, not an
        object, too few or too many fields: `EventDecodeError` on reading data."""
        key = _data_key(store)
        names = ("email", "name")
        stored = _stored(store, SUBJECT)
        data = _stored_data(stored)
        for plain in (
            b"not json",
            b"\xff\xfe",
            b"[1, 2]",
            b'"ada"',
            b'{"email": "a"}',
            b'{"email": "a", "name": "b", "x": 1}',
            b" {not json either",
        ):
            envelope = _envelope_of(key, plain, stored, names)
            _with_data(store, _stored(store, SUBJECT), {**data, "email": envelope})
            assert await self._read(store) is EventDecodeError, plain

    async def test_a_plaintext_of_the_right_size_with_other_names(self, store: MemoryStore) -> None:
        """HOLE: an envelope that authenticates around an object of two fields that are not
        the event's personal fields ({"email", "plan"} for email and name) opens without
        complaint: "plan", a plain field, is overwritten with the envelope's value and
        "name" reads as the marker "$sealed:1". Only the size is checked, not the names.
        (Needs the key: a bug in a future sealing path, or another library version, would
        show this way.)"""
        key = _data_key(store)
        stored = _stored(store, SUBJECT)
        data = _stored_data(stored)
        plain = b'{"email": "eve@example.org", "plan": "gold"}'
        _with_data(
            store,
            _stored(store, SUBJECT),
            {**data, "email": _envelope_of(key, plain, stored, ("email", "name"))},
        )
        read = await self._read(store)
        assert read in (PLAIN, UndecodableEvent, EventDecodeError), read

    async def test_a_deeply_nested_value_opened_deep_in_a_call_stack(self) -> None:
        """HOLE: a personal value nested 800 levels deep holding an integer beyond 64 bits
        (accepted by append; the standard parser reads it) raises `RecursionError`, not
        `EventDecodeError`, when its data is first read deep in a call stack (a handler, a
        fold): `_parse` does not catch it, where the plain path (`_decode_object`) makes
        it an undecodable event. (The eager version had the same gap, at read.)"""
        value: list[Any] = [2**70]
        for _ in range(800):
            value = [value]
        async with _store() as store:
            event = NewEvent("Deep", {"v": value}, subject=SUBJECT, personal=["v"])
            await store.append("deep", [event])
            read = await _one(store, "deep")

            def opened_at(depth: int) -> object:
                if depth:
                    return opened_at(depth - 1)
                try:
                    return read.data == {"v": value}
                except EventDecodeError:
                    return EventDecodeError

            assert opened_at(300) in (True, EventDecodeError)


# -- where an unopened event goes: dead letters ----------------------------------------------


class TestDeadLetters:
    """Dead letters of events handed to a projection unopened."""

    async def test_an_envelope_that_does_not_open_makes_a_sealed_dead_letter(self) -> None:
        """A projection reading the data of an event whose envelope does not open: the
        handler's `EventDecodeError` goes to ``on_error``; the letter keeps the stored
        (sealed) values, lists as an `UndecodableEvent`, and the store holds no plain
        value of the other, sound events; a replay fails again without writing one."""
        async with _store() as store:
            await store.append(SUBJECT, [registered(SUBJECT)] * 2)
            stored = _stored(store, SUBJECT)
            data = _stored_data(stored)
            _with_data(store, stored, {**data, "email": data["email"][:-8] + "AAAAAAA="})
            failures: list[Failure] = []

            def skip(failure: Failure) -> FailureStrategy:
                failures.append(failure)
                return FailureStrategy.SKIP

            @projector("reads", event_types=["CustomerRegistered"], on_error=skip)
            async def reads(event: RecordedEvent, ctx: ProjectionContext) -> None:
                assert event.data["email"] == ADA_EMAIL

            result = await run_projection(store, reads)
            assert (result.events_applied, result.dead_letters) == (1, 1)
            assert [type(f.error) for f in failures] == [EventDecodeError]
            [kept] = store.admin.state.dead_letters["reads"]
            assert isinstance(kept.event, RecordedEvent)
            assert unopened(kept.event) is None
            assert kept.event.data["email"].startswith(ENVELOPE_PREFIX)
            assert ADA_EMAIL not in repr(store.admin.state.dead_letters)
            [letter] = await store.dead_letters("reads")
            assert isinstance(letter.event, UndecodableEvent)
            assert ADA_EMAIL not in letter.event.raw_data
            replay = await replay_dead_letters(store, reads)
            assert (replay.replayed, replay.failed) == (0, 1)
            assert ADA_EMAIL not in repr(store.admin.state.dead_letters)

    async def test_a_letter_for_an_event_gone_from_the_log_is_not_opened(self) -> None:
        """After a restore the event may be gone from the log: the letter keeps the event
        without its personal fields, and making it opens nothing (an envelope that does
        not open is no crash there)."""
        async with _store() as store:
            await store.append(SUBJECT, [registered(SUBJECT)])
            stored = _stored(store, SUBJECT)
            data = _stored_data(stored)
            broken = {**data, "email": data["email"][:-8] + "AAAAAAA="}
            for each in (data, broken):
                _with_data(store, _stored(store, SUBJECT), each)
                event = await _one(store)
                letter = sealed_letter_event(MemoryState(), event)
                assert isinstance(letter, RecordedEvent)
                assert (letter.data, letter.forgotten) == (
                    {"customer": SUBJECT, "plan": "basic"},
                    ("email", "name"),
                )
                assert unopened(event) is not None

    async def test_a_fatal_failure_keeps_no_value_in_the_status(self) -> None:
        """A projection stopping on an event whose envelope does not open: its
        `ProjectionFailed` and last error name the event and the fields, no value."""
        async with _store() as store:
            await store.append(SUBJECT, [registered(SUBJECT)])
            stored = _stored(store, SUBJECT)
            data = _stored_data(stored)
            _with_data(store, stored, {**data, "email": data["email"][:-8] + "AAAAAAA="})

            @projector("stops", event_types=["CustomerRegistered"])
            async def stops(event: RecordedEvent, ctx: ProjectionContext) -> None:
                assert event.data

            with pytest.raises(ProjectionFailed, match="do not open") as caught:
                await run_projection(store, stops)
            assert caught.value.position == stored.position
            [status] = await store.projection_status()
            assert status.last_error is not None
            assert "do not open" in status.last_error


# -- read paths ------------------------------------------------------------------------------


class TestReadPaths:
    """Paths the contract does not run with personal data."""

    async def test_partitions_typed_projectors_and_replays_read_plain(self) -> None:
        """A partitioned projection, a typed projector (registry=, with the upcaster of
        the older shape) and a replayed dead letter all see the plain fields; after the
        forget, all run to the end without them."""
        async with _store() as store:
            customers = [
                CustomerRegistered(f"c-{n}", "basic", ADA_EMAIL, ADA_NAME) for n in range(3)
            ]
            for customer in customers:
                await store.append(customer.customer, [registry.new_event(customer)])
            old = NewEvent(
                "CustomerRegistered",
                {"customer": "c-old", "plan": "pro", "email": ADA_EMAIL, "full_name": ADA_NAME},
                subject="c-old",
                personal=["email", "full_name"],
            )
            await store.append("c-old", [old])
            customers.append(CustomerRegistered("c-old", "pro", ADA_EMAIL, ADA_NAME))
            seen: dict[str, str | None] = {}

            @projector("split", event_types=["CustomerRegistered"], partitions=3)
            async def split(event: RecordedEvent, ctx: ProjectionContext) -> None:
                seen[event.stream_id] = event.data.get("email")

            typed: list[object] = []

            @projector("typed", event_types=["CustomerRegistered"], registry=registry)
            async def typed_handler(event: object, ctx: ProjectionContext) -> None:
                typed.append(event)

            flaky = {"fail": True}

            def skip(failure: Failure) -> FailureStrategy:
                return FailureStrategy.SKIP

            replayed: list[str | None] = []

            @projector("flaky", event_types=["CustomerRegistered"], on_error=skip)
            async def flaky_handler(event: RecordedEvent, ctx: ProjectionContext) -> None:
                if flaky["fail"]:
                    raise ValueError("not now")
                replayed.append(event.data.get("email"))

            await run_projection(store, split)
            await run_projection(store, typed_handler)
            await run_projection(store, flaky_handler)
            assert set(seen.values()) == {ADA_EMAIL}
            assert typed == customers
            flaky["fail"] = False
            assert (await replay_dead_letters(store, flaky_handler)).replayed == 4
            assert replayed == [ADA_EMAIL] * 4

            await store.forget("c-1")
            await store.forget("c-old")
            for each in (split, typed_handler):
                await store.reset_projection(each.name)
            seen.clear()
            typed.clear()
            await run_projection(store, split)
            await run_projection(store, typed_handler)
            assert (seen["c-1"], seen["c-0"]) == (None, ADA_EMAIL)
            assert typed[1] == CustomerRegistered("c-1", "basic")
            assert typed[3] == CustomerRegistered("c-old", "pro")


# -- forget races ----------------------------------------------------------------------------


class TestForgetRaces:
    """A forget between reading an event and opening it."""

    async def test_an_event_read_before_a_forget_opens_after_it(self) -> None:
        """Documented: an event read before the forget opens afterwards to the plain values
        (as a value already read); one read after the forget comes without them."""
        async with _store() as store:
            await store.append(SUBJECT, [registered(SUBJECT)])
            before = await _one(store)
            await store.forget(SUBJECT)
            after = await _one(store)
            assert before.data == PLAIN
            assert after.forgotten == ("email", "name")

    async def test_a_command_folding_after_the_forget_writes_nothing_personal(self) -> None:
        """A command whose read came before the forget and whose fold after it (a read
        that awaited in between) folds the plain values; what it decides to write with
        them as personal data is refused, and nothing plain is stored."""
        async with _store() as store:
            await store.append(SUBJECT, [registered(SUBJECT)])

            class ForgetsAfterReading:
                async def read_stream(self, stream_id: str) -> list[RecordedEvent]:
                    events: list[RecordedEvent] = await store.read_stream(stream_id)
                    await store.forget(SUBJECT)
                    return events

                async def append_atomic(self, appends: Any) -> Any:
                    return await store.append_atomic(appends)

            @attrs.frozen
            class CopyEmail:
                def streams(self) -> list[str]:
                    return [SUBJECT]

                def initial_state(self) -> str | None:
                    return None

                def evolve(self, state: str | None, event: RecordedEvent) -> str | None:
                    return event.data.get("email", state)

                def decide(self, state: str | None) -> dict[str, list[NewEvent]]:
                    email = state or "none"
                    copied = NewEvent(
                        "Copied", {"email": email}, subject=SUBJECT, personal=["email"]
                    )
                    return {"copies": [copied]}

            with pytest.raises(SubjectForgottenError):
                await execute(ForgetsAfterReading(), CopyEmail())  # type: ignore[arg-type]
            assert not any(
                ADA_EMAIL in e.data_json or ADA_NAME in e.data_json for e in store.admin.state.log
            )

    async def test_a_dead_letter_written_after_the_forget_keeps_no_value(self) -> None:
        """HOLE: a projection applying an event read before the forget reads its plain
        values after it (documented), and its handler's error quotes one; the letter is
        written after the forget replaced the texts of the subject's letters, so it keeps
        the value in plain, for good. The forget's promise ("replaces the text of the
        subject's dead letters") misses letters committed after it."""
        async with _store() as store:
            await store.append(SUBJECT, [registered(SUBJECT)])
            reading = trio.Event()
            forgot = trio.Event()

            def skip(failure: Failure) -> FailureStrategy:
                return FailureStrategy.SKIP

            @projector("quotes", event_types=["CustomerRegistered"], on_error=skip)
            async def quotes(event: RecordedEvent, ctx: ProjectionContext) -> None:
                reading.set()
                await forgot.wait()
                raise ValueError(f"no mailbox for {event.data['email']}")

            async def forget_while_it_applies() -> None:
                await reading.wait()
                await store.forget(SUBJECT)
                forgot.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(forget_while_it_applies)
                assert (await run_projection(store, quotes)).dead_letters == 1
            [letter] = await store.dead_letters("quotes")
            assert ADA_EMAIL not in letter.error_message
