"""Personal data on PostgreSQL (migration 9, decision record 15): sealing appends, opening
what is read, sealed snapshots and dead letters, forgetting a subject, rewrapping the keys.

The ``subject_keys`` table holds each subject's data key wrapped by the key-encryption key
(KEK); this process keeps the plain keys it made or unwrapped in the `Keyring`, by their
wrapped bytes. Two caches, with different rules:

* Sealing remembers each subject's wrapped key (it never changes but by `rewrap`, and a
  forget only deletes it): a key another process forgot is caught by the append function,
  which refuses the append (`SubjectForgottenError`), holding the lock that the forget
  takes exclusively (``check_subjects``, migration 9).
* Reading never trusts a cache to know whether a key still exists: each page of events
  (and each snapshot or dead-letter listing) with personal fields asks the table for its
  subjects' wrapped keys, one statement per page. A forget in another process is seen by
  the next read; the plain keys come from the `Keyring` by wrapped bytes, so a deleted key
  is not found through it.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, final

import attrs
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .._errors import ConfigurationError, SubjectForgottenError, SubjectNotFound
from .._events import NewEvent, RecordedEvent, StreamAppend, prepare_appends
from .._personal._envelope import (
    open_recorded,
    open_snapshot,
    seal_event,
    seal_snapshot,
    snapshot_subjects,
)
from .._personal._fields import forgotten_stream
from .._personal._forget import REDACTED_ERROR, ForgetRecord, forgotten_event, this_process
from .._personal._keys import DEFAULT_CACHED_KEYS, Keyring, resolve_key_encryption_key
from .._positions import Position, position_parts
from .._status import DeadLetter
from .._validation import encode_json_object
from ._pool import Pool
from ._queries import retry_deadlock
from ._reads import Keys
from ._transaction import PostgresTransaction

# The columns of a subject's row in `subject_keys` that make its `ForgetRecord`.
_RECORD_COLUMNS: Final = (
    "subject, forgotten_at, forgotten_host, forgotten_pid, forgotten_tx, forgotten_position"
)
_NO_KEYS: Final[Keys] = {}


def _has_personal(appends: Any) -> bool:
    # Plain appends pay this scan only; a malformed request is left for encode to refuse.
    try:
        return any(e.personal for a in appends for e in a.events)
    except (AttributeError, TypeError):
        return False


class _Raced(Exception):
    # Another process forgot the subject between this one's look and its update.
    pass


@final
class PersonalData:
    """The personal-data statements of one schema, and this process's keys."""

    def __init__(self, pool: Pool, schema: str, keyring: Keyring) -> None:
        self._pool = pool
        self.keyring = keyring
        keys = f'"{schema}".subject_keys'
        events = f'"{schema}".events'
        self._snapshots = f'"{schema}".snapshots'
        self._dead_letters = f'"{schema}".dead_letters'
        self._keys = keys
        # Subject -> its wrapped key, for sealing only (see the module's docstring).
        self._sealing: OrderedDict[str, bytes] = OrderedDict()
        self._select = f"SELECT subject, wrapped_key FROM {keys} WHERE subject = ANY($1::text[])"
        self._insert = (
            f"INSERT INTO {keys} (subject, wrapped_key) "
            "SELECT * FROM unnest($1::text[], $2::bytea[]) ON CONFLICT DO NOTHING"
        )
        # The subjects whose personal events a stream holds, and their wrapped keys (NULL:
        # forgotten): a snapshot of the stream is sealed under all of them.
        self._stream_keys = (
            f"SELECT DISTINCT e.subject, k.wrapped_key, k.subject IS NOT NULL AS known "
            f"FROM {events} AS e LEFT JOIN {keys} AS k ON k.subject = e.subject "
            "WHERE e.stream_id = $1 AND e.subject IS NOT NULL AND e.personal <> '{}'"
        )
        self._subject_streams = (
            f"SELECT DISTINCT stream_id FROM {events} WHERE subject = $1 AND personal <> '{{}}'"
        )
        self._forget = (
            f"UPDATE {keys} SET wrapped_key = NULL, forgotten_at = $2, forgotten_host = $3, "
            "forgotten_pid = $4, forgotten_tx = $5, forgotten_position = $6 "
            "WHERE subject = $1 AND wrapped_key IS NOT NULL RETURNING subject"
        )
        self._records = f"SELECT {_RECORD_COLUMNS} FROM {keys} WHERE wrapped_key IS NULL"
        self._live = f"SELECT subject, wrapped_key FROM {keys} WHERE wrapped_key IS NOT NULL"
        self._rewrap = (
            f"UPDATE {keys} AS k SET wrapped_key = n.new "
            "FROM unnest($1::text[], $2::bytea[], $3::bytea[]) AS n(subject, old, new) "
            "WHERE k.subject = n.subject AND k.wrapped_key = n.old"
        )

    # -- the KEK ---------------------------------------------------------------------------

    async def check_key_encryption_key(self) -> None:
        """Unwrap one stored key, if there is one: a wrong KEK is refused at open.

        Raises:
            ConfigurationError: the store's KEK does not unwrap it.
        """
        if not self.keyring.configured:
            return
        row = await self._pool.fetchrow(self._live + " LIMIT 1")
        if row is not None:
            await self.keyring.prefetch([(row["subject"], bytes(row["wrapped_key"]))])

    # -- appends ---------------------------------------------------------------------------

    async def seal_appends(self, appends: Sequence[StreamAppend]) -> Sequence[StreamAppend]:
        """*appends* with personal fields sealed, making subjects' keys as needed.

        Raises:
            InvalidArgument: a malformed request.
            ConfigurationError: personal fields, and no KEK (the message says what to set).
            SubjectForgottenError: personal fields of a forgotten subject.
        """
        if not _has_personal(appends):
            return appends
        requests = prepare_appends(appends)
        subjects = sorted(
            {e.subject for r in requests for e in r.events if e.personal and e.subject}
        )
        keys = await self._data_keys(subjects)
        return [
            attrs.evolve(request, events=[_sealed(e, keys) for e in request.events])
            for request in requests
        ]

    async def _data_keys(self, subjects: list[str]) -> dict[str, AESGCM]:
        wrapped = {s: self._sealing[s] for s in subjects if s in self._sealing}
        missing = [s for s in subjects if s not in wrapped]
        if missing:
            found = await self._stored(missing)
            made: dict[str, bytes] = {}
            for subject in missing:
                if subject not in found:
                    made[subject], _ = await self.keyring.new_key(subject)
            if made:
                # Two processes making the first key of a subject at once: the first insert
                # wins, and both read it back.
                await self._pool.execute(self._insert, list(made), list(made.values()))
                found.update(await self._stored(list(made)))
                for subject, key in made.items():
                    if found.get(subject) != key:
                        self.keyring.discard(key)
            for subject in missing:
                stored = found.get(subject)
                if stored is None:
                    raise SubjectForgottenError(subject)
                wrapped[subject] = stored
                self._remember(subject, stored)
        await self.keyring.prefetch(wrapped.items())
        return {s: self.keyring.open(s, w) for s, w in wrapped.items()}

    async def _stored(self, subjects: list[str]) -> dict[str, bytes | None]:
        # The stored rows of *subjects*: the wrapped key, or None for a forgotten one.
        rows = await self._pool.fetch(self._select, subjects)
        return {
            r["subject"]: None if r["wrapped_key"] is None else bytes(r["wrapped_key"])
            for r in rows
        }

    def _remember(self, subject: str, wrapped: bytes) -> None:
        self._sealing[subject] = wrapped
        self._sealing.move_to_end(subject)
        while len(self._sealing) > DEFAULT_CACHED_KEYS:
            self._sealing.popitem(last=False)

    # -- reads -----------------------------------------------------------------------------

    async def keys_for(self, rows: Iterable[Any], *, at: int = 10) -> Keys:
        """The data keys of the subjects of *rows* that have personal fields (events rows:
        the subject at index *at*, the personal names after it), read from the table now."""
        subjects = {row[at] for row in rows if row[at + 1]}
        if not subjects:
            return _NO_KEYS
        return await self._keys_of(subjects)

    async def _keys_of(self, subjects: Collection[str]) -> dict[str, AESGCM | None]:
        stored = await self._stored(list(subjects))
        live = [(s, w) for s, w in stored.items() if w is not None]
        await self.keyring.prefetch(live)
        keys: dict[str, AESGCM | None] = dict.fromkeys(subjects)
        for subject, wrapped in live:
            keys[subject] = self.keyring.open(subject, wrapped)
        return keys

    # -- snapshots -------------------------------------------------------------------------

    async def seal_snapshot(self, stream_id: str, text: str) -> str | None:
        """A snapshot's data (JSON *text*) as kept: sealed under the keys of the subjects
        whose personal events *stream_id* holds; as it is when there are none; None (keep
        nothing) once one of them was forgotten."""
        rows = await self._pool.fetch(self._stream_keys, stream_id)
        if not rows:
            return text
        if any(row["wrapped_key"] is None for row in rows):
            return None
        live = [(row["subject"], bytes(row["wrapped_key"])) for row in rows]
        await self.keyring.prefetch(live)
        keys = [(s, self.keyring.open(s, w)) for s, w in sorted(live)]
        return encode_json_object("snapshot", seal_snapshot(text, stream_id, keys))

    async def open_snapshot(self, stream_id: str, data: dict[str, Any]) -> dict[str, Any] | None:
        """A kept snapshot's *data* opened when sealed; None when a subject's key is gone."""
        subjects = snapshot_subjects(data)
        if subjects is None:
            return data
        return open_snapshot(data, stream_id, await self._keys_of(subjects))

    # -- dead letters ----------------------------------------------------------------------

    async def open_letters(self, letters: list[DeadLetter]) -> list[DeadLetter]:
        """*letters* (read with personal fields sealed) opened, or without them once their
        subject is forgotten."""
        subjects = {
            e.subject
            for e in (letter.event for letter in letters)
            if isinstance(e, RecordedEvent) and e.personal and e.subject is not None
        }
        if not subjects:
            return letters
        keys = await self._keys_of(subjects)
        opened = []
        for letter in letters:
            event = letter.event
            if isinstance(event, RecordedEvent) and event.personal and event.subject is not None:
                letter = attrs.evolve(letter, event=open_recorded(event, keys[event.subject]))
            opened.append(letter)
        return opened

    # -- forgetting ------------------------------------------------------------------------

    async def forget(
        self,
        subject: str,
        transaction: Callable[[], AbstractAsyncContextManager[PostgresTransaction]],
    ) -> tuple[ForgetRecord, list[str]]:
        """Forget *subject* in one transaction (see `PostgresStore.forget`): its
        ``SubjectForgotten`` event, its key deleted (the row kept as the record), the
        snapshots of its streams deleted. Returns the record and the streams that hold its
        personal events; a subject forgotten already returns the first record and none.

        Raises:
            SubjectNotFound: the store never had a key of *subject*.
        """
        stored = await self._stored([subject])
        if subject not in stored:
            raise SubjectNotFound(subject)
        wrapped = stored[subject]
        if wrapped is None:
            return (await self.forget_records(subject))[0], []
        forgotten_at = dt.datetime.now(dt.UTC)
        host, pid = this_process()
        event = forgotten_event(subject, forgotten_at, host, pid)

        async def forget_once() -> tuple[Position, list[str]]:
            async with transaction() as tx:
                # The append first: it takes its stream's lock exclusively, which appends of
                # the subject's personal data hold shared (see check_subjects in migration
                # 9): those under way commit first, and its event comes after theirs; later
                # ones wait for this transaction, then find the key gone and are refused.
                result = await tx.append_atomic([StreamAppend(forgotten_stream(subject), [event])])
                assert result.position is not None  # one event
                tx_id, position = position_parts(result.position)
                if (
                    await tx.fetchrow(
                        self._forget, subject, forgotten_at, host, pid, tx_id, position
                    )
                    is None
                ):
                    raise _Raced
                streams = [r["stream_id"] for r in await tx.fetch(self._subject_streams, subject)]
                await tx.execute(
                    f"DELETE FROM {self._snapshots} WHERE stream_id = ANY($1::text[])", streams
                )
                # A handler's error may have quoted a personal value: its text goes too.
                await tx.execute(
                    f"UPDATE {self._dead_letters} SET error_message = $2 "
                    "WHERE subject = $1 AND cardinality(personal) > 0",
                    subject,
                    REDACTED_ERROR,
                )
            return result.position, streams

        try:
            # A decision holding the SubjectForgotten type's key while it appends the
            # subject's personal data can close a cycle with the forget: run it again.
            at, streams = await retry_deadlock(forget_once)
        except _Raced:
            return (await self.forget_records(subject))[0], []
        self._sealing.pop(subject, None)
        self.keyring.discard(wrapped)
        record = ForgetRecord(
            subject=subject,
            forgotten_at=forgotten_at,
            host=host,
            pid=pid,
            position=at,
        )
        return record, streams

    async def forget_records(self, subject: str | None) -> list[ForgetRecord]:
        """The forgets' records, oldest first (*subject*'s only, when given)."""
        if subject is None:
            rows = await self._pool.fetch(
                self._records + " ORDER BY forgotten_tx, forgotten_position"
            )
        else:
            rows = await self._pool.fetch(self._records + " AND subject = $1", subject)
        return [
            ForgetRecord(
                subject=row["subject"],
                forgotten_at=row["forgotten_at"],
                host=row["forgotten_host"],
                pid=row["forgotten_pid"],
                position=Position(row["forgotten_tx"], row["forgotten_position"]),
            )
            for row in rows
        ]

    # -- rotation --------------------------------------------------------------------------

    async def rewrap(self, key_encryption_key: object) -> int:
        """Wrap every data key with *key_encryption_key*, then use it for new keys; return
        how many keys were rewrapped (see `PostgresStore.rewrap`).

        Raises:
            ConfigurationError: *key_encryption_key* is not a KEK, or a key does not unwrap.
        """
        if key_encryption_key is None:
            raise ConfigurationError(
                "rewrap() needs the new key_encryption_key (32 bytes or a KeyWrapper)"
            )
        wrapper = resolve_key_encryption_key(key_encryption_key)
        assert wrapper is not None  # only None resolves to None
        done: dict[str, bytes] = {}
        count = 0
        # Rounds until one finds no key left to rewrap: keys made meanwhile (here or by
        # other processes still on the old KEK) are taken by the next round. This process
        # switches after the first rounds, and then one more round takes what it made.
        for switched in (False, True):
            if switched:
                self.keyring.use(wrapper)
            async for rewrapped in self._rounds(done, wrapper):
                count += rewrapped
        self._sealing.clear()
        return count

    async def _rounds(self, done: dict[str, bytes], wrapper: object) -> AsyncIterator[int]:
        while True:
            rows = await self._pool.fetch(self._live)
            pending = [
                (r["subject"], bytes(r["wrapped_key"]))
                for r in rows
                if done.get(r["subject"]) != bytes(r["wrapped_key"])
            ]
            if not pending:
                return
            new = await self.keyring.rewrap(pending, wrapper)  # type: ignore[arg-type]
            status = await self._pool.execute(
                self._rewrap,
                [s for s, _ in pending],
                [w for _, w in pending],
                [new[s] for s, _ in pending],
            )
            done.update(new)
            yield int(status.rsplit(" ", 1)[-1])


def _sealed(event: NewEvent, keys: dict[str, AESGCM]) -> NewEvent:
    if not event.personal or event.subject is None:
        return event
    return seal_event(event, keys[event.subject])


def make_keyring(key_encryption_key: object) -> Keyring:
    """The `Keyring` of a store opened with *key_encryption_key* (or the environment's)."""
    return Keyring(resolve_key_encryption_key(key_encryption_key))
