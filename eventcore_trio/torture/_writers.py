"""The torture run's writers, and their record of what they were told.

They write the way applications write, through every public write path: one-stream appends
(``append``), multi-stream appends (``append_atomic``), both shared by group commit when
several writers append at once; appends in a transaction held open for a moment (``held``);
outbox transactions (``outbox``, `PostgresStore.transaction`) that write a row of their
own before, between or after their appends, the first case being the late writer of the
read horizon; and decisions over a query (``decision``: `PostgresStore.read_query`, then
`PostgresStore.append_tagged` with an `AppendCondition`) that claim the seat of the current
half second. Every posting carries its account's tag, and a quarter of the outbox
transactions also claim the current seat, unconditionally and last (``outbox_claim``): the
late writer that decisions must see or fail on. (The reactor's appends are made by the
hosts: see `_model`.)

An outbox transaction appends its accounts in the order it drew them, one statement each, as
an application may: two of them over the same two accounts in opposite orders can close a
lock cycle, and PostgreSQL then aborts one (docs/postgres.md, "Deadlocks"). Its events must
never appear, like a rollback's, and the writer goes on, as an application that retries.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from typing import Final

import attrs
import trio

from .._errors import AppendConditionFailed, DatabaseError, StoreConnectionError
from .._events import NewEvent, StreamAppend
from .._queries import AppendCondition, EventQuery
from ..postgres import PostgresStore, PostgresTransaction
from ._model import (
    EVENT_TYPE,
    SEAT_STREAM_PREFIX,
    SEAT_TAG_PREFIX,
    SEAT_TYPE,
    STREAM_PREFIX,
    account_tag,
)

ACCOUNTS: Final = 40
#: Shares of the write paths (the rest: one statement through group commit).
HELD_SHARE: Final = 0.25
OUTBOX_SHARE: Final = 0.25
DECISION_SHARE: Final = 0.1
#: Share of held and outbox transactions that roll back instead of committing.
ROLLBACK_SHARE: Final = 0.15
#: Share of outbox transactions that also claim the current seat.
OUTBOX_CLAIM_SHARE: Final = 0.25

#: PostgreSQL's SQLSTATE for a transaction aborted to break a lock cycle.
DEADLOCK_DETECTED: Final = "40P01"

#: The names of the writers' paths in `WriteLog.by_path` and the report.
WRITE_PATHS: Final = ("append", "append_atomic", "held", "outbox", "outbox_claim", "decision")


@attrs.define
class WriteLog:
    """What the writers were told: the reference the verification checks the log against."""

    #: Event ids whose append was acknowledged as committed.
    acknowledged: set[uuid.UUID] = attrs.Factory(set)
    #: Event ids whose transaction rolled back or never reached its commit.
    rolled_back: set[uuid.UUID] = attrs.Factory(set)
    #: Appends cut off mid-commit: they may or may not have committed.
    unknown_outcome: int = 0
    #: Acknowledged events per write path (`WRITE_PATHS`).
    by_path: Counter[str] = attrs.Factory(Counter)
    #: Event ids acknowledged to outbox writers (each must have its transaction's row).
    outbox: set[uuid.UUID] = attrs.Factory(set)
    #: Decisions per outcome (`_report.DECISION_OUTCOMES`).
    decisions: Counter[str] = attrs.Factory(Counter)
    #: Outbox transactions PostgreSQL aborted to break a lock cycle (their events are
    #: also in *rolled_back*).
    deadlocks: int = 0

    def acknowledge(self, ids: set[uuid.UUID], path: str) -> None:
        """The append of *ids* through *path* (`WRITE_PATHS`) was acknowledged."""
        self.acknowledged |= ids
        self.by_path[path] += len(ids)

    def cut_off(self, ids: set[uuid.UUID], *, committing: bool) -> None:
        """The session of the append of *ids* went: once *committing*, it may or may not
        have committed; before, it never did, and its events must never appear."""
        if committing:
            self.unknown_outcome += 1
        else:
            self.rolled_back |= ids


class _RollBack(Exception):
    """Raised inside an outbox transaction to roll it back."""


async def write(
    store: PostgresStore, log: WriteLog, *, app: str, seed: str, stop: trio.Event
) -> None:
    """Append random postings until *stop* is set, recording every outcome in *log*.

    Each append goes through one path, chosen at random: one statement (``append`` or
    ``append_atomic``), a transaction held open for up to 30 ms (``held``), an outbox
    transaction writing a row of its own into *app*'s ``outbox`` table (``outbox``), or a
    decision claiming the current seat (``decision``); held and outbox transactions roll
    back 15 % of the time. Connection errors back off, capped at 1 s.
    """
    rng = random.Random(seed)
    accounts = [f"{STREAM_PREFIX}{n:03d}" for n in range(ACCOUNTS)]
    backoff = 0.05
    while not stop.is_set():
        appends = [
            StreamAppend(
                stream,
                [
                    NewEvent(
                        EVENT_TYPE,
                        {"amount": rng.randint(-100, 100)},
                        event_id=uuid.uuid4(),
                        tags=[account_tag(stream)],
                    )
                    for _ in range(rng.randint(1, 3))
                ],
            )
            for stream in rng.sample(accounts, rng.choice((1, 1, 1, 2)))
        ]
        ids = {event.event_id for a in appends for event in a.events if event.event_id}
        choice = rng.random()
        try:
            if choice < HELD_SHARE:
                await _append_held(store, log, appends, ids, rng)
            elif choice < HELD_SHARE + OUTBOX_SHARE:
                await _append_outbox(store, log, appends, ids, rng, app)
            elif choice < HELD_SHARE + OUTBOX_SHARE + DECISION_SHARE:
                await _decide(store, log, rng)
            else:
                await _append(store, log, appends, ids)
            backoff = 0.05
        except StoreConnectionError:
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)
        await trio.sleep(rng.uniform(0, 0.02))


async def _append(
    store: PostgresStore, log: WriteLog, appends: list[StreamAppend], ids: set[uuid.UUID]
) -> None:
    try:
        if len(appends) == 1:
            await store.append(appends[0].stream_id, appends[0].events)
        else:
            await store.append_atomic(appends)
    except StoreConnectionError:
        # The statement may have committed just before the session went: unknown.
        log.cut_off(ids, committing=True)
        raise
    log.acknowledge(ids, "append" if len(appends) == 1 else "append_atomic")


async def _append_held(
    store: PostgresStore,
    log: WriteLog,
    appends: list[StreamAppend],
    ids: set[uuid.UUID],
    rng: random.Random,
) -> None:
    # The hazard gap-free reads exist for: a transaction that holds its events uncommitted
    # for a while, then commits (after later ones) or rolls back.
    sql, args = store.admin.append_statement(appends)
    committing = False
    try:
        async with store.admin.acquire() as connection:
            await connection.begin()
            try:
                await connection.fetchrow(sql, *args)
                await trio.sleep(rng.uniform(0, 0.03))
                if rng.random() < ROLLBACK_SHARE:
                    await connection.rollback()
                    log.rolled_back |= ids
                    return
                committing = True
                await connection.commit()
            except BaseException:
                if not committing:
                    await connection.rollback()
                raise
    except StoreConnectionError:
        log.cut_off(ids, committing=committing)
        raise
    log.acknowledge(ids, "held")
    store.admin.notify_appended()


async def _append_outbox(
    store: PostgresStore,
    log: WriteLog,
    appends: list[StreamAppend],
    ids: set[uuid.UUID],
    rng: random.Random,
    app: str,
) -> None:
    # An application's transaction: its own row and its events, all or nothing. The row
    # comes first half of the time (the transaction then holds an id before it appends).
    row_at = rng.choice((0, 0, 1, len(appends)))
    rolls_back = rng.random() < ROLLBACK_SHARE
    claim_id = uuid.uuid4() if rng.random() < OUTBOX_CLAIM_SHARE else None
    written = (ids | {claim_id}) if claim_id else ids
    committing = False
    try:
        async with store.transaction() as tx:
            for index, request in enumerate(appends):
                if index == row_at:
                    await _outbox_row(tx, app, written)
                await tx.append(request.stream_id, request.events)
            if row_at == len(appends):
                await _outbox_row(tx, app, written)
            if claim_id:
                # Last, when the transaction has held an id since its first write, as late
                # as it can claim: decisions must wait for it, or fail once it commits. (Last
                # also takes the seat's stream lock after the accounts' in every outbox
                # transaction, so the shared seat stream adds no lock-order cycle.)
                seat = _seat()
                await tx.append(
                    f"{SEAT_STREAM_PREFIX}{seat.removeprefix(SEAT_TAG_PREFIX)}",
                    [_claim(seat, claim_id, by="outbox")],
                )
            await trio.sleep(rng.uniform(0, 0.03))
            if rolls_back:
                raise _RollBack
            committing = True
    except _RollBack:
        log.rolled_back |= written
        return
    except DatabaseError as exc:
        if exc.sqlstate != DEADLOCK_DETECTED or committing:
            raise
        log.deadlocks += 1
        log.rolled_back |= written
        return
    except StoreConnectionError:
        log.cut_off(written, committing=committing)
        raise
    log.acknowledge(ids, "outbox")
    if claim_id:
        log.acknowledge({claim_id}, "outbox_claim")
    log.outbox |= written


async def _outbox_row(tx: PostgresTransaction, app: str, ids: set[uuid.UUID]) -> None:
    await tx.execute(
        f'INSERT INTO "{app}".outbox (id, event_ids) VALUES ($1, $2)',
        uuid.uuid4(),
        sorted(ids),
    )


async def _decide(store: PostgresStore, log: WriteLog, rng: random.Random) -> None:
    # A decision as a command makes it: read the seat's claims, decide, append on condition
    # that nothing matching was written since the read. Writers deciding within the same
    # half second compete for one seat, with outbox transactions claiming it unconditionally.
    seat = _seat()
    # Drawn before the read, so that the writer's later choices do not depend on its outcome.
    thinking = rng.uniform(0, 0.01)
    query = EventQuery.of(types=[SEAT_TYPE], tags=[seat])
    read = await store.read_query(query)
    if read.events:
        log.decisions["refused"] += 1
        return
    # The time a command takes to fold and decide: the window in which another claim can
    # commit, which the condition must then see.
    await trio.sleep(thinking)
    claim_id = uuid.uuid4()
    try:
        await store.append_tagged(
            [_claim(seat, claim_id, by="decision")],
            condition=AppendCondition(fail_if_events_match=query, after=read.position),
        )
    except AppendConditionFailed:
        log.decisions["condition_failed"] += 1
        return
    except StoreConnectionError:
        log.decisions["cut_off"] += 1
        log.cut_off({claim_id}, committing=True)
        raise
    log.decisions["made"] += 1
    log.acknowledge({claim_id}, "decision")


def _seat() -> str:
    return f"{SEAT_TAG_PREFIX}{int(trio.current_time() * 2)}"


def _claim(seat: str, event_id: uuid.UUID, *, by: str) -> NewEvent:
    return NewEvent(SEAT_TYPE, {"seat": seat}, tags=[seat], metadata={"by": by}, event_id=event_id)
