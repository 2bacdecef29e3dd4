"""`open_memory_store`: an empty store for an ``async with`` block, closed when it ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .._personal._keys import Keyring, KeyWrapper, resolve_key_encryption_key
from ._leadership import release_all
from ._state import MemoryState
from ._store import MemoryStore


@asynccontextmanager
async def open_memory_store(
    *, key_encryption_key: bytes | KeyWrapper | None = None
) -> AsyncIterator[MemoryStore]:
    """Open an empty in-memory store for the duration of an ``async with`` block.

    Example::

        async with open_memory_store() as store:
            await store.append("account-1", [NewEvent("Opened", {"owner": "ada"})])

    Args:
        key_encryption_key: the key that wraps subjects' data keys, for events with
            personal fields: 32 random bytes, or a `KeyWrapper` (a KMS). None reads
            ``EVENTCORE_KEY_ENCRYPTION_KEY`` (32 bytes in base64); without either, an
            append with personal fields raises `ConfigurationError` (see
            docs/personal-data.md).

    Raises:
        ConfigurationError: *key_encryption_key*, or the variable, is not a valid key.

    .. versionadded:: 0.1
    .. versionchanged:: 0.4
       *key_encryption_key*.
    """
    # Checked before the block starts; the memory store keeps every key it unwraps.
    keyring = Keyring(resolve_key_encryption_key(key_encryption_key), max_cached=None)
    state = MemoryState(keyring)
    store = MemoryStore(state)
    try:
        yield store
    finally:
        state.closed = True
        release_all(state)
