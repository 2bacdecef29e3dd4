"""The torture run's writers, and their record of what they were told."""

from __future__ import annotations

import random
import uuid
from typing import Final

import attrs
import trio

from .._errors import StoreConnectionError
from .._events import NewEvent, StreamAppend
from ..postgres import PostgresStore
from ._model import EVENT_TYPE, STREAM_PREFIX

ACCOUNTS: Final = 40
#: Share of appends made in a transaction held open for a moment (the rest: one statement).
HELD_SHARE: Final = 0.5
#: Share of held transactions that roll back instead of committing.
ROLLBACK_SHARE: Final = 0.15


@attrs.define
class WriteLog:
    """What the writers were told: the reference the verification checks the log against."""

    #: Event ids whose append was acknowledged as committed.
    acknowledged: set[uuid.UUID] = attrs.Factory(set)
    #: Event ids whose transaction rolled back or never reached its commit.
    rolled_back: set[uuid.UUID] = attrs.Factory(set)
    #: Appends cut off mid-commit: they may or may not have committed.
    unknown_outcome: int = 0


async def write(store: PostgresStore, log: WriteLog, *, seed: str, stop: trio.Event) -> None:
    """Append random postings until *stop* is set, recording every outcome in *log*.

    Half the appends are one statement; the other half hold their transaction open for up to
    30 ms, then commit or (15 %) roll back. Connection errors back off, capped at 1 s.
    """
    rng = random.Random(seed)
    accounts = [f"{STREAM_PREFIX}{n:03d}" for n in range(ACCOUNTS)]
    backoff = 0.05
    while not stop.is_set():
        appends = [
            StreamAppend(
                stream,
                [
                    NewEvent(EVENT_TYPE, {"amount": rng.randint(-100, 100)}, event_id=uuid.uuid4())
                    for _ in range(rng.randint(1, 3))
                ],
            )
            for stream in rng.sample(accounts, rng.choice((1, 1, 1, 2)))
        ]
        ids = {event.event_id for a in appends for event in a.events if event.event_id}
        try:
            if rng.random() < HELD_SHARE:
                await _append_held(store, log, appends, ids, rng)
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
        await store.append_atomic(appends)
    except StoreConnectionError:
        # The statement may have committed just before the session went: unknown.
        log.unknown_outcome += 1
        raise
    log.acknowledged |= ids


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
        if committing:
            log.unknown_outcome += 1
        else:
            # Never committed: its events must never appear.
            log.rolled_back |= ids
        raise
    log.acknowledged |= ids
    store.admin.notify_appended()
