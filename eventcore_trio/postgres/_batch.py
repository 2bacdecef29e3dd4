"""The projection batch: one transaction on the leader's own session, fenced at commit.

A batch's writes (``ctx.db``), its dead letters and its checkpoint commit together or not at
all. Three things make that hold whatever happens on the Trio side:

* **Fencing.** The checkpoint statement proves, inside the transaction that commits, that
  this server session is the one the lock was taken on and still holds it (see `_fence`).
  A deposed leader, a lock released through ``ctx.db`` or a statement moved to another server
  session by a transaction pooler cannot commit.
* **Known transaction state.** A statement interrupted mid-flight (say, cancelled by a
  timeout around one ``ctx.db`` call) leaves the session's state unknown: BEGIN may or may
  not have run, a write may or may not have happened. The batch then refuses further
  statements and never commits; it rolls back, shielded, and the session is closed if even
  that fails. Whether a transaction may be open is decided from what was *sent*, never from
  what was acknowledged.
* **Compare-and-set.** The checkpoint moves only from the position the batch started at.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Protocol, TypeVar, final

from .._errors import (
    BatchInterrupted,
    CheckpointAhead,
    CheckpointConflict,
    DeadLetterNotFound,
    EventCoreError,
    InvalidArgument,
    LeadershipLost,
    StoreConnectionError,
)
from .._events import AppendResult, RecordedEvent, StreamAppend, UndecodableEvent
from .._positions import Position, position_parts
from .._protocols import Database
from ._appends import AppendStatement, append_result
from ._bridge import Connection, Record
from ._dead_letters import dead_letter_arguments
from ._fence import HOLDS_LOCK, LockProof
from ._subscriptions import Subscriptions, checkpoint_upsert

T = TypeVar("T")


class _Statement(Protocol):
    """How ``ctx.db`` runs a statement: through its batch (see `PostgresBatch._statement`)."""

    async def __call__(self, call: Callable[..., Awaitable[T]], *args: Any) -> T: ...


@final
class _BatchDatabase:
    """``ctx.db``: the batch's transaction, begun lazily by the first statement."""

    def __init__(self, statement: _Statement, connection: Connection) -> None:
        # The batch's door for every statement (BEGIN first, interruptions recorded), and
        # the session its statements run on.
        self._statement = statement
        self._connection = connection
        # Writes queued by queue(), in order, sent by the next flush.
        self._queued: list[tuple[str, tuple[object, ...]]] = []

    def queue(self, sql: str, *args: object) -> None:
        """Queue a write; it is sent with the others before the next statement or the commit."""
        if not isinstance(sql, str):
            raise InvalidArgument(f"sql must be a str, got {type(sql).__name__}")
        self._queued.append((sql, args))

    async def flush(self) -> None:
        """Send the queued writes: runs of the same statement as one pipelined executemany,
        all of them in one crossing into asyncio."""
        if not self._queued:
            return
        groups: list[tuple[str, list[tuple[object, ...]]]] = []
        for sql, args in self._queued:
            if groups and groups[-1][0] == sql:
                groups[-1][1].append(args)
            else:
                groups.append((sql, [args]))
        # Taken off the queue first: if they fail, the batch fails with them.
        self._queued = []
        await self._statement(self._connection.run_writes, groups)

    async def execute(self, sql: str, *args: object) -> str:
        """Run a statement in the batch's transaction (queued writes first)."""
        await self.flush()
        return await self._statement(self._connection.execute, sql, *args)

    async def executemany(self, sql: str, args: Iterable[Sequence[object]]) -> None:
        """Run a statement once per argument tuple in the batch's transaction."""
        await self.flush()
        await self._statement(self._connection.executemany, sql, args)

    async def fetch(self, sql: str, *args: object) -> list[Record]:
        """Run a query in the batch's transaction and return every row (it sees the queued
        writes: they are sent first)."""
        await self.flush()
        return await self._statement(self._connection.fetch, sql, *args)

    async def fetchrow(self, sql: str, *args: object) -> Record | None:
        """Run a query in the batch's transaction and return its first row."""
        await self.flush()
        return await self._statement(self._connection.fetchrow, sql, *args)

    async def fetchval(self, sql: str, *args: object) -> Any:
        """Run a query in the batch's transaction and return one value."""
        await self.flush()
        return await self._statement(self._connection.fetchval, sql, *args)


@final
class PostgresBatch:
    """A transaction on the leader's session; obtained from `PostgresLeadership.open_batch`.

    The transaction begins with the first statement that needs it: a batch whose projector
    writes nothing through ``ctx.db`` commits its checkpoint as one autocommit statement, one
    round trip, and holds no transaction id while its handlers run (so it holds no reader
    back). Everything still commits when the batch's block ends, or not at all.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        connection: Connection,
        proof: LockProof,
        subscriptions: Subscriptions,
        on_lost: Callable[[str], None],
        *,
        append_statement: AppendStatement | None = None,
        on_appended: Callable[[], None] | None = None,
        begin: str | None = None,
        setup_lock: int | None = None,
    ) -> None:
        self._connection = connection
        # The key a setup hook runs under (see `run_setup`), for a read-model batch.
        self._setup_lock = setup_lock
        # What begins the transaction when it is not a plain BEGIN: a read-model batch's,
        # which also puts its schema first on the search_path (see `search_path_begin`).
        self._begin = begin
        self._append_statement = append_statement
        # Wakes readers once a batch that appended events (a reactor's) has committed.
        self._on_appended = on_appended
        self._appended = False
        self._proof = proof
        self._subscriptions = subscriptions
        # Called with the reason when the commit-time fence finds the lock gone.
        self._on_lost = on_lost
        # True once BEGIN has been *sent* (it may have run even if its answer never came);
        # from then on only COMMIT or ROLLBACK ends the batch.
        self._begun = False
        # True once a statement was interrupted mid-flight: the session's state is unknown,
        # so the batch takes no more statements, never commits, and rolls back.
        self._interrupted = False
        # The checkpoint move requested by save_checkpoint, applied at commit when no
        # transaction was needed.
        self._pending_checkpoint: tuple[Position | None, Position] | None = None
        self._db = _BatchDatabase(self._statement, connection)
        # From exactly the position the batch started at, and only if this session is the
        # lock's and holds it (fencing, see _fence). A second writer (a deposed leader, an
        # operator) or a lost lock makes it return no row.
        self._sql_checkpoint = checkpoint_upsert(
            subscriptions.table,
            subscriptions.schema,
            condition="c.tx IS NOT DISTINCT FROM $5::bigint "
            "AND c.position IS NOT DISTINCT FROM $6::bigint",
            fence=HOLDS_LOCK.format(pid="$7::int", key="$8::bigint"),
        )
        self._sql_diagnose = (
            f"SELECT pg_backend_pid() AS pid, "
            f"{HOLDS_LOCK.format(pid='$2::int', key='$3::bigint')} AS held, "
            f"(SELECT tx FROM {subscriptions.table} WHERE subscription_name = $1) AS tx, "
            f"(SELECT position FROM {subscriptions.table} WHERE subscription_name = $1) "
            "AS position"
        )

    @property
    def db(self) -> _BatchDatabase:
        """The transaction, for the projector's own writes (``ctx.db``)."""
        return self._db

    async def run_setup(self, setup: Callable[[Database], Awaitable[None]]) -> None:
        """Run a read model's *setup* hook in this transaction, one unit of the version at a
        time (a transaction-level lock on its read-model schema, held until this batch
        ends): the units of a version share the schema, and two transactions running
        ``CREATE TABLE IF NOT EXISTS`` at once fail."""
        if self._setup_lock is not None:
            await self._db.execute("SELECT pg_advisory_xact_lock($1)", self._setup_lock)
        await setup(self._db)

    @property
    def failure(self) -> BaseException | None:
        """Why this batch can no longer commit although no handler raised, or None."""
        if self._interrupted:
            return self._interrupted_error()
        return None

    def _interrupted_error(self) -> BatchInterrupted:
        return BatchInterrupted(
            f"a statement of {self._proof.name!r}'s batch was interrupted mid-flight (cancelled "
            "by a timeout around a ctx.db call?), so its transaction's state is unknown; the "
            "batch was rolled back. Bound whole handlers, not single statements, or use SET "
            "LOCAL statement_timeout"
        )

    async def _statement(self, call: Callable[..., Awaitable[T]], *args: Any) -> T:
        # Every statement of the batch goes through here, BEGIN first.
        if self._interrupted:
            raise self._interrupted_error()
        if not self._begun:
            self._begun = True
            if self._begin is None:
                await self._guarded(self._connection.begin)
            else:
                # Without arguments: the simple protocol, both statements in one round trip.
                await self._guarded(self._connection.execute, self._begin)
        return await self._guarded(call, *args)

    async def _guarded(self, call: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            return await call(*args)
        except BaseException as exc:
            # An error the server reported leaves a known state (an aborted transaction,
            # rolled back at the end). Anything else (cancellation, a broken connection, a
            # KeyboardInterrupt) may have struck between sending and hearing back.
            if not isinstance(exc, EventCoreError) or isinstance(exc, StoreConnectionError):
                self._interrupted = True
            raise

    async def save_checkpoint(self, expected: Position | None, position: Position) -> None:
        """Move the checkpoint from *expected* to *position* when the batch commits (CAS).

        Raises:
            CheckpointConflict: the stored checkpoint is not *expected* (at once inside a
                transaction, else when the block ends).
            CheckpointAhead: *position* is beyond every position the store can have
                produced (when the checkpoint is written, as above); nothing commits.
            LeadershipLost: this session no longer holds the lock; nothing commits.
        """
        # Queued writes commit with the checkpoint, or not at all.
        await self._db.flush()
        if self._begun:
            await self._statement(self._write_checkpoint, expected, position)
        else:
            self._pending_checkpoint = (expected, position)

    async def _write_checkpoint(self, expected: Position | None, position: Position) -> None:
        tx, seq = position_parts(position)
        expected_tx, expected_seq = (None, None) if expected is None else position_parts(expected)
        proof = self._proof
        saved = await self._connection.fetchrow(
            self._sql_checkpoint,
            proof.name,
            tx,
            seq,
            self._subscriptions.system_identifier,
            expected_tx,
            expected_seq,
            proof.backend_pid,
            proof.key,
        )
        assert saved is not None
        if saved["ahead"]:
            raise CheckpointAhead(proof.name, position, stored=False)
        if saved["saved"]:
            return
        row = await self._connection.fetchrow(
            self._sql_diagnose, proof.name, proof.backend_pid, proof.key
        )
        assert row is not None
        if not row["held"]:
            reason = proof.describe_loss(row["pid"])
            self._on_lost(reason)
            raise LeadershipLost(f"{reason}; the batch did not commit")
        current = None if row["tx"] is None else Position(row["tx"], row["position"])
        raise CheckpointConflict(proof.name, position, current)

    async def flush(self) -> None:
        """Send the writes queued through ``ctx.db.queue`` now."""
        await self._db.flush()

    async def record_dead_letter(
        self, event: RecordedEvent | UndecodableEvent, error: BaseException, *, retries: int
    ) -> None:
        """Record *event* as skipped, in this transaction."""
        await self._statement(
            self._connection.execute,
            self._subscriptions.letters.insert,
            *dead_letter_arguments(self._proof.name, event, error, retries),
        )

    async def resolve_dead_letter(self, dead_letter_id: uuid.UUID) -> None:
        """Delete a replayed dead letter of this unit, in this transaction (fenced).

        Raises:
            DeadLetterNotFound: the unit has no such dead letter; the batch cannot commit.
            LeadershipLost: this session no longer holds the lock; nothing commits.
        """
        proof = self._proof
        row = await self._statement(
            self._connection.fetchrow,
            self._subscriptions.letters.delete,
            dead_letter_id,
            proof.name,
            proof.backend_pid,
            proof.key,
        )
        assert row is not None
        if not row["held"]:
            reason = proof.describe_loss(row["pid"])
            self._on_lost(reason)
            raise LeadershipLost(f"{reason}; the batch did not commit")
        if row["deleted"] != 1:
            # Raised inside the batch's block, so the transaction rolls back: what the
            # replay wrote goes with it.
            raise DeadLetterNotFound(dead_letter_id, proof.name)

    async def append_atomic(self, appends: Sequence[StreamAppend]) -> AppendResult:
        """Append events in the batch's transaction (see `ProjectionBatch.append_atomic`).

        The events take the transaction id path of a writer that had an id before it
        announced itself when ``ctx.db`` wrote first (docs/postgres.md, "The read
        horizon"): readers never skip them, and wait for this batch only once it appended.
        """
        if self._append_statement is None:
            raise InvalidArgument("this batch cannot append events")
        sql, args = self._append_statement(await self._append_statement.seal(appends))
        await self._db.flush()
        row = await self._statement(self._connection.fetchrow, sql, *args)
        self._appended = True
        return append_result(row, args)

    async def __aenter__(self) -> PostgresBatch:
        # The transaction begins lazily, with the first statement that needs one.
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Commit (fenced) when the block ended normally; otherwise, or when the commit
        fails, roll back. Never swallows the block's error."""
        if exc is not None:
            await self._rollback()
            return
        try:
            await self._commit()
        except BaseException:
            await self._rollback()
            raise

    async def _commit(self) -> None:
        if self._interrupted:
            raise self._interrupted_error()
        if self._begun:
            await self._guarded(self._connection.commit)
        elif self._pending_checkpoint is not None:
            await self._guarded(self._write_checkpoint, *self._pending_checkpoint)
        if self._appended and self._on_appended is not None:
            self._on_appended()

    async def _rollback(self) -> None:
        # Shielded and bounded in the bridge; a session it cannot bring back to "no open
        # transaction" is terminated, which ends the lock too.
        if self._begun or self._interrupted:
            await self._connection.rollback()
