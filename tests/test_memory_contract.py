"""The backend contract suite, run against the in-memory store."""

from collections.abc import AsyncIterator

import pytest

from eventcore_trio import open_memory_store
from eventcore_trio.memory import MemoryStore
from eventcore_trio.testing import BackendHarness, MemoryHarness, StoreContract, TaggedContract


class TestMemoryStore(StoreContract):
    """Every contract of the four protocols holds for `open_memory_store`."""

    @pytest.fixture
    def harness(self) -> BackendHarness:
        """The memory backend's harness."""
        return MemoryHarness()


class TestMemoryTags(TaggedContract):
    """Tags, queries and conditional appends on `open_memory_store` (issue 28)."""

    @pytest.fixture
    async def store(self) -> AsyncIterator[MemoryStore]:
        """A fresh memory store."""
        async with open_memory_store() as store:
            yield store
