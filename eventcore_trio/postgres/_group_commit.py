"""Concurrent appends of one store share statements, transactions and WAL flushes.

An append that finds no append statement in flight (`MAX_IN_FLIGHT`) and nobody waiting
sends its own statement at once, as a lone appender always does. One that finds them all busy
joins a queue; as soon as a statement slot frees, whoever gets it sends everything queued (up
to `MAX_SHARED` requests, and no more than the store's ``max_append_bytes`` of encoded
events: the requests from the front of the queue that fit, so a large request goes alone)
as one ``append_many`` statement. A statement in flight for longer
than `STALLED_AFTER` (an append waiting for a stream that another session's transaction
holds) is not waited for: the queue goes out in a statement of its own, so appenders of
other streams never wait for each other. Eight Trio tasks appending one event
each thus pay one crossing, one round trip and one commit per batch instead of per event,
where each asyncio task on a pool would pay its own.

Sharing changes nothing a caller can observe: each request stays all or nothing and is
checked against its own expected versions (a conflict refuses that request alone); its
result is its own. A shared statement never waits for a stream's lock: a request naming a
stream that another transaction holds (an open outbox transaction, say) comes back *busy*,
having written nothing, and its own caller sends it again on its own, where it waits for
that lock in the caller's task, as long as the caller lets it. Any other wait for another
transaction (an event id that an open transaction inserted) is cut short by the statement's
lock timeout (`SHARED_LOCK_TIMEOUT`). If the shared statement fails for such a reason (a
duplicate event id, a lock timeout), or for its size (the server ran out of memory, temporary
file space or another resource; SQLSTATE classes 53 and 54), nothing was written and each
caller sends its request again on its own, so each gets its own verdict. A statement is never
resent after it may have committed: a lost connection while a statement is in flight leaves
the outcome unknown for every request in it, as it does for a lone append, which is why the
size bound keeps shared statements as small as the largest lone one.

The statement commits before the notification that wakes readers is sent (in the same
crossing): a failed notification does not unmake the commit, so every request keeps its
committed result and the store's `Notifier` wakes readers instead (readers poll as well).

The slot holder sends shared statements shielded from its own cancellation: the other
requests in it belong to other callers, and a shared statement never waits for a lock
held elsewhere. A caller cancelled while waiting gets `trio.Cancelled`; if its request was
already sent it may have been written, as with a cancelled lone append.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Final, final

import outcome
import trio

from .._errors import DatabaseError, DuplicateEventId, StoreConnectionError, VersionConflict
from .._events import AppendResult
from ._appends import BUSY, AppendStatement, Busy, EncodedAppend, append_result, many_results
from ._bridge import Record
from ._pool import Pool

logger = logging.getLogger("eventcore_trio.postgres")

#: Append statements one store runs at a time; more appends queue and share the next ones.
#: One measured best: eight tasks appending one event each ran at 3,400 events/s with one
#: statement in flight, 2,400 with two and 1,700 with eight (every append on its own).
MAX_IN_FLIGHT: Final = 1

#: Seconds a queued append waits for the statement in flight before it sends its own: a
#: statement that waits for a lock held elsewhere must not hold up appends to other streams.
STALLED_AFTER: Final = 0.01

#: Requests one shared statement carries at most.
MAX_SHARED: Final = 64

# SQLSTATE classes of errors that a statement's size can cause, where the server refused the
# statement and stayed up: "insufficient resources" (53: out of memory, disk full,
# temp_file_limit) and "program limit exceeded" (54). The bridge reports class 53 as a
# connection error, since at connect it means the server cannot take a session.
_SIZE_SQLSTATE_CLASSES: Final = ("53", "54")

# One byte over PostgreSQL's limit for channel names: pg_notify refuses it.
_REFUSED_CHANNEL: Final = "x" * 64


@final
class _Pending:
    def __init__(self, request: EncodedAppend) -> None:
        self.request = request
        self.taken = False
        self.done = trio.Event()
        self.result: outcome.Outcome[AppendResult | Busy] | None = None

    def finish(self, result: outcome.Outcome[AppendResult | Busy]) -> None:
        self.result = result
        self.done.set()


@final
class GroupCommit:
    """Sends appends, sharing statements between concurrent callers.

    *on_unnotified* is called when an append committed but its notification failed: it
    must wake readers some other way (`Notifier.poke`).
    """

    def __init__(
        self,
        pool: Pool,
        statement: AppendStatement,
        channel: str,
        on_unnotified: Callable[[], None],
    ) -> None:
        self._pool = pool
        self._channel = channel
        self._statement = statement
        self._on_unnotified = on_unnotified
        self._slots = trio.Semaphore(MAX_IN_FLIGHT)
        self._queue: list[_Pending] = []
        # Fault injection (PostgresAdmin.failing_notifications): notify on a channel name
        # the server refuses.
        self.notifications_fail = False

    # KI-protected, here and in what it calls: the queue and each request's `taken` change
    # together, and a KeyboardInterrupt raised between the two (Trio raises it wherever
    # unprotected code runs) left a request out of the queue and not taken, whose caller
    # then failed with ValueError in a Ctrl-C test. Protected, the interrupt reaches the main
    # task at its next checkpoint instead.
    @trio.lowlevel.enable_ki_protection
    async def append(self, request: EncodedAppend) -> AppendResult:
        """Append one encoded request; returns its result or raises its error."""
        if request.subjects is not None:
            # Events with a subject go on their own: append_many (migration 8) stores no
            # subject, and checks no forget.
            return await self._send_one(request)
        if not self._queue and self._slots.value > 0:
            # Nobody waiting and a slot free: a lone append, exactly as without sharing. The
            # slot is taken without the scheduling round `async with` would add (a free slot
            # has no waiter to be fair to); the statement's crossing is the checkpoint.
            self._slots.acquire_nowait()
            try:
                return await self._send_one(request)
            finally:
                self._slots.release()
        pending = _Pending(request)
        self._queue.append(pending)
        try:
            while not pending.taken:
                with trio.move_on_after(STALLED_AFTER) as waiting:
                    await self._slots.acquire()
                if waiting.cancelled_caught:
                    # The statement in flight is stalled (a lone append waiting for a lock
                    # that another session holds, say): appends to other streams must not
                    # wait for it.
                    if not pending.taken:
                        await self._send_queued()
                    continue
                try:
                    # Another holder may have sent this request meanwhile.
                    if not pending.taken:
                        await self._send_queued()
                finally:
                    self._slots.release()
            await pending.done.wait()
        finally:
            if not pending.taken:
                self._queue.remove(pending)
        assert pending.result is not None
        result = pending.result.unwrap()
        if isinstance(result, Busy):
            # On its own, in this caller's task: it may wait for a stream's lock for as
            # long as the transaction holding it runs, and only this caller waits, and may
            # give up (a cancelled lone append).
            return await self._send_one(request)
        return result

    @trio.lowlevel.enable_ki_protection
    async def _send_queued(self) -> None:
        # The front of the queue, in order, within the size bound: the first request always
        # goes (it is within the limit on its own); the first that would pass the bound
        # waits for the next statement, with everything behind it.
        count, size = 0, 0
        for item in self._queue[:MAX_SHARED]:
            if count and size + item.request.size > self._statement.max_bytes:
                break
            count += 1
            size += item.request.size
        batch = self._queue[:count]
        del self._queue[:count]
        for item in batch:
            item.taken = True
        if batch:
            with trio.CancelScope(shield=True):
                await self._send_shared(batch)

    async def _run(self, sql: str, args: Sequence[object]) -> list[Record]:
        # The wake-up for readers follows the commit on the same connection, in the same
        # crossing: the lowest latency, and it is never inside the appending transaction.
        async with self._pool.acquire() as connection:
            channel = _REFUSED_CHANNEL if self.notifications_fail else self._channel
            rows, notify_error = await connection.fetch_then_notify(sql, args, channel)
        if notify_error is not None:
            # Committed all the same; readers are woken another way.
            logger.debug("could not notify %s of an append: %s", self._channel, notify_error)
            self._on_unnotified()
        return rows

    async def _send_one(self, request: EncodedAppend) -> AppendResult:
        sql, args = self._statement.single(request)
        (row,) = await self._run(sql, args)
        return append_result(row, args)

    @trio.lowlevel.enable_ki_protection
    async def _send_shared(self, batch: Sequence[_Pending]) -> None:
        if len(batch) == 1:
            # Nothing to share: its caller sends it, unshielded, in its own task.
            (only,) = batch
            only.finish(outcome.Value(BUSY))
            return
        sql, args = self._statement.many([item.request for item in batch])
        try:
            rows = await self._run(sql, args)
        except (DatabaseError, DuplicateEventId, StoreConnectionError) as exc:
            if isinstance(exc, StoreConnectionError) and not _refused_for_size(exc):
                # The session may have ended after the commit: the outcome is unknown, and
                # sending the requests again could write them twice.
                for item in batch:
                    item.finish(outcome.Error(exc))
                return
            # Nothing was written; each request's own statement gives it its own verdict.
            for item in batch:
                item.finish(outcome.Value(BUSY))
            return
        except BaseException as exc:
            for item in batch:
                item.finish(outcome.Error(exc))
            if not isinstance(exc, Exception):
                raise
            return
        for item, result in zip(batch, many_results(rows, [i.request for i in batch]), strict=True):
            if isinstance(result, VersionConflict):
                item.finish(outcome.Error(result))
            else:
                item.finish(outcome.Value(result))


def _refused_for_size(exc: StoreConnectionError) -> bool:
    # The server's own error, chained by the bridge with its SQLSTATE and severity: an ERROR
    # (not a FATAL or PANIC, which may come after a commit) of a size class, so the statement
    # was rolled back. A lost connection has neither, and its statement may have committed.
    cause = exc.__cause__
    sqlstate = getattr(cause, "sqlstate", None)
    severity = getattr(cause, "severity_en", None) or getattr(cause, "severity", None)
    return (
        isinstance(sqlstate, str) and sqlstate[:2] in _SIZE_SQLSTATE_CLASSES and severity == "ERROR"
    )
