"""The contract of personal data that can be forgotten (crypto-shredding): round trips on
every read path, the sealed form of everything stored, forgetting a subject, keys and their
rotation, typed events and upcasters, bad input, and a forget in the middle of a projection's
catch-up and a command's fold.

Written against the public API only, so every backend that keeps personal data runs it as it
is: a backend's test class provides ``open_store`` (opening a store on one shared database
with a given key-encryption key) and `PersonalDataContract.stored_text` (everything the
backend has stored, as text: the PostgreSQL one is a ``pg_dump``), which the tests search for
personal values in plain text.

`PersonalDataContract` runs beside `StoreContract`, for both stores
(tests/test_memory_contract.py, tests/postgres/test_personal.py).
"""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import attrs
import pytest
import trio

from ..._errors import ConfigurationError, InvalidArgument, SubjectForgottenError, SubjectNotFound
from ..._events import NewEvent, RecordedEvent
from ..._personal._fields import SUBJECT_FORGOTTEN
from ..._personal._keys import KEY_ENCRYPTION_KEY_VARIABLE, KeyWrapper
from ..._protocols import PersonalDataStore, SnapshotStore, Store, TaggedEventStore
from ..._queries import EventQuery
from ..._util import conforms
from ...commands import StateCache, execute
from ...projection import (
    Failure,
    FailureStrategy,
    ProjectionConfig,
    ProjectionContext,
    projector,
    run_projection,
)
from ._customers import (
    ADA_EMAIL,
    ADA_NAME,
    BOB_EMAIL,
    BOB_NAME,
    ChangePlan,
    CustomerRegistered,
    Kms,
    Touch,
    registered,
    registry,
)
from ._support import read_all


class PersonalStore(Store, SnapshotStore, PersonalDataStore, Protocol):
    """A store that keeps personal data (and snapshots): what the contract runs against."""


class OpenStore(Protocol):
    """Opens a store on the backend's one shared database with the key-encryption key
    given (None: the environment's, else none)."""

    def __call__(
        self, *, key_encryption_key: bytes | KeyWrapper | None
    ) -> AbstractAsyncContextManager[PersonalStore]:
        """Open it."""
        ...


@pytest.mark.trio
class PersonalDataContract:
    """Personal data: sealed when stored, plain when read, gone when forgotten.

    .. versionadded:: 0.4
    """

    @pytest.fixture
    def open_store(self) -> OpenStore:
        """Override in the subclass: open a store on the backend's shared database."""
        raise NotImplementedError("provide an `open_store` fixture")

    async def stored_text(self, store: PersonalStore) -> str:
        """Override in the subclass: everything the backend has stored, as text."""
        raise NotImplementedError("implement stored_text()")

    @pytest.fixture
    async def store(self, open_store: OpenStore) -> AsyncIterator[PersonalStore]:
        """A store opened with a fresh key-encryption key."""
        async with open_store(key_encryption_key=os.urandom(32)) as store:
            yield store

    async def assert_nothing_plain(self, store: PersonalStore, *values: str) -> None:
        """None of *values* is stored in plain text, while the plan (not personal) is."""
        text = await self.stored_text(store)
        assert "basic" in text  # the dump is of what this test stored
        for value in values:
            assert value not in text, f"{value!r} is stored in plain text"

    # -- round trips ------------------------------------------------------------------------

    async def test_personal_fields_are_sealed_and_read_back_plain(
        self, store: PersonalStore
    ) -> None:
        """Stored sealed, the fields read back plain from streams, pages and subscriptions,
        with the subject and the personal names; the rest of the data stays plain."""
        await store.append("customer-1", [registered("customer-1")])
        [event] = await store.read_stream("customer-1")
        assert event.data == {
            "customer": "customer-1",
            "email": ADA_EMAIL,
            "name": ADA_NAME,
            "plan": "basic",
        }
        assert (event.subject, event.personal, event.forgotten) == (
            "customer-1",
            ("email", "name"),
            (),
        )
        assert await store.read_events(None, limit=10) == [event]
        async with store.subscribe() as subscription:
            async for followed in subscription:
                assert followed == event
                break
        await self.assert_nothing_plain(store, ADA_EMAIL, ADA_NAME)

    async def test_a_subject_without_personal_fields_is_kept(self, store: PersonalStore) -> None:
        """An event may name its subject and have no personal field: nothing is sealed."""
        await store.append("s", [NewEvent("Visited", {"page": "/"}, subject="customer-1")])
        [event] = await store.read_stream("s")
        assert (event.subject, event.personal, event.data) == ("customer-1", (), {"page": "/"})

    async def test_queries_read_personal_fields_plain(self, store: PersonalStore) -> None:
        """`read_query` opens them too, and `append_tagged` seals them (where queries are
        kept)."""
        if not conforms(store, TaggedEventStore):
            pytest.skip("this store does not keep tags")
        assert isinstance(store, TaggedEventStore)
        tagged = attrs.evolve(registered("customer-1"), tags=["customer:1"])
        await store.append_tagged([tagged], stream_id="customer-1")
        result = await store.read_query(EventQuery.of(tags=["customer:1"]))
        assert [e.data["email"] for e in result.events] == [ADA_EMAIL]
        await store.forget("customer-1")
        result = await store.read_query(EventQuery.of(tags=["customer:1"]))
        assert [e.forgotten for e in result.events] == [("email", "name")]
        await self.assert_nothing_plain(store, ADA_EMAIL, ADA_NAME)

    # -- forgetting -------------------------------------------------------------------------

    async def test_forget_removes_the_fields_and_records_it(self, store: PersonalStore) -> None:
        """After a forget the subject's events read back without their personal fields,
        naming them; other subjects keep theirs; a `SubjectForgotten` event and the audit
        record say who forgot it, when and where."""
        await store.append("customer-1", [registered("customer-1")])
        await store.append("customer-2", [registered("customer-2", BOB_EMAIL, BOB_NAME)])
        record = await store.forget("customer-1")
        [ada] = await store.read_stream("customer-1")
        assert ada.data == {"customer": "customer-1", "plan": "basic"}
        assert ada.forgotten == ("email", "name")
        [bob] = await store.read_stream("customer-2")
        assert (bob.data["email"], bob.forgotten) == (BOB_EMAIL, ())
        [forgotten] = await store.read_stream("$forgotten-customer-1")
        assert forgotten.type == SUBJECT_FORGOTTEN
        assert forgotten.subject == "customer-1"
        assert forgotten.data == {
            "subject": "customer-1",
            "forgotten_at": record.forgotten_at.isoformat(),
            "host": record.host,
            "pid": record.pid,
        }
        assert record.position == forgotten.position
        assert (record.subject, record.pid) == ("customer-1", os.getpid())
        assert record.host
        assert await store.forget_records() == [record]
        assert await store.forget_records("customer-1") == [record]
        assert await store.forget_records("customer-2") == []
        await self.assert_nothing_plain(store, ADA_EMAIL, ADA_NAME)

    async def test_forgetting_again_changes_nothing(self, store: PersonalStore) -> None:
        """A second forget of one subject returns the first record and appends nothing."""
        await store.append("customer-1", [registered("customer-1")])
        first = await store.forget("customer-1")
        head = await store.last_position()
        assert await store.forget("customer-1") == first
        assert await store.last_position() == head

    async def test_forgetting_an_unknown_subject_is_refused(self, store: PersonalStore) -> None:
        """A subject with no personal data here (never seen, or only in events without
        personal fields) raises `SubjectNotFound`; nothing is written or recorded."""
        await store.append("s", [NewEvent("Visited", {}, subject="customer-3")])
        head = await store.last_position()
        for subject in ("nobody", "customer-3"):
            with pytest.raises(SubjectNotFound) as refused:
                await store.forget(subject)
            assert refused.value.subject == subject
        assert await store.last_position() == head
        assert await store.forget_records() == []

    async def test_personal_data_of_a_forgotten_subject_is_refused(
        self, store: PersonalStore
    ) -> None:
        """Once forgotten, an append with the subject's personal fields raises
        `SubjectForgottenError` and writes nothing of the append; without personal fields
        it is accepted."""
        await store.append("customer-1", [registered("customer-1")])
        await store.forget("customer-1")
        head = await store.last_position()
        with pytest.raises(SubjectForgottenError) as refused:
            await store.append(
                "customer-1", [NewEvent("Other", {}), registered("customer-1", "new@example.org")]
            )
        assert refused.value.subject == "customer-1"
        assert await store.last_position() == head
        await store.append("customer-1", [NewEvent("Closed", {}, subject="customer-1")])
        await self.assert_nothing_plain(store, ADA_EMAIL, "new@example.org")

    async def test_a_projection_rebuilt_after_a_forget_runs_to_the_end(
        self, store: PersonalStore
    ) -> None:
        """A projection rebuilt after a forget meets events without the fields and runs to
        the end; one that erases on ``SubjectForgotten`` forgets what it derived."""
        emails: dict[str, str | None] = {}

        @projector("emails", event_types=["CustomerRegistered", SUBJECT_FORGOTTEN])
        async def keep_emails(event: RecordedEvent, ctx: ProjectionContext) -> None:
            if event.type == SUBJECT_FORGOTTEN:
                emails.pop(event.data["subject"], None)
            else:
                emails[event.data["customer"]] = event.data.get("email")

        await store.append("customer-1", [registered("customer-1")])
        await store.append("customer-2", [registered("customer-2", BOB_EMAIL, BOB_NAME)])
        await run_projection(store, keep_emails)
        assert emails == {"customer-1": ADA_EMAIL, "customer-2": BOB_EMAIL}
        await store.forget("customer-1")
        await run_projection(store, keep_emails)
        assert emails == {"customer-2": BOB_EMAIL}
        await store.reset_projection("emails")
        emails.clear()
        result = await run_projection(store, keep_emails)
        assert result.events_applied == 3
        assert emails == {"customer-2": BOB_EMAIL}

    async def test_typed_events_and_upcasters_after_a_forget(self, store: PersonalStore) -> None:
        """The registry fills in subject and personal fields; an old shape's upcaster sees
        the plain fields, and after a forget none: the typed objects get the defaults."""
        new = registry.new_event(CustomerRegistered("customer-1", "basic", ADA_EMAIL, ADA_NAME))
        assert (new.subject, new.personal) == ("customer-1", ("email", "name"))
        old = NewEvent(
            "CustomerRegistered",
            {"customer": "customer-2", "plan": "pro", "email": BOB_EMAIL, "full_name": BOB_NAME},
            subject="customer-2",
            personal=["email", "full_name"],
        )
        await store.append("customer-1", [new])
        await store.append("customer-2", [old])
        events = await read_all(store)
        assert [registry.decode(e) for e in events] == [
            CustomerRegistered("customer-1", "basic", ADA_EMAIL, ADA_NAME),
            CustomerRegistered("customer-2", "pro", BOB_EMAIL, BOB_NAME),
        ]
        await store.forget("customer-1")
        await store.forget("customer-2")
        events = await read_all(store, filter=None)
        typed = [registry.decode(e) for e in events if e.type == "CustomerRegistered"]
        assert typed == [
            CustomerRegistered("customer-1", "basic"),
            CustomerRegistered("customer-2", "pro"),
        ]
        await self.assert_nothing_plain(store, ADA_EMAIL, ADA_NAME, BOB_EMAIL, BOB_NAME)

    # -- what else is stored: snapshots, dead letters -------------------------------------

    async def test_snapshots_are_sealed_and_go_with_the_subject(self, store: PersonalStore) -> None:
        """A snapshot of a stream with personal events is stored sealed and read plain; the
        forget deletes it, and the stream gets none again (its state is folded from events
        without the fields)."""
        await store.append("customer-1", [registered("customer-1")])
        await execute(store, ChangePlan("customer-1", "pro"), registry=registry)
        snapshot = await store.read_snapshot("customer-1", "Customer")
        assert snapshot is not None
        assert snapshot.data["email"] == ADA_EMAIL
        await self.assert_nothing_plain(store, ADA_EMAIL, ADA_NAME)
        await store.forget("customer-1")
        assert await store.read_snapshot("customer-1", "Customer") is None
        await execute(store, Touch("customer-1"), registry=registry)
        assert await store.read_snapshot("customer-1", "Customer") is None
        await self.assert_nothing_plain(store, ADA_EMAIL, ADA_NAME)

    async def test_dead_letters_keep_the_sealed_form(self, store: PersonalStore) -> None:
        """A skipped event's dead letter keeps its personal fields sealed: listed plain
        while the key exists, without them after the forget."""

        def skip(failure: Failure) -> FailureStrategy:
            return FailureStrategy.SKIP

        @projector("fails", event_types=["CustomerRegistered"], on_error=skip)
        async def fails(event: RecordedEvent, ctx: ProjectionContext) -> None:
            raise ValueError("this projector cannot apply it")

        await store.append("customer-1", [registered("customer-1")])
        await run_projection(store, fails)
        [letter] = await store.dead_letters("fails")
        assert isinstance(letter.event, RecordedEvent)
        assert letter.event.data["email"] == ADA_EMAIL
        await self.assert_nothing_plain(store, ADA_EMAIL, ADA_NAME)
        await store.forget("customer-1")
        [letter] = await store.dead_letters("fails")
        assert isinstance(letter.event, RecordedEvent)
        assert "email" not in letter.event.data
        assert letter.event.forgotten == ("email", "name")

    # -- keys ------------------------------------------------------------------------------

    async def test_without_a_key_encryption_key_personal_data_is_refused(
        self, open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With no key-encryption key, an append with personal fields raises
        `ConfigurationError` naming what to set, and writes nothing; other appends work."""
        monkeypatch.delenv(KEY_ENCRYPTION_KEY_VARIABLE, raising=False)
        async with open_store(key_encryption_key=None) as store:
            with pytest.raises(ConfigurationError, match=KEY_ENCRYPTION_KEY_VARIABLE):
                await store.append("customer-1", [registered("customer-1")])
            assert await store.last_position() is None
            await store.append("s", [NewEvent("Plain", {})])

    async def test_the_key_may_come_from_the_environment(
        self, open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``EVENTCORE_KEY_ENCRYPTION_KEY`` (32 bytes, base64) is the key when none is
        passed; one that is not 32 bytes of base64 is a `ConfigurationError` at open that
        does not show it."""
        monkeypatch.setenv(KEY_ENCRYPTION_KEY_VARIABLE, base64.b64encode(os.urandom(32)).decode())
        async with open_store(key_encryption_key=None) as store:
            await store.append("customer-1", [registered("customer-1")])
            [event] = await store.read_stream("customer-1")
            assert event.data["email"] == ADA_EMAIL
        for bad in ("c2hvcnQ=", "not base64 at all!"):
            monkeypatch.setenv(KEY_ENCRYPTION_KEY_VARIABLE, bad)
            with pytest.raises(ConfigurationError, match=KEY_ENCRYPTION_KEY_VARIABLE) as refused:
                async with open_store(key_encryption_key=None):
                    pass  # pragma: no cover
            assert bad not in str(refused.value)

    @pytest.mark.parametrize("bad", [b"short", b"x" * 33, "a str", 42])
    async def test_a_bad_key_encryption_key_is_refused_at_open(
        self, open_store: OpenStore, bad: object
    ) -> None:
        """Not 32 bytes, not a `KeyWrapper`: `ConfigurationError` before the store opens."""
        with pytest.raises(ConfigurationError, match="key_encryption_key"):
            async with open_store(key_encryption_key=bad):  # type: ignore[arg-type]
                pass  # pragma: no cover

    async def test_a_key_wrapper_wraps_each_subject_s_key(self, open_store: OpenStore) -> None:
        """A `KeyWrapper` (a KMS) wraps each subject's key once; its failure is a
        `ConfigurationError` with the cause, and nothing is written."""
        kms = Kms()
        async with open_store(key_encryption_key=kms) as store:
            await store.append("customer-1", [registered("customer-1")])
            await store.append("customer-1", [registered("customer-1")])
            assert [e.data["email"] for e in await store.read_stream("customer-1")] == [
                ADA_EMAIL,
                ADA_EMAIL,
            ]
            assert kms.calls.count("wrap customer-1") == 1
            kms.fail = True
            with pytest.raises(ConfigurationError, match="unreachable"):
                await store.append("customer-2", [registered("customer-2")])
            assert await store.read_stream("customer-2") == []

    async def test_rewrap_moves_every_key_to_a_new_key_encryption_key(
        self, store: PersonalStore
    ) -> None:
        """`rewrap` wraps every key under the new KEK (and uses it for new ones); the data
        reads as before, and forgetting still works."""
        await store.append("customer-1", [registered("customer-1")])
        await store.append("customer-2", [registered("customer-2", BOB_EMAIL, BOB_NAME)])
        assert await store.rewrap(os.urandom(32)) == 2
        await store.append("customer-3", [registered("customer-3")])
        emails = [e.data["email"] for e in await read_all(store)]
        assert emails == [ADA_EMAIL, BOB_EMAIL, ADA_EMAIL]
        await store.forget("customer-2")
        assert await store.rewrap(Kms()) == 2
        assert [e.data.get("email") for e in await read_all(store)][:3] == [
            ADA_EMAIL,
            None,
            ADA_EMAIL,
        ]
        with pytest.raises(ConfigurationError):
            await store.rewrap(b"short")

    # -- bad input ---------------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"subject": "c-1", "personal": ["phone"]}, "'phone' is not in the event's data"),
            ({"personal": ["email"]}, "need a subject"),
            ({"subject": "", "personal": ["email"]}, "must not be empty"),
            ({"subject": "a\nb"}, "control"),
            ({"subject": " c-1"}, "whitespace"),
            ({"subject": "x" * 245}, "maximum is 244"),
            ({"subject": 42}, "must be a str"),
            ({"subject": "c-1", "personal": "email"}, "personal=\\['email'\\]"),
            ({"subject": "c-1", "personal": ["email", "email"]}, "twice"),
            ({"subject": "c-1", "personal": [f"f{i}" for i in range(65)]}, "at most 64"),
            ({"subject": "c-1", "personal": [""]}, "must not be empty"),
        ],
    )
    async def test_bad_personal_declarations_are_refused(
        self, kwargs: dict[str, Any], message: str
    ) -> None:
        """A personal field not in the data, personal fields without a subject, a subject
        that is not a valid id, repeated or too many fields: `InvalidArgument` when the
        event is made."""
        data = {"email": ADA_EMAIL, **{f"f{i}": i for i in range(65)}}
        with pytest.raises(InvalidArgument, match=message):
            NewEvent("CustomerRegistered", data, **kwargs)

    @pytest.mark.parametrize("subject", ["", "a\x00b", "x" * 245, 42, None])
    async def test_bad_subjects_are_refused_by_forget(
        self, store: PersonalStore, subject: object
    ) -> None:
        """`forget` and `forget_records` refuse a subject that is not a valid id."""
        with pytest.raises(InvalidArgument):
            await store.forget(subject)  # type: ignore[arg-type]
        if subject is not None:
            with pytest.raises(InvalidArgument):
                await store.forget_records(subject)  # type: ignore[arg-type]

    # -- concurrency -------------------------------------------------------------------------

    async def test_a_forget_during_a_catch_up_and_a_command(self, store: PersonalStore) -> None:
        """A forget while a projection catches up over the subject's events and commands
        fold them: nothing fails to decode, the projection runs to the end, commands after
        the forget are refused, and nothing plain of the subject is stored afterwards."""
        await store.append("customer-1", [registered("customer-1")])
        await store.append("customer-2", [registered("customer-2", BOB_EMAIL, BOB_NAME)])
        cache = StateCache()
        for n in range(40):
            await execute(store, ChangePlan("customer-1", f"plan-{n}"), registry=registry)
        seen: dict[str, str | None] = {}
        applied = 0
        halfway = trio.Event()
        forgot = trio.Event()

        @projector("mail", event_types=["CustomerRegistered", "PlanChanged", SUBJECT_FORGOTTEN])
        async def mail(event: RecordedEvent, ctx: ProjectionContext) -> None:
            nonlocal applied
            if event.type == SUBJECT_FORGOTTEN:
                seen.pop(event.data["subject"], None)
            else:
                seen[event.data["customer"]] = event.data.get("email")
            applied += 1
            if applied == 20:
                # Halfway through the catch-up, the forget runs: this batch waits for it,
                # so the run goes on after it on any backend, however fast it catches up.
                halfway.set()
                await forgot.wait()
            await trio.lowlevel.checkpoint()

        refused = 0

        async def decide_until_refused() -> None:
            nonlocal refused
            while refused == 0:
                try:
                    await execute(
                        store, ChangePlan("customer-1", "gold"), registry=registry, cache=cache
                    )
                except SubjectForgottenError:
                    refused += 1

        applied_at_forget = 0

        async def forget_halfway() -> None:
            nonlocal applied_at_forget
            await halfway.wait()
            await store.forget("customer-1")
            applied_at_forget = applied
            forgot.set()

        config = ProjectionConfig(batch_size=5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forget_halfway)
            nursery.start_soon(decide_until_refused)
            await run_projection(store, mail, config)
        assert forgot.is_set()
        assert applied_at_forget < applied  # the run went on after the forget
        assert refused == 1
        await run_projection(store, mail, config)  # on to the SubjectForgotten event
        assert seen == {"customer-2": BOB_EMAIL}
        events = await read_all(store)
        assert all(e.forgotten == ("email",) for e in events if e.type == "PlanChanged")
        [record] = await store.forget_records()
        assert not [e for e in events if e.position > record.position and e.personal]
        cached = cache.get(store, "Customer", "customer-1")
        assert cached is None
        await self.assert_nothing_plain(store, ADA_EMAIL, ADA_NAME)
