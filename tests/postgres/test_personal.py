"""Personal data on PostgreSQL (issue 29, part 2; decision record 15): the contract, and what
only a database shows: a full ``pg_dump`` holds no personal value, keys made by two stores
at once agree, a forget in one process is seen by the reads of another, a forget and an
append of the same subject are ordered, the key table's rows are never revived, older
clients' append functions still work."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from eventcore_trio import (
    ConfigurationError,
    DatabaseError,
    EventDecodeError,
    EventRegistry,
    NewEvent,
    RecordedEvent,
    Snapshot,
    StreamAppend,
    SubjectForgottenError,
    UndecodableEvent,
)
from eventcore_trio.postgres import PostgresStore, open_postgres_store
from eventcore_trio.projection import (
    Failure,
    FailureStrategy,
    ProjectionContext,
    projector,
    run_projection,
)
from eventcore_trio.testing import EmbeddedPostgres, PersonalDataContract, PostgresHarness

pytestmark = pytest.mark.trio

Opener = Callable[..., AbstractAsyncContextManager[PostgresStore]]


def _pg_dump(server: EmbeddedPostgres | str) -> Path:
    # The pg_dump of the server's own installation: a dump tool older than the server
    # refuses to run.
    bindir = server.bindir if isinstance(server, EmbeddedPostgres) else None
    if bindir is not None and (Path(bindir) / "pg_dump").exists():
        return Path(bindir) / "pg_dump"
    found = shutil.which("pg_dump")
    if found is None:
        pytest.skip("no pg_dump for this server")
    return Path(found)


async def dump(server: EmbeddedPostgres | str, dsn: str, *schema: str) -> str:
    """``pg_dump --data-only`` of the whole database (or of *schema*), as text."""
    args = [str(_pg_dump(server)), "--data-only", "--no-owner", "--dbname", dsn]
    args += [f"--schema={name}" for name in schema]
    result = await trio.run_process(args, capture_stdout=True, capture_stderr=True)
    return result.stdout.decode()


@pytest.fixture
def opener(harness: PostgresHarness) -> Opener:
    """Opens a store on the harness's one schema with the KEK given."""

    def open_store(*, key_encryption_key: Any) -> AbstractAsyncContextManager[PostgresStore]:
        return open_postgres_store(
            harness.dsn,
            schema=harness.schema,
            max_pool_size=4,
            key_encryption_key=key_encryption_key,
        )

    return open_store


class TestPostgresPersonal(PersonalDataContract):
    """The personal-data contract on `open_postgres_store` (every server under test)."""

    @pytest.fixture
    def open_store(self, opener: Opener) -> Any:
        """Stores on one shared schema."""
        return opener

    @pytest.fixture(autouse=True)
    def _server(self, postgres_server: EmbeddedPostgres | str, postgres_dsn: str) -> None:
        self._pg_server, self._dsn = postgres_server, postgres_dsn

    async def stored_text(self, store: Any) -> str:
        """Everything the store's schema holds: its ``pg_dump --data-only``."""
        assert isinstance(store, PostgresStore)
        return await dump(self._pg_server, self._dsn, store.schema)


# -- beyond the contract ---------------------------------------------------------------------


def _secret() -> str:
    # Unique to this run: no other test's data can hold it.
    return f"secret-{uuid.uuid4().hex}"


def _personal(subject: str, email: str, name: str) -> NewEvent:
    return NewEvent(
        "CustomerRegistered",
        {"customer": subject, "email": email, "name": name, "plan": "basic"},
        subject=subject,
        personal=["email", "name"],
    )


@pytest.fixture
async def kek_store(opener: Opener) -> AsyncIterator[tuple[bytes, PostgresStore]]:
    """A store with a fresh KEK, and the KEK."""
    kek = os.urandom(32)
    async with opener(key_encryption_key=kek) as store:
        yield kek, store


async def test_a_full_dump_holds_no_personal_value(
    kek_store: tuple[bytes, PostgresStore],
    postgres_server: EmbeddedPostgres | str,
    postgres_dsn: str,
) -> None:
    """After appends on every write path, a snapshot, a dead letter and a forget, a
    ``pg_dump --data-only`` of the whole database holds none of the values, and every event
    is still readable (without them, once forgotten)."""
    _, store = kek_store
    email, name, other = _secret(), _secret(), _secret()
    subject = f"c-{uuid.uuid4().hex[:8]}"
    await store.append(subject, [_personal(subject, email, name)])
    await store.append_atomic([StreamAppend(subject, [_personal(subject, email, other)])])
    await store.append_tagged([_personal(subject, email, name)])
    async with store.transaction() as tx:
        await tx.append(subject, [_personal(subject, other, name)])
    [*_, last] = await store.read_stream(subject)
    await store.write_snapshot(
        Snapshot(
            subject,
            "customer",
            1,
            last.stream_version,
            {"email": email, "name": name},
            event_id=last.event_id,
            event_recorded_at=last.recorded_at,
        )
    )
    snapshot = await store.read_snapshot(subject, "customer")
    assert snapshot is not None
    assert snapshot.data == {"email": email, "name": name}

    def skip(failure: Failure) -> FailureStrategy:
        return FailureStrategy.SKIP

    @projector(name=f"fails_{uuid.uuid4().hex[:8]}", on_error=skip)
    async def fails(event: RecordedEvent, ctx: ProjectionContext) -> None:
        raise ValueError("no")

    await run_projection(store, fails)
    letters = await store.dead_letters(fails.name)
    assert letters
    assert isinstance(letters[0].event, RecordedEvent)
    assert letters[0].event.data["email"] == email  # opened when listed

    before = await dump(postgres_server, postgres_dsn)
    assert subject in before
    for value in (email, name, other):
        assert value not in before

    await store.forget(subject)
    after = await dump(postgres_server, postgres_dsn)
    for value in (email, name, other):
        assert value not in after
    events = await store.read_events(None, limit=100)
    mine = [e for e in events if e.subject == subject]
    assert len(mine) == 5  # four appends and the SubjectForgotten event
    assert all("email" not in e.data and e.forgotten for e in mine if e.personal)
    assert await store.read_snapshot(subject, "customer") is None
    listed = await store.dead_letters(fails.name)
    assert [letter.id for letter in listed] == [letter.id for letter in letters]
    assert all(
        isinstance(letter.event, RecordedEvent) and letter.event.forgotten == ("email", "name")
        for letter in listed
        if letter.event.stream_id == subject and letter.event.type == "CustomerRegistered"
    )


async def test_an_envelope_moved_from_another_event_is_found_when_read(
    kek_store: tuple[bytes, PostgresStore],
) -> None:
    """An envelope copied in the table from another subject's event: the event reads,
    reading its data raises `EventDecodeError`; a projection reading it hands the failure to
    `on_error` (here a dead letter, which keeps the fields sealed and lists the event as
    undecodable); a projection never reading data runs over it to the end."""
    _, store = kek_store
    ada, bob = f"c-{uuid.uuid4().hex[:8]}", f"c-{uuid.uuid4().hex[:8]}"
    await store.append(ada, [_personal(ada, _secret(), _secret())])
    await store.append(bob, [_personal(bob, _secret(), _secret())])
    events = f'"{store.schema}".events'
    await store.admin.execute(
        # One implicit transaction: the trigger that refuses updates is off only for it.
        f"BEGIN; ALTER TABLE {events} DISABLE TRIGGER events_immutable; "
        f"UPDATE {events} SET data = jsonb_set(data, '{{email}}', "
        f"(SELECT data -> 'email' FROM {events} WHERE stream_id = '{bob}')) "
        f"WHERE stream_id = '{ada}'; "
        f"ALTER TABLE {events} ENABLE TRIGGER events_immutable; COMMIT"
    )
    [moved] = await store.read_stream(ada)
    assert (moved.subject, moved.forgotten) == (ada, ())
    with pytest.raises(EventDecodeError, match="personal fields") as caught:
        moved.data  # noqa: B018  (the read is the test)
    assert caught.value.position == moved.position
    failures: list[Failure] = []

    def skip(failure: Failure) -> FailureStrategy:
        failures.append(failure)
        return FailureStrategy.SKIP

    @projector(name=f"reads_{uuid.uuid4().hex[:8]}", on_error=skip)
    async def reads(event: RecordedEvent, ctx: ProjectionContext) -> None:
        assert event.data.get("email")

    @projector(name=f"counts_{uuid.uuid4().hex[:8]}")
    async def counts(event: RecordedEvent, ctx: ProjectionContext) -> None:
        assert event.subject in (ada, bob)

    last = await store.last_position()
    for each in (reads, counts):
        assert (await run_projection(store, each)).checkpoint == last
    assert [type(f.error) for f in failures] == [EventDecodeError]
    [letter] = await store.dead_letters(reads.name)
    assert isinstance(letter.event, UndecodableEvent)
    assert letter.event.position == moved.position
    assert "do not open" in letter.event.error


async def test_two_stores_agree_on_a_subject_s_first_key(opener: Opener) -> None:
    """Two stores (two pools, as two processes) make a new subject's first key at once:
    one key wins, and both stores' events open."""
    kek = os.urandom(32)
    subject = f"c-{uuid.uuid4().hex[:8]}"
    async with opener(key_encryption_key=kek) as a, opener(key_encryption_key=kek) as b:
        async with trio.open_nursery() as nursery:
            for store in (a, b) * 4:
                nursery.start_soon(store.append, subject, [_personal(subject, "e", "n")])
        for store in (a, b):
            events = await store.read_stream(subject)
            assert len(events) == 8
            assert {e.data["email"] for e in events} == {"e"}
        count = await a.admin.fetchval(
            f'SELECT count(*) FROM "{a.schema}".subject_keys WHERE subject = $1', subject
        )
        assert count == 1


async def test_a_forget_in_another_store_is_seen_by_the_next_read(opener: Opener) -> None:
    """Reads ask for the page's keys each time: a store that read a subject's fields reads
    them forgotten right after another store forgot it, and its appends are refused, though
    it remembers the subject's key for sealing."""
    kek = os.urandom(32)
    subject = f"c-{uuid.uuid4().hex[:8]}"
    async with opener(key_encryption_key=kek) as a, opener(key_encryption_key=kek) as b:
        await a.append(subject, [_personal(subject, "e", "n")])
        [event] = await a.read_stream(subject)
        assert event.data["email"] == "e"
        await b.forget(subject)
        [event, *_] = await a.read_stream(subject)
        assert event.forgotten == ("email", "name")
        [page_event, *_] = [e for e in await a.read_events(None, limit=100) if e.personal]
        assert page_event.forgotten == ("email", "name")
        # Refused by the append function: this store's sealing still has the key.
        with pytest.raises(SubjectForgottenError) as raised:
            await a.append(subject, [_personal(subject, "e", "n")])
        assert raised.value.subject == subject
        with pytest.raises(DatabaseError, match="rolled back"):  # noqa: PT012
            async with a.transaction() as tx:
                with pytest.raises(SubjectForgottenError):
                    await tx.append(subject, [_personal(subject, "e", "n")])


async def test_a_forget_and_an_append_are_ordered(opener: Opener) -> None:
    """An append of a subject's personal data that holds its transaction open while another
    store forgets the subject: the forget waits for it, and its events are forgotten with
    the rest; an append that starts after the forget took the key's row is refused."""
    kek = os.urandom(32)
    subject = f"c-{uuid.uuid4().hex[:8]}"
    async with opener(key_encryption_key=kek) as a, opener(key_encryption_key=kek) as b:
        await a.append(subject, [_personal(subject, "e", "n")])
        forgotten = trio.Event()

        async def forget() -> None:
            await b.forget(subject)
            forgotten.set()

        async with trio.open_nursery() as nursery, a.transaction() as tx:
            await tx.append(subject, [_personal(subject, "e2", "n2")])
            nursery.start_soon(forget)
            # The forget's append waits for the lock this transaction's append holds shared
            # (its subject's forget stream): poll until the server shows it waiting.
            while not await a.admin.fetchval(  # noqa: ASYNC110  (another session's wait)
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory' "
                "AND datname = current_database() AND query LIKE '%append_events%'"
            ):
                await trio.sleep(0.01)
            assert not forgotten.is_set()
        assert forgotten.is_set()
        events = await a.read_stream(subject)
        assert len(events) == 2
        assert all(e.forgotten == ("email", "name") for e in events)
        with pytest.raises(SubjectForgottenError):
            await b.append(subject, [_personal(subject, "e3", "n3")])


async def test_key_rows_are_never_revived_or_deleted(
    kek_store: tuple[bytes, PostgresStore],
) -> None:
    """A forgotten subject's row is its audit and its refusal: no statement brings its key
    back or deletes it."""
    _, store = kek_store
    await store.append("c", [_personal("c-1", "e", "n")])
    await store.forget("c-1")
    keys = f'"{store.schema}".subject_keys'
    for sql in (
        f"UPDATE {keys} SET wrapped_key = 'x', forgotten_at = NULL",
        f"DELETE FROM {keys}",
        f"TRUNCATE {keys}",
    ):
        with pytest.raises(DatabaseError, match=r"forgotten|never deleted"):
            await store.admin.execute(sql)
    [record] = await store.forget_records("c-1")
    assert record.subject == "c-1"


async def test_a_wrong_key_encryption_key_is_refused_at_open(opener: Opener) -> None:
    """With a key stored, a store opened with another KEK is refused at open, naming what
    to do."""
    async with opener(key_encryption_key=os.urandom(32)) as store:
        await store.append("c", [_personal("c-1", "e", "n")])
    with pytest.raises(ConfigurationError, match="key-encryption key"):
        async with opener(key_encryption_key=os.urandom(32)):
            pass


async def test_older_clients_append_functions_still_work(
    kek_store: tuple[bytes, PostgresStore],
) -> None:
    """Migration 8's and 5's append functions (a client of an earlier version during an
    upgrade) append as before, with no subject."""
    _, store = kek_store
    s = f'"{store.schema}"'
    await store.admin.execute(
        f"SELECT * FROM {s}.append_events(ARRAY['old-8'], ARRAY[0::bigint], ARRAY[1], NULL, "
        "NULL, NULL, ARRAY['Old'], ARRAY['{}'::jsonb], NULL, NULL::text[])"
    )
    await store.admin.execute(
        f"SELECT * FROM {s}.append_events(ARRAY['old-5'], ARRAY[0::bigint], ARRAY[1], NULL, "
        "NULL, NULL, ARRAY['Old'], ARRAY['{}'::jsonb], NULL)"
    )
    for stream in ("old-8", "old-5"):
        [event] = await store.read_stream(stream)
        assert (event.type, event.subject, event.personal) == ("Old", None, ())


async def test_the_append_function_refuses_malformed_subjects(
    kek_store: tuple[bytes, PostgresStore],
) -> None:
    """Arrays of subjects and personal names that do not match the events are refused."""
    _, store = kek_store
    s = f'"{store.schema}"'
    with pytest.raises(DatabaseError, match="p_subject and p_personal"):
        await store.admin.execute(
            f"SELECT * FROM {s}.append_events(ARRAY['m'], ARRAY[0::bigint], ARRAY[1], NULL, "
            "NULL, NULL, ARRAY['T'], ARRAY['{}'::jsonb], NULL, NULL, ARRAY['a', 'b'], "
            "ARRAY['', ''])"
        )
    with pytest.raises(DatabaseError, match="without a subject"):
        await store.admin.execute(
            f"SELECT * FROM {s}.append_events(ARRAY['m'], ARRAY[0::bigint], ARRAY[1], NULL, "
            "NULL, NULL, ARRAY['T'], ARRAY['{}'::jsonb], NULL, NULL, ARRAY[NULL::text], "
            "ARRAY['email'])"
        )


async def test_error_texts_keep_no_personal_value(
    kek_store: tuple[bytes, PostgresStore],
    postgres_server: EmbeddedPostgres | str,
    postgres_dsn: str,
) -> None:
    """A typed event whose personal value fails its class's validator: the decode error the
    library writes (a dead letter's text) names the field's error type, never the value; a
    handler's own error that quotes a value is kept until the subject is forgotten, and the
    forget removes that text too (found by an attack review)."""
    _, store = kek_store
    email = _secret()
    subject = f"c-{uuid.uuid4().hex[:8]}"
    registry = EventRegistry()

    @registry.register("CustomerRegistered", subject="customer", personal=["email", "name"])
    @attrs.frozen
    class Registered:
        customer: str
        plan: str
        email: str = attrs.field(default="", validator=attrs.validators.matches_re(r".+@x\.org"))
        name: str = ""

    await store.append(subject, [_personal(subject, email, "ada")])

    def skip(failure: Failure) -> FailureStrategy:
        return FailureStrategy.SKIP

    @projector(name=f"typed_{uuid.uuid4().hex[:8]}", on_error=skip, registry=registry)
    async def typed(event: Registered, ctx: ProjectionContext) -> None:
        pass

    @projector(name=f"quotes_{uuid.uuid4().hex[:8]}", on_error=skip)
    async def quotes(event: RecordedEvent, ctx: ProjectionContext) -> None:
        raise ValueError(f"cannot mail {event.data['email']}")

    await run_projection(store, typed)
    await run_projection(store, quotes)
    [decode_letter] = await store.dead_letters(typed.name)
    assert "Registered (ValueError (its text is left out" in decode_letter.error_message
    assert email not in decode_letter.error_message
    [quoted] = await store.dead_letters(quotes.name)
    assert email in quoted.error_message  # the handler's own text, until the forget
    await store.forget(subject)
    [quoted] = await store.dead_letters(quotes.name)
    assert email not in quoted.error_message
    assert email not in await dump(postgres_server, postgres_dsn)
