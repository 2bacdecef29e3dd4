"""Fixtures of the runtime's backend contracts (test classes provide ``harness``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from eventcore_trio import Store
from eventcore_trio.testing import BackendHarness


@pytest.fixture
async def store(harness: BackendHarness) -> AsyncIterator[Store]:
    """A fresh store from the test class's backend harness."""
    async with harness.open_store() as store:
        yield store
