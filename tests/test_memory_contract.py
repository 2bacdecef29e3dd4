"""The backend contract suite, run against the in-memory store."""

from typing import Any

import pytest

from eventcore_trio import Store, open_memory_store
from eventcore_trio.memory import MemoryStore
from eventcore_trio.testing import (
    BackendHarness,
    MemoryHarness,
    PersonalDataContract,
    StoreContract,
)


class TestMemoryStore(StoreContract):
    """Every contract of the four protocols holds for `open_memory_store`."""

    @pytest.fixture
    def harness(self) -> BackendHarness:
        """The memory backend's harness."""
        return MemoryHarness()


class TestMemoryPersonal(PersonalDataContract):
    """Personal data on `open_memory_store` (issue 29)."""

    @pytest.fixture
    def open_store(self) -> Any:
        """A fresh memory store per open (`open_memory_store`)."""
        return open_memory_store

    async def stored_text(self, store: Store) -> str:
        """Everything the memory store keeps, as the repr of its data (events, snapshots,
        dead letters, wrapped keys, forgets, ...), not this process's unwrapped keys."""
        assert isinstance(store, MemoryStore)
        state = store.admin.state
        tables = {k: v for k, v in vars(state.personal).items() if k != "keyring"}
        return repr(vars(state)) + repr(tables)
