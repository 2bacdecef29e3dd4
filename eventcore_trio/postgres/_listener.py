"""The store's LISTEN session: wakes readers when an append commits.

One LISTEN connection per store, started by the first `Listener.wait`, reconnecting with
backoff when lost. A (re)connect also wakes waiters, since notifications may have been missed
meanwhile; readers poll as well, so a lost notification costs latency, never an event.
"""

from __future__ import annotations

from typing import final

import trio

from .._errors import StoreConnectionError
from ._pool import SessionOptions


@final
class Listener:
    """Wakes `wait` callers on every notification on *channel*, on a session that
    *options* open for *role* (which names it)."""

    def __init__(
        self, *, nursery: trio.Nursery, options: SessionOptions, channel: str, role: str
    ) -> None:
        # Runs the LISTEN service; cancelled when the store closes.
        self._nursery = nursery
        self._options = options
        self._channel = channel
        self._role = role
        # Set and replaced whenever a notification (or a reconnect) says that new events may
        # be visible.
        self._appended = trio.Event()
        self._listening = False

    async def wait(self) -> None:
        """Return at the next notification (or reconnect); the first call starts the service."""
        if not self._listening:
            self._listening = True
            self._nursery.start_soon(self._listen)
        await self._appended.wait()

    def _wake(self) -> None:
        self._appended.set()
        self._appended = trio.Event()

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            try:
                connection = await self._options.connect_session(self._role)
                try:
                    lost = trio.Event()
                    connection.add_termination_listener(lost.set)
                    async with connection.listen(self._channel) as notifications:
                        self._wake()
                        backoff = 0.1
                        async with trio.open_nursery() as nursery:

                            async def relay() -> None:
                                async for _ in notifications:
                                    self._wake()

                            nursery.start_soon(relay)
                            await lost.wait()
                            nursery.cancel_scope.cancel()
                finally:
                    await connection.close()
            except StoreConnectionError:
                pass
            # Lost or never made: wake pollers (they re-read anyway) and try again later.
            self._wake()
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
