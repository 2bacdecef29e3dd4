"""The backend contract suite, run against the in-memory store."""

import pytest

from eventcore_trio.testing import BackendHarness, MemoryHarness, StoreContract


class TestMemoryStore(StoreContract):
    """Every contract of the four protocols holds for `open_memory_store`."""

    @pytest.fixture
    def harness(self) -> BackendHarness:
        """The memory backend's harness."""
        return MemoryHarness()
