"""Concurrent appends of one store share statements, transactions and WAL flushes.

An append that finds no append statement in flight (`MAX_IN_FLIGHT`) and nobody waiting
sends its own statement at once, as a lone appender always does. One that finds them all busy
joins a queue; as soon as a statement slot frees, whoever gets it sends everything queued (up
to `MAX_SHARED` requests) as one ``append_many`` statement. A statement in flight for longer
than `STALLED_AFTER` (an append waiting for a stream that another session's transaction
holds) is not waited for: the queue goes out in a statement of its own, so appenders of
other streams never wait for each other. Eight Trio tasks appending one event
each thus pay one crossing, one round trip and one commit per batch instead of per event,
where each asyncio task on a pool would pay its own.

Sharing changes nothing a caller can observe: each request stays all or nothing and is
checked against its own expected versions (a conflict refuses that request alone); its
result is its own. If the shared statement fails for any other reason (a duplicate event id,
say), nothing was written and each request is sent again on its own, so each caller gets its
own verdict. A lost connection while a statement is in flight leaves the outcome unknown for
every request in it, as it does for a lone append.

The slot holder sends shared statements shielded from its own cancellation: the other
requests in it belong to other callers. A caller cancelled while waiting gets `trio.Cancelled`;
if its request was already sent it may have been written, as with a cancelled lone append.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, final

import outcome
import trio

from .._errors import DatabaseError, DuplicateEventId, VersionConflict
from .._events import AppendResult
from ._appends import AppendStatement, EncodedAppend, append_result, many_results
from ._bridge import Record
from ._pool import Pool

#: Append statements one store runs at a time; more appends queue and share the next ones.
#: One measured best: eight tasks appending one event each ran at 3,400 events/s with one
#: statement in flight, 2,400 with two and 1,700 with eight (every append on its own).
MAX_IN_FLIGHT: Final = 1

#: Seconds a queued append waits for the statement in flight before it sends its own: a
#: statement that waits for a lock held elsewhere must not hold up appends to other streams.
STALLED_AFTER: Final = 0.01

#: Requests one shared statement carries at most.
MAX_SHARED: Final = 64


@final
class _Pending:
    def __init__(self, request: EncodedAppend) -> None:
        self.request = request
        self.taken = False
        self.done = trio.Event()
        self.result: outcome.Outcome[AppendResult] | None = None

    def finish(self, result: outcome.Outcome[AppendResult]) -> None:
        self.result = result
        self.done.set()


@final
class GroupCommit:
    """Sends appends, sharing statements between concurrent callers."""

    def __init__(self, pool: Pool, statement: AppendStatement, channel: str) -> None:
        self._pool = pool
        self._channel = channel
        self._statement = statement
        self._slots = trio.Semaphore(MAX_IN_FLIGHT)
        self._queue: list[_Pending] = []

    async def append(self, request: EncodedAppend) -> AppendResult:
        """Append one encoded request; returns its result or raises its error."""
        if not self._queue and self._slots.value > 0:
            # Nobody waiting and a slot free: a lone append, exactly as without sharing.
            async with self._slots:
                return await self._send_one(request)
        pending = _Pending(request)
        self._queue.append(pending)
        try:
            while not pending.taken:
                with trio.move_on_after(STALLED_AFTER) as waiting:
                    await self._slots.acquire()
                if waiting.cancelled_caught:
                    # The statement in flight is stalled (waiting for a lock that another
                    # session holds, say): appends to other streams must not wait for it.
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
        return pending.result.unwrap()

    async def _send_queued(self) -> None:
        batch = self._queue[:MAX_SHARED]
        del self._queue[:MAX_SHARED]
        for item in batch:
            item.taken = True
        if batch:
            with trio.CancelScope(shield=True):
                await self._send_shared(batch)

    async def _run(self, sql: str, args: Sequence[object]) -> list[Record]:
        # The wake-up for readers follows the commit on the same connection, in the same
        # crossing: the lowest latency, and it is never inside the appending transaction.
        async with self._pool.acquire() as connection:
            return await connection.fetch_then_notify(sql, args, self._channel)

    async def _send_one(self, request: EncodedAppend) -> AppendResult:
        sql, args = self._statement.single(request)
        (row,) = await self._run(sql, args)
        return append_result(row, args)

    async def _send_shared(self, batch: Sequence[_Pending]) -> None:
        if len(batch) == 1:
            (only,) = batch
            only.finish(await outcome.acapture(self._send_one, only.request))
            return
        sql, args = self._statement.many([item.request for item in batch])
        try:
            rows = await self._run(sql, args)
        except (DatabaseError, DuplicateEventId):
            # Nothing was written; each request's own statement gives it its own verdict.
            for item in batch:
                item.finish(await outcome.acapture(self._send_one, item.request))
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
