"""Attacks on personal data sealed in one envelope per event and opened when `data` is first
read (issue 29), on PostgreSQL: the ``events`` columns altered behind the library, the
command line meeting an envelope that does not open, and forgets by another process racing
reads, folds and dead letters. A test here that fails is a hole found, named in its
docstring. The memory-store and unit attacks are in tests/test_personal_attack.py."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from eventcore_trio import (
    EventDecodeError,
    NewEvent,
    RecordedEvent,
    SubjectForgottenError,
    UndecodableEvent,
    execute,
    open_postgres_store,
)
from eventcore_trio._personal._keys import KEY_ENCRYPTION_KEY_VARIABLE
from eventcore_trio.cli import EXIT_FAILED, EXIT_OK, main
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.projection import (
    Failure,
    FailureStrategy,
    ProjectionContext,
    projector,
    run_projection,
)
from eventcore_trio.testing import PostgresHarness

from .test_personal import _personal, _secret


def _subject() -> str:
    return f"c-{uuid.uuid4().hex[:8]}"


def _registered(subject: str, email: str) -> NewEvent:
    return _personal(subject, email, _secret())


@pytest.fixture
def kek() -> bytes:
    """A fresh key-encryption key."""
    return os.urandom(32)


def _open(harness: PostgresHarness, kek: bytes) -> Any:
    return open_postgres_store(
        harness.dsn, schema=harness.schema, max_pool_size=3, key_encryption_key=kek
    )


@pytest.fixture
async def store(harness: PostgresHarness, kek: bytes) -> AsyncIterator[PostgresStore]:
    """A store on a fresh schema, with the key-encryption key `kek`."""
    async with _open(harness, kek) as store:
        yield store


async def _update_events(store: PostgresStore, assignment: str, stream_id: str) -> None:
    """``UPDATE events SET assignment WHERE stream_id = ...``, past the trigger that refuses
    updates (off for one implicit transaction): what an operator could do."""
    events = f'"{store.schema}".events'
    await store.admin.execute(
        f"BEGIN; ALTER TABLE {events} DISABLE TRIGGER events_immutable; "
        f"UPDATE {events} SET {assignment} WHERE stream_id = '{stream_id}'; "
        f"ALTER TABLE {events} ENABLE TRIGGER events_immutable; COMMIT"
    )


async def _read_back(store: PostgresStore, stream_id: str) -> object:
    """The data the stream's one event reads as, or the type of the refusal."""
    [event] = [
        e
        for e in await store.read_events(None, limit=100, undecodable="include")
        if e.stream_id == stream_id
    ]
    if isinstance(event, UndecodableEvent):
        return UndecodableEvent
    try:
        return event.data
    except EventDecodeError:
        return EventDecodeError


# -- the events table altered ----------------------------------------------------------------


async def test_the_declaration_removed_in_the_table(store: PostgresStore) -> None:
    """``UPDATE events SET personal = '{}'``: the event reads as one without personal
    fields, the envelope and the marker as stored (documented limit: the declaration is
    trusted; no personal value shows)."""
    subject, email = _subject(), _secret()
    await store.append(subject, [_registered(subject, email)])
    await _update_events(store, "personal = '{}'", subject)
    read = await _read_back(store, subject)
    assert isinstance(read, dict)
    assert str(read["email"]).startswith("$sealed:1:")
    assert email not in str(read)


async def test_the_columns_changed_otherwise(store: PostgresStore) -> None:
    """The names renamed or reordered, the subject changed to another subject with a key:
    never other values. The subject changed to one without a key: read as forgotten, the
    fields left out (documented here: nothing leaks, nothing fails)."""
    ada, bob = _subject(), _subject()
    await store.append(ada, [_registered(ada, _secret())])
    await store.append(bob, [_registered(bob, _secret())])
    for assignment in ("personal = '{email,nick}'", "personal = '{name,email}'"):
        await _update_events(store, assignment, ada)
        assert await _read_back(store, ada) in (UndecodableEvent, EventDecodeError)
    await _update_events(store, f"personal = '{{email,name}}', subject = '{bob}'", ada)
    assert await _read_back(store, ada) is EventDecodeError
    await _update_events(store, "subject = 'c-nobody'", ada)
    assert await _read_back(store, ada) == {"customer": ada, "plan": "basic"}


async def test_an_envelope_from_the_subject_s_other_event(store: PostgresStore) -> None:
    """The envelope of another event of the same subject, with the same personal names,
    copied in the table: bound to its event, it does not open."""
    subject, first, second = _subject(), _secret(), _secret()
    await store.append(subject, [_registered(subject, first), _registered(subject, second)])
    events = f'"{store.schema}".events'
    await store.admin.execute(
        f"BEGIN; ALTER TABLE {events} DISABLE TRIGGER events_immutable; "
        f"UPDATE {events} SET data = jsonb_set(data, '{{email}}', (SELECT data -> 'email' "
        f"FROM {events} WHERE stream_id = '{subject}' AND stream_version = 2)) "
        f"WHERE stream_id = '{subject}' AND stream_version = 1; "
        f"ALTER TABLE {events} ENABLE TRIGGER events_immutable; COMMIT"
    )
    moved, kept = await store.read_stream(subject)
    assert kept.data["email"] == second
    with pytest.raises(EventDecodeError):
        moved.data  # noqa: B018


def test_a_query_meeting_an_envelope_that_does_not_open_exits_1(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """HOLE: ``eventcore-trio query`` over an event whose envelope does not open. Before,
    the read raised `EventDecodeError` and the command said "a matching event at P does not
    decode" and exited 1 (tests/test_cli_query.py has it for an undecodable event); now the
    read succeeds, printing the event opens it, and the error reaches the generic handler:
    exit 2, the code of bad usage."""
    kek = os.urandom(32)
    monkeypatch.setenv(KEY_ENCRYPTION_KEY_VARIABLE, base64.b64encode(kek).decode())
    schema = f"t_{uuid.uuid4().hex[:12]}"
    where = ["--dsn", postgres_dsn, "--schema", schema]
    assert main(["migrate", *where]) == EXIT_OK
    subject = _subject()

    async def prepare() -> None:
        async with open_postgres_store(postgres_dsn, schema=schema, key_encryption_key=kek) as s:
            await s.append(subject, [_registered(subject, _secret())])
            # Sealed under another subject's key: there, but does not open.
            other = _subject()
            await s.append(other, [_registered(other, _secret())])
            events = f'"{schema}".events'
            await s.admin.execute(
                f"BEGIN; ALTER TABLE {events} DISABLE TRIGGER events_immutable; "
                f"UPDATE {events} SET data = jsonb_set(data, '{{email}}', (SELECT data -> "
                f"'email' FROM {events} WHERE stream_id = '{other}')) "
                f"WHERE stream_id = '{subject}'; "
                f"ALTER TABLE {events} ENABLE TRIGGER events_immutable; COMMIT"
            )

    trio.run(prepare)
    capsys.readouterr()
    code = main(["query", "--type", "CustomerRegistered", *where])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert (code, "does not decode" in captured.err) == (EXIT_FAILED, True), captured.err


# -- forgets by another process -------------------------------------------------------------


@pytest.fixture
async def other_process(harness: PostgresHarness, kek: bytes) -> AsyncIterator[PostgresStore]:
    """A second store on the same schema (its own pool): another process."""
    async with _open(harness, kek) as store:
        yield store


async def test_an_event_read_before_a_forget_elsewhere(
    store: PostgresStore, other_process: PostgresStore
) -> None:
    """Documented: an event read before another process's forget opens after it to the
    plain values (it holds its subject's key until then, as this process's key cache
    may); the next read comes without them."""
    subject, email = _subject(), _secret()
    await store.append(subject, [_registered(subject, email)])
    [before] = await store.read_stream(subject)
    await other_process.forget(subject)
    [after] = await store.read_stream(subject)
    assert after.forgotten == ("email", "name")
    assert before.data["email"] == email


async def test_a_command_folding_after_a_forget_elsewhere(
    store: PostgresStore, other_process: PostgresStore, harness: PostgresHarness
) -> None:
    """A command whose read came before another process's forget and whose fold after it:
    it folds the plain values, and writing them as personal data is refused; the events
    table holds no plain value of the subject."""
    subject, email = _subject(), _secret()
    await store.append(subject, [_registered(subject, email)])

    class ForgetsAfterReading:
        async def read_stream(self, stream_id: str) -> list[RecordedEvent]:
            events: list[RecordedEvent] = await store.read_stream(stream_id)
            await other_process.forget(subject)
            return events

        async def append_atomic(self, appends: Any) -> Any:
            return await store.append_atomic(appends)

    class CopyEmail:
        def __init__(self) -> None:
            self.folded: list[str] = []

        def streams(self) -> list[str]:
            return [subject]

        def initial_state(self) -> str | None:
            return None

        def evolve(self, state: str | None, event: RecordedEvent) -> str | None:
            email = event.data.get("email", state)
            self.folded.append(str(email))
            return email

        def decide(self, state: str | None) -> dict[str, list[NewEvent]]:
            copied = NewEvent(
                "Copied", {"email": state or "none"}, subject=subject, personal=["email"]
            )
            return {f"copies-{subject}": [copied]}

    command = CopyEmail()
    with pytest.raises(SubjectForgottenError):
        await execute(ForgetsAfterReading(), command)  # type: ignore[arg-type]
    assert command.folded == [email]
    stored = await store.admin.fetch(
        f'SELECT data::text AS data FROM "{harness.schema}".events WHERE subject = $1', subject
    )
    assert stored
    assert not [row for row in stored if email in row["data"]]


async def test_a_dead_letter_written_after_a_forget_elsewhere(
    store: PostgresStore, other_process: PostgresStore
) -> None:
    """HOLE: a projection applying an event read before another process's forget reads its
    plain values after it, and its handler's error quotes one; the letter commits after the
    forget replaced the texts of the subject's letters, and keeps the value in plain."""
    subject, email = _subject(), _secret()
    await store.append(subject, [_registered(subject, email)])
    reading, forgot = trio.Event(), trio.Event()

    def skip(failure: Failure) -> FailureStrategy:
        return FailureStrategy.SKIP

    @projector(name=f"quotes_{uuid.uuid4().hex[:8]}", on_error=skip)
    async def quotes(event: RecordedEvent, ctx: ProjectionContext) -> None:
        if event.type != "CustomerRegistered":
            return
        reading.set()
        await forgot.wait()
        raise ValueError(f"no mailbox for {event.data['email']}")

    async def forget_while_it_applies() -> None:
        await reading.wait()
        await other_process.forget(subject)
        forgot.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(forget_while_it_applies)
        assert (await run_projection(store, quotes)).dead_letters == 1
    [letter] = await store.dead_letters(quotes.name)
    assert email not in letter.error_message


# -- dead letters of events handed over unopened ---------------------------------------------


def _failing(subject: str, *, opens: bool) -> Any:
    """A projector (skipping failures) whose handler fails on every event, after reading
    the data of *subject*'s when *opens*."""

    def skip(failure: Failure) -> FailureStrategy:
        return FailureStrategy.SKIP

    @projector(name=f"fails_{uuid.uuid4().hex[:8]}", on_error=skip)
    async def fails(event: RecordedEvent, ctx: ProjectionContext) -> None:
        if event.subject == subject and opens:
            assert event.data["email"]
        raise ValueError("no")

    return fails


async def _letter_of(
    store: PostgresStore, name: str, subject: str
) -> RecordedEvent | UndecodableEvent:
    [letter] = [e for e in await store.dead_letters(name) if e.event.stream_id == subject]
    return letter.event


async def test_a_letter_is_the_same_whether_its_handler_opened_the_event(
    store: PostgresStore,
) -> None:
    """A handler failing before it reads data (the event unopened) and one failing after
    (opened): neither letter stores a plain value, and both list the same opened event."""
    subject, email = _subject(), _secret()
    await store.append(subject, [_registered(subject, email)])
    listed = []
    for opens in (False, True):
        fails = _failing(subject, opens=opens)
        await run_projection(store, fails)
        listed.append(await _letter_of(store, fails.name, subject))
    stored = await store.admin.fetch(
        f'SELECT data::text FROM "{store.schema}".dead_letters WHERE subject = $1', subject
    )
    assert len(stored) == 2
    assert not [row for row in stored if email in row["data"]]
    unopened, opened = listed
    assert isinstance(opened, RecordedEvent)
    assert unopened == opened
    assert opened.data["email"] == email


async def test_a_letter_whose_subject_was_removed(store: PostgresStore) -> None:
    """HOLE: ``UPDATE dead_letters SET subject = NULL`` (the names kept): the letter
    listed as a decoded event whose data held the envelope and the marker as if they were
    the values, where the events table reads such a row as undecodable."""
    subject = _subject()
    await store.append(subject, [_registered(subject, _secret())])
    fails = _failing(subject, opens=False)
    await run_projection(store, fails)
    await store.admin.execute(
        f'UPDATE "{store.schema}".dead_letters SET subject = NULL WHERE stream_id = $1', subject
    )
    letter = await _letter_of(store, fails.name, subject)
    assert isinstance(letter, UndecodableEvent)
    assert "without a subject" in letter.error
