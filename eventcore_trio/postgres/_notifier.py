"""Wakes the store's readers for events committed outside `PostgresStore.append`.

Appends send their own ``pg_notify`` right after their commit, on the same connection and in
the same crossing (see `_group_commit`). Events committed some other way (a statement from
``store.admin.append_statement`` in a transaction the caller holds) ask for one through
`Notifier.poke`: this sends one ``pg_notify`` from its own task on a pooled connection, folding
pokes that arrive while one is being sent into the next. A notification is only a wake-up
(readers poll as well, see `_listener`), so a lost one costs latency, never an event.
"""

from __future__ import annotations

import logging
from typing import Final, final

import trio

from .._errors import EventCoreError
from ._pool import Pool

logger = logging.getLogger("eventcore_trio.postgres")

#: Seconds a closing store spends on its last notification.
FLUSH_TIMEOUT: Final = 1.0


@final
class Notifier:
    """Sends ``pg_notify(channel, '')`` soon after each `poke`, folding bursts into one."""

    def __init__(self, *, nursery: trio.Nursery, pool: Pool, channel: str) -> None:
        # Runs the sending task; cancelled when the store closes (see `flush`).
        self._nursery = nursery
        self._pool = pool
        self._channel = channel
        self._poked = trio.Event()
        self._running = False
        # A send in flight when the store closes is cancelled with the task: flush resends.
        self._sending = False

    def poke(self) -> None:
        """Ask for a notification; returns at once (the first poke starts the task)."""
        if not self._running:
            self._running = True
            self._nursery.start_soon(self._run)
        self._poked.set()

    async def flush(self) -> None:
        """Send a notification now if one is pending (when the store closes), shielded and
        bounded by `FLUSH_TIMEOUT`; a failure is logged, since readers poll anyway."""
        if not (self._poked.is_set() or self._sending):
            return
        self._poked = trio.Event()
        with trio.move_on_after(FLUSH_TIMEOUT, shield=True):
            await self._send()

    async def _run(self) -> None:
        while True:
            await self._poked.wait()
            self._poked = trio.Event()
            await self._send()

    async def _send(self) -> None:
        self._sending = True
        try:
            await self._pool.execute("SELECT pg_notify($1, '')", self._channel)
        except EventCoreError as exc:
            logger.debug("could not notify %s of an append: %s", self._channel, exc)
        finally:
            self._sending = False
