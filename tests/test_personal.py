"""Personal data, below and beside the contract: the sealed form, keys and the key-encryption
key, the typed registry's declarations, the state cache, and the memory store's own paths
(batches, keys unwrapped again, the wrong key). The contract itself (round trips, forget,
bad input, concurrency) runs in tests/test_memory_contract.py."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import pickle
import uuid
from typing import Any, cast

import attrs
import pytest
import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from eventcore_trio import (
    ConfigurationError,
    EventDecodeError,
    EventRegistry,
    InvalidArgument,
    NewEvent,
    Position,
    RecordedEvent,
    Snapshot,
    StateCache,
    StreamAppend,
    SubjectForgottenError,
    UndecodableEvent,
    VersionConflict,
    open_memory_store,
)
from eventcore_trio._backend._decoding import decode_stored
from eventcore_trio._personal._envelope import (
    ENVELOPE_PREFIX,
    SEALED_WITH_FIRST,
    open_envelope,
    seal_event,
    seal_fields,
    sealed_data,
    without_personal,
)
from eventcore_trio._personal._keys import (
    KEY_ENCRYPTION_KEY_VARIABLE,
    AesKeyWrapper,
    Keyring,
    resolve_key_encryption_key,
)
from eventcore_trio.commands._cache import CachedState

SUBJECT = "customer-1"
#: The event the envelopes of these tests are sealed for.
EVENT_ID = uuid.UUID(int=7)


def _key() -> AESGCM:
    return AESGCM(AESGCM.generate_key(bit_length=256))


def seal_value(aead: AESGCM, subject: str, field: str, value: Any) -> str:
    """The envelope of an event whose one personal field *field* holds *value*."""
    return seal_fields(aead, EVENT_ID, subject, (field,), {field: value})


def open_value(aead: AESGCM, subject: str, field: str, envelope: object) -> Any:
    """The value sealed by `seal_value`."""
    return open_envelope(aead, EVENT_ID, subject, (field,), envelope)[field]


def _event(**data: Any) -> NewEvent:
    return NewEvent("Registered", {"plan": "basic", **data}, subject=SUBJECT, personal=sorted(data))


class CountingKms:
    """A `KeyWrapper` of its own AES key that counts its calls."""

    def __init__(self) -> None:
        self.aead = _key()
        self.wraps = 0
        self.unwraps = 0

    def wrap(self, data_key: bytes, *, subject: str) -> bytes:
        """Encrypt the key, the subject as context."""
        self.wraps += 1
        nonce = os.urandom(12)
        return nonce + self.aead.encrypt(nonce, data_key, subject.encode())

    def unwrap(self, wrapped: bytes, *, subject: str) -> bytes:
        """Decrypt it."""
        self.unwraps += 1
        return self.aead.decrypt(wrapped[:12], wrapped[12:], subject.encode())


class TestEnvelope:
    """Sealing one field's value, and opening it."""

    @pytest.mark.parametrize(
        "value",
        [
            "ada@example.org",
            2**70,
            -(2**80),
            "1234567890123456789012",
            {"street": "Rue de l'Été", "no": [1, 2.5]},
            None,
            True,
            "",
        ],
    )
    def test_any_json_value_round_trips(self, value: object) -> None:
        """Strings, integers beyond 64 bits, objects, null: opened exactly as sealed."""
        key = _key()
        sealed = seal_value(key, SUBJECT, "email", value)
        assert sealed.startswith(ENVELOPE_PREFIX)
        assert open_value(key, SUBJECT, "email", sealed) == value

    def test_each_seal_is_fresh(self) -> None:
        """The same value sealed twice gives two envelopes (a fresh nonce each time)."""
        key = _key()
        assert seal_value(key, SUBJECT, "f", "x") != seal_value(key, SUBJECT, "f", "x")

    def test_an_envelope_opens_only_where_it_was_sealed(self) -> None:
        """Under another key, as another field or subject, altered or not an envelope at
        all: `ValueError`, never another value."""
        key = _key()
        sealed = seal_value(key, SUBJECT, "email", "ada@example.org")
        raw = bytearray(base64.b64decode(sealed[len(ENVELOPE_PREFIX) :]))
        raw[20] ^= 1
        altered = ENVELOPE_PREFIX + base64.b64encode(bytes(raw)).decode()
        attempts = [
            (_key(), SUBJECT, "email", sealed),
            (key, SUBJECT, "name", sealed),
            (key, "customer-2", "email", sealed),
            (key, SUBJECT, "email", altered),
            (key, SUBJECT, "email", "ada@example.org"),
            (key, SUBJECT, "email", ENVELOPE_PREFIX + "!!"),
            (key, SUBJECT, "email", ENVELOPE_PREFIX + "AAAA"),
            (key, SUBJECT, "email", 42),
        ]
        for aead, subject, field, envelope in attempts:
            with pytest.raises(ValueError, match="personal field"):
                open_value(aead, subject, field, envelope)

    def test_only_sealed_values_reach_a_store(self) -> None:
        """`sealed_data` refuses a personal field that was not sealed (however much it
        looks like an envelope) and hands sealed ones on as plain strings."""
        key = _key()
        event = _event(email="ada@example.org")
        lookalike = _event(email=str(seal_value(key, SUBJECT, "email", "x")))
        for unsealed in (event, lookalike):
            with pytest.raises(ConfigurationError, match="not sealed"):
                sealed_data(unsealed)
        sealed = seal_event(event, key)
        assert sealed.event_id is not None
        data = sealed_data(sealed)
        assert type(data["email"]) is str
        assert data["plan"] == "basic"
        opened = open_envelope(key, sealed.event_id, SUBJECT, ("email",), data["email"])
        assert opened == {"email": "ada@example.org"}
        plain = NewEvent("Plain", {"a": 1})
        assert sealed_data(plain) is plain.data


class TestDecoding:
    """`decode_stored` with personal fields: opened, forgotten, undecodable, kept sealed."""

    def _stored(self, data: dict[str, Any], key: AESGCM | None, **options: Any) -> Any:
        return decode_stored(
            Position(1, 1),
            "s",
            1,
            EVENT_ID,
            "T",
            json.dumps(data),
            "{}",
            dt.datetime.now(dt.UTC),
            subject=SUBJECT,
            personal=("email",),
            data_key=key,
            **options,
        )

    def test_opened_or_forgotten(self) -> None:
        """With the key the field is plain; without it (forgotten) it is left out and
        named; kept sealed, it stays an envelope."""
        key = _key()
        data = {"email": seal_value(key, SUBJECT, "email", "ada@example.org"), "plan": "p"}
        opened = self._stored(data, key)
        assert isinstance(opened, RecordedEvent)
        assert (opened.data, opened.forgotten) == ({"email": "ada@example.org", "plan": "p"}, ())
        forgotten = self._stored(data, None)
        assert isinstance(forgotten, RecordedEvent)
        assert (forgotten.data, forgotten.forgotten) == ({"plan": "p"}, ("email",))
        sealed = self._stored(data, None, keep_sealed=True)
        assert isinstance(sealed, RecordedEvent)
        assert sealed.data["email"] == data["email"]
        assert sealed.personal == ("email",)

    def test_an_event_without_its_envelope_is_undecodable(self) -> None:
        """The field missing, or holding anything but an envelope: an `UndecodableEvent`
        saying so, when the event is read."""
        for data in ({"plan": "p"}, {"email": "ada@example.org"}, {"email": 1}):
            stored = self._stored(data, _key())
            assert isinstance(stored, UndecodableEvent)
            assert "personal field 'email'" in stored.error

    def test_an_envelope_that_does_not_open_raises_when_data_is_read(self) -> None:
        """Sealed under another key or altered: the event reads (its other attributes
        too), and reading its data raises `EventDecodeError` naming its position, every
        time; `without_personal` still gives the rest without opening anything."""
        envelope = seal_value(_key(), SUBJECT, "email", "x")
        altered = envelope[:-6] + ("A" if envelope[-6] != "A" else "B") + envelope[-5:]
        for sealed in (envelope, altered):
            stored = self._stored({"email": sealed, "plan": "p"}, _key())
            assert isinstance(stored, RecordedEvent)
            assert (stored.type, stored.personal, stored.forgotten) == ("T", ("email",), ())
            for _ in range(2):
                with pytest.raises(EventDecodeError, match="personal fields") as caught:
                    stored.data  # noqa: B018  (the read is the test)
                assert caught.value.position == Position(1, 1)
            assert without_personal(stored) == {"plan": "p"}

    def test_opened_when_data_is_first_read(self) -> None:
        """Reading an event decrypts nothing; its data opens once, on first read, and
        every attrs tool (eq, repr, evolve, asdict, pickle) sees the opened values."""
        key = CountingAead(_key())
        data = {"email": seal_value(key.aead, SUBJECT, "email", "ada@example.org"), "plan": "p"}
        plain = {"email": "ada@example.org", "plan": "p"}
        events = [self._stored(data, cast(AESGCM, key)) for _ in range(6)]
        assert key.decrypts == 0
        first, *others = events
        assert (first.data, first.data) == (plain, plain)
        assert key.decrypts == 1

        def opened(event: RecordedEvent) -> RecordedEvent:
            # The same event built with plain data: reading the other attributes opens
            # nothing.
            return RecordedEvent(
                event_id=event.event_id,
                stream_id=event.stream_id,
                stream_version=event.stream_version,
                position=event.position,
                type=event.type,
                data=dict(plain),
                metadata=event.metadata,
                recorded_at=event.recorded_at,
                subject=event.subject,
                personal=event.personal,
            )

        assert others[0] == opened(others[0])
        assert "ada@example.org" in repr(others[1])
        assert attrs.evolve(others[2], stream_id="t").data == plain
        assert attrs.asdict(others[3])["data"] == plain
        assert pickle.loads(pickle.dumps(others[4])) == opened(others[4])
        assert key.decrypts == 6
        assert without_personal(events[0]) == {"plan": "p"}
        with pytest.raises(AttributeError, match="no attribute 'dat'"):
            first.dat  # noqa: B018


class CountingAead:
    """An AESGCM that counts its decryptions."""

    def __init__(self, aead: AESGCM) -> None:
        self.aead = aead
        self.decrypts = 0

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        """Decrypt, counted."""
        self.decrypts += 1
        return self.aead.decrypt(nonce, data, associated_data)


class TestOneEnvelopePerEvent:
    """An event's personal fields sealed together: one envelope, bound to all their names."""

    def test_one_envelope_and_markers(self) -> None:
        """The first field holds the envelope, the others a marker; it opens to every
        field, integers beyond 64 bits and escaped lone surrogates exactly."""
        key = _key()
        values = {"a": -9_999_999_999_999_999_999, "b": "Grüße, 世界 \U0001f600", "c": {"n": 2**70}}
        event = NewEvent("T", {"plan": "p", **values}, subject=SUBJECT, personal=["c", "a", "b"])
        sealed = seal_event(event, key)
        assert sealed.event_id is not None  # an id made for it: the envelope is bound to it
        data = sealed_data(sealed)
        assert data["a"].startswith(ENVELOPE_PREFIX)
        assert (data["b"], data["c"], data["plan"]) == (SEALED_WITH_FIRST, SEALED_WITH_FIRST, "p")
        assert open_envelope(key, sealed.event_id, SUBJECT, ("a", "b", "c"), data["a"]) == values
        small = NewEvent("T", {"a": 1, "b": 2}, subject=SUBJECT, personal=["a", "b"])
        small = seal_event(attrs.evolve(small, event_id=EVENT_ID), key)
        assert small.event_id == EVENT_ID  # its own id kept
        assert open_envelope(key, EVENT_ID, SUBJECT, ("a", "b"), small.data["a"]) == {
            "a": 1,
            "b": 2,
        }

    def test_the_names_are_bound(self) -> None:
        """Opened as other personal fields (one more, one fewer, renamed): `ValueError`."""
        key = _key()
        envelope = seal_fields(key, EVENT_ID, SUBJECT, ("a", "b"), {"a": 1, "b": 2})
        for names in (("a",), ("a", "b", "c"), ("a", "x"), ("b", "a")):
            with pytest.raises(ValueError, match="do not open"):
                open_envelope(key, EVENT_ID, SUBJECT, names, envelope)

    def test_the_event_is_bound(self) -> None:
        """Opened as another event's (of the same subject, with the same names): an
        envelope copied between the subject's events does not open."""
        key = _key()
        envelope = seal_fields(key, EVENT_ID, SUBJECT, ("a",), {"a": 1})
        assert open_envelope(key, EVENT_ID, SUBJECT, ("a",), envelope) == {"a": 1}
        with pytest.raises(ValueError, match="do not open"):
            open_envelope(key, uuid.UUID(int=8), SUBJECT, ("a",), envelope)


class TestKeyEncryptionKey:
    """What `key_encryption_key=` and the environment variable accept."""

    def test_bytes_the_variable_or_a_wrapper(self) -> None:
        """32 bytes, the variable in base64 (standard or URL-safe), or an object with
        wrap and unwrap; nothing at all gives None."""
        assert isinstance(resolve_key_encryption_key(os.urandom(32)), AesKeyWrapper)
        key = os.urandom(32)
        for text in (base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode()):
            found = resolve_key_encryption_key(None, {KEY_ENCRYPTION_KEY_VARIABLE: text})
            assert isinstance(found, AesKeyWrapper)
            assert found.key_id == AesKeyWrapper(key).key_id
        kms = CountingKms()
        assert resolve_key_encryption_key(kms) is kms
        assert resolve_key_encryption_key(None, {}) is None
        assert resolve_key_encryption_key(None, {KEY_ENCRYPTION_KEY_VARIABLE: " "}) is None

    @pytest.mark.parametrize(
        ("value", "environ", "message"),
        [
            (b"x" * 31, {}, "must be 32 bytes"),
            (bytearray(33), {}, "must be 32 bytes"),
            ("a" * 44, {}, "got a str"),
            (object(), {}, "wrap"),
            (None, {KEY_ENCRYPTION_KEY_VARIABLE: "c2VjcmV0"}, "holds 6 bytes"),
            (None, {KEY_ENCRYPTION_KEY_VARIABLE: "sécret!"}, "not base64"),
        ],
    )
    def test_bad_keys_are_refused_without_showing_them(
        self, value: object, environ: dict[str, str], message: str
    ) -> None:
        """A wrong size, a str, something else: `ConfigurationError` saying what is needed,
        never the key itself."""
        with pytest.raises(ConfigurationError, match=message) as refused:
            resolve_key_encryption_key(value, environ)
        for secret in (*environ.values(), "a" * 44):
            assert secret not in str(refused.value)

    def test_the_built_in_key_names_the_key_that_wrapped(self) -> None:
        """Unwrapping with another KEK names both ids; an altered or moved key does not
        unwrap; neither gives garbage."""
        first, second = AesKeyWrapper(os.urandom(32)), AesKeyWrapper(os.urandom(32))
        data_key = os.urandom(32)
        wrapped = first.wrap(data_key, subject=SUBJECT)
        assert first.unwrap(wrapped, subject=SUBJECT) == data_key
        with pytest.raises(ConfigurationError, match=first.key_id) as refused:
            second.unwrap(wrapped, subject=SUBJECT)
        assert second.key_id in str(refused.value)
        with pytest.raises(ConfigurationError, match="does not unwrap"):
            first.unwrap(wrapped, subject="customer-2")
        with pytest.raises(ConfigurationError, match="does not unwrap"):
            first.unwrap(wrapped[:-1] + bytes([wrapped[-1] ^ 1]), subject=SUBJECT)
        with pytest.raises(ConfigurationError, match="not wrapped by the built-in"):
            first.unwrap(b"\x02" + wrapped[1:], subject=SUBJECT)


class TestKeyring:
    """This process's keys: made, cached, unwrapped, rewrapped."""

    async def test_no_key_encryption_key_says_what_to_set(self) -> None:
        """Without a KEK no key can be made or opened."""
        keyring = Keyring(None)
        assert not keyring.configured
        with pytest.raises(ConfigurationError, match=KEY_ENCRYPTION_KEY_VARIABLE):
            await keyring.new_key(SUBJECT)
        with pytest.raises(ConfigurationError, match="key_encryption_key="):
            keyring.open(SUBJECT, b"wrapped")

    async def test_keys_are_cached_unwrapped_and_evicted(self) -> None:
        """A made key is cached; a dropped one is unwrapped again, in a worker thread by
        `prefetch` (or in place by `open`); the cache keeps at most *max_cached*."""
        kms = CountingKms()
        keyring = Keyring(kms, max_cached=2)
        wrapped, aead = await keyring.new_key(SUBJECT)
        sealed = seal_value(aead, SUBJECT, "f", 1)
        assert keyring.open(SUBJECT, wrapped) is aead
        keyring.clear()
        await keyring.prefetch([(SUBJECT, wrapped)])
        await keyring.prefetch([(SUBJECT, wrapped)])
        assert kms.unwraps == 1
        assert open_value(keyring.open(SUBJECT, wrapped), SUBJECT, "f", sealed) == 1
        for subject in ("a", "b"):
            await keyring.new_key(subject)
        keyring.open(SUBJECT, wrapped)
        assert kms.unwraps == 2  # evicted by the two newer keys, unwrapped in place

    async def test_a_wrapper_that_fails_or_lies_is_a_configuration_error(self) -> None:
        """An exception from the wrapper, or an unwrapped key that is not 32 bytes: a
        `ConfigurationError`, the cause chained."""

        class Broken(CountingKms):
            def unwrap(self, wrapped: bytes, *, subject: str) -> bytes:
                return b"short"

        keyring = Keyring(Broken())
        wrapped, _ = await keyring.new_key(SUBJECT)
        keyring.clear()
        with pytest.raises(ConfigurationError, match="5 bytes"):
            keyring.open(SUBJECT, wrapped)
        with pytest.raises(ConfigurationError, match="unwrap"):
            await keyring.prefetch([(SUBJECT, b"\x00" * 40)])

    async def test_rewrap_keeps_the_plain_keys(self) -> None:
        """Rewrapped keys open under the new KEK to the same keys, also uncached."""
        old, new = AesKeyWrapper(os.urandom(32)), AesKeyWrapper(os.urandom(32))
        keyring = Keyring(old)
        wrapped, aead = await keyring.new_key(SUBJECT)
        sealed = seal_value(aead, SUBJECT, "f", "v")
        keyring.clear()
        [(subject, rewrapped)] = (await keyring.rewrap([(SUBJECT, wrapped)], new)).items()
        keyring.use(new)
        keyring.clear()
        assert subject == SUBJECT
        assert open_value(keyring.open(SUBJECT, rewrapped), SUBJECT, "f", sealed) == "v"
        with pytest.raises(ConfigurationError):
            keyring.open(SUBJECT, wrapped)


class TestRegistry:
    """The typed registry's personal declarations."""

    def test_new_event_fills_in_subject_and_personal_fields(self) -> None:
        """The subject is read from its field; the personal names are the declared ones."""
        registry = EventRegistry()

        @registry.register("Registered", subject="customer", personal=["email"])
        @attrs.frozen
        class Registered:
            customer: str
            email: str = ""

        event = registry.new_event(Registered("c-1", "ada@example.org"))
        assert (event.subject, event.personal) == ("c-1", ("email",))
        with pytest.raises(InvalidArgument, match="subject"):
            registry.new_event(Registered(None, "x"))  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("subject", "personal", "message"),
        [
            ("customer", ["phone"], "'phone' is not a field"),
            ("customer", ["name"], "needs a default"),
            (None, ["email"], "need subject="),
            ("client", ["email"], "must name the field"),
            ("customer", ["customer"], "cannot be personal"),
            ("customer", "email", "list of field names"),
        ],
    )
    def test_bad_declarations_are_refused(
        self, subject: str | None, personal: Any, message: str
    ) -> None:
        """Fields that are not the class's, without a default, personal data without a
        subject, the subject as a personal field: `ConfigurationError` at registration."""
        registry = EventRegistry()
        with pytest.raises(ConfigurationError, match=message):

            @registry.register("Registered", subject=subject, personal=personal)
            @attrs.frozen
            class Registered:
                customer: str
                name: str
                email: str = ""

    async def test_an_undeclared_forgotten_field_says_how_to_declare_it(self) -> None:
        """A class that does not declare the stored personal fields (no default) cannot be
        built once they are forgotten: `EventDecodeError` saying to declare them."""
        registry = EventRegistry()

        @registry.register("Registered")
        @attrs.frozen
        class Registered:
            email: str

        async with open_memory_store(key_encryption_key=os.urandom(32)) as store:
            await store.append("s", [_event(email="ada@example.org")])
            await store.forget(SUBJECT)
            [event] = await store.read_stream("s")
            with pytest.raises(EventDecodeError, match="declare them personal"):
                registry.decode(event)


class TestStateCache:
    """A forget drops the states folded from the subject's streams, for good."""

    def test_forgotten_streams_are_dropped_and_not_kept_again(self) -> None:
        """The store's entries of those streams go (others stay); later puts are ignored."""

        class Stand:
            """A stand-in store (weakly referable, as stores are)."""

        cache = StateCache()
        store, other = Stand(), Stand()
        entry = CachedState(1, 1, 0, event_id=None, event_recorded_at=None)
        cache.put(store, "Customer", "customer-1", entry)
        cache.put(store, "Customer", "customer-2", entry)
        cache.put(other, "Customer", "customer-1", entry)
        cache.forgotten(store, {"customer-1"})
        assert cache.get(store, "Customer", "customer-1") is None
        assert cache.get(store, "Customer", "customer-2") == entry
        assert cache.get(other, "Customer", "customer-1") == entry
        cache.put(store, "Customer", "customer-1", entry)
        assert cache.get(store, "Customer", "customer-1") is None


class TestMemoryStore:
    """The memory store's own paths with personal data."""

    async def test_keys_are_unwrapped_again_and_a_wrong_key_is_never_garbage(self) -> None:
        """With the process's keys dropped, a read unwraps each key again through the KEK;
        a store whose KEK cannot unwrap them raises `ConfigurationError` on reading."""
        kms = CountingKms()
        async with open_memory_store(key_encryption_key=kms) as store:
            await store.append("s", [_event(email="ada@example.org")])
            store.admin.drop_cached_keys()
            [event] = await store.read_stream("s")
            assert event.data["email"] == "ada@example.org"
            assert (kms.wraps, kms.unwraps) == (1, 1)
            store.admin.state.personal.keyring.use(AesKeyWrapper(os.urandom(32)))
            store.admin.drop_cached_keys()
            with pytest.raises(ConfigurationError, match="built-in"):
                await store.read_stream("s")

    async def test_a_batch_seals_and_refuses_a_subject_forgotten_before_it_commits(
        self,
    ) -> None:
        """``ctx.append`` seals personal fields; one whose subject is forgotten between the
        append and the commit fails the commit, and nothing of the batch is written."""
        async with open_memory_store(key_encryption_key=os.urandom(32)) as store:
            await store.append("s", [_event(email="ada@example.org")])
            async with store.try_acquire("reactor") as leadership:
                async with leadership.open_batch() as batch:
                    await batch.append_atomic([StreamAppend("t", [_event(email="b@x.org")])])
                assert "b@x.org" not in store.admin.state.log[-1].data_json
                [reacted] = await store.read_stream("t")
                assert reacted.data["email"] == "b@x.org"
                head = await store.last_position()

                async def forget_before_the_commit() -> None:
                    async with leadership.open_batch() as batch:
                        await batch.append_atomic([StreamAppend("t", [_event(email="c@x")])])
                        await store.forget(SUBJECT)

                with pytest.raises(SubjectForgottenError):
                    await forget_before_the_commit()
                forgotten = await store.last_position()
                assert forgotten is not None
                assert head is not None
                assert forgotten > head  # the forget's event only
                assert len(await store.read_stream("t")) == 1

    async def test_a_snapshot_of_several_subjects_needs_every_key(self) -> None:
        """A stream with two subjects' personal events is snapshotted under both keys;
        forgetting either makes it read as none."""
        async with open_memory_store(key_encryption_key=os.urandom(32)) as store:
            await store.append("team", [_event(email="a@x.org")])
            await store.append("team", [attrs.evolve(_event(email="b@x.org"), subject="c-2")])
            events = await store.read_stream("team")
            snapshot = Snapshot(
                "team",
                "Team",
                1,
                2,
                {"emails": ["a@x.org", "b@x.org"]},
                event_id=events[-1].event_id,
                event_recorded_at=events[-1].recorded_at,
            )
            await store.write_snapshot(snapshot)
            kept = store.admin.state.snapshots[("team", "Team")]
            assert sorted(kept.data) == ["@sealed", "@subjects"]
            assert kept.data["@subjects"] == ["c-2", "customer-1"]
            read = await store.read_snapshot("team", "Team")
            assert read is not None
            assert read.data == {"emails": ["a@x.org", "b@x.org"]}
            assert "a@x.org" not in repr(store.admin.state.snapshots)
            await store.forget("c-2")
            assert await store.read_snapshot("team", "Team") is None
            assert ("team", "Team") not in store.admin.state.snapshots

    async def test_a_key_made_for_a_failed_append_is_forgettable(self) -> None:
        """A key made for an append that then failed (a version conflict) is kept, and the
        subject can be forgotten; concurrent first appends of one subject share one key."""
        async with open_memory_store(key_encryption_key=CountingKms()) as store:
            with pytest.raises(VersionConflict):
                await store.append("s", [_event(email="x")], expected_version=3)
            record = await store.forget(SUBJECT)
            assert record.subject == SUBJECT

            async def append(n: int) -> None:
                await store.append(f"c{n}", [attrs.evolve(_event(email="x"), subject="c-2")])

            async with trio.open_nursery() as nursery:
                for n in range(5):
                    nursery.start_soon(append, n)
            assert len(store.admin.state.personal.keys) == 1
            for n in range(5):
                [event] = await store.read_stream(f"c{n}")
                assert event.data["email"] == "x"

    async def test_rewrap_round_covers_keys_made_meanwhile(self) -> None:
        """Keys made while a rewrap waits on the new KEK are rewrapped too: afterwards
        every key unwraps under the new KEK alone."""
        async with open_memory_store(key_encryption_key=os.urandom(32)) as store:
            await store.append("s", [_event(email="x")])

            async def append_more() -> None:
                await store.append("t", [attrs.evolve(_event(email="y"), subject="c-2")])

            class AppendingKms(CountingKms):
                # Its first wrap (in a worker thread) has the store make another key first.
                def wrap(self, data_key: bytes, *, subject: str) -> bytes:
                    if self.wraps == 0:
                        trio.from_thread.run(append_more)
                    return super().wrap(data_key, subject=subject)

            new = AppendingKms()
            assert await store.rewrap(new) == 2
            store.admin.drop_cached_keys()
            assert [e.data["email"] for e in await store.read_events(None, limit=10)] == [
                "x",
                "y",
            ]
            assert new.unwraps == 2
