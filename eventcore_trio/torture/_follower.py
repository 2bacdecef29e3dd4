"""The independent follower of a torture run: pages ``read_events`` from a cursor of its own,
as an application's subscriber would, and keeps every event id it was given."""

from __future__ import annotations

import uuid

import attrs
import trio

from .._errors import StoreConnectionError
from .._positions import Position
from ..postgres import PostgresStore


@attrs.define
class Follower:
    """A cursor, and every event id read past it, in order."""

    cursor: Position | None = None
    followed: list[uuid.UUID] = attrs.Factory(list)

    async def follow(self, store: PostgresStore, scope: trio.CancelScope) -> None:
        """Read on, woken by notifications and polling every 100 ms, through every fault."""
        with scope:
            while True:
                try:
                    if not await self.read_on(store):
                        with trio.move_on_after(0.1):
                            await store.wait_for_events()
                except StoreConnectionError:
                    await trio.sleep(0.1)

    async def read_on(self, store: PostgresStore) -> bool:
        """Read every page available after the cursor; whether it got events."""
        got = False
        while page := await store.read_events(self.cursor, limit=500):
            got = True
            self.followed.extend(event.event_id for event in page)
            self.cursor = page[-1].position
        return got

    async def drain(self, store: PostgresStore) -> bool:
        """Read to the end of the log (for `until`, which retries errors)."""
        await self.read_on(store)
        return True
