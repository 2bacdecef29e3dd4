"""`open_memory_store`: an empty store for an ``async with`` block, closed when it ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ._leadership import release_all
from ._state import MemoryState
from ._store import MemoryStore


@asynccontextmanager
async def open_memory_store() -> AsyncIterator[MemoryStore]:
    """Open an empty in-memory store for the duration of an ``async with`` block.

    Example::

        async with open_memory_store() as store:
            await store.append("account-1", [NewEvent("Opened", {"owner": "ada"})])

    .. versionadded:: 0.1
    """
    state = MemoryState()
    store = MemoryStore(state)
    try:
        yield store
    finally:
        state.closed = True
        release_all(state)
