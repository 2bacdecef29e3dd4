"""The backend contract suite: one test per promise of the protocols.

Subclass `StoreContract` in a test module and provide a ``harness`` fixture returning a
`BackendHarness`; pytest collects every contract for that backend::

    class TestMyBackend(StoreContract):
        @pytest.fixture
        def harness(self) -> BackendHarness:
            return MyHarness()

The suite covers what EventCore's 27 contract tests cover, plus the hazards of DESIGN.md
section 6: late commits, concurrent writers under a polling reader, a lock session that is
killed, release on cancellation and on exceptions, bad input refused with nothing written, and
property-based checks of appends and filters.

It reads as the specification of the protocols, one test per promise, one module per subject:
`_appends`, `_reads`, `_subscriptions`, `_checkpoints`, `_leadership`, `_hosts`,
`_bad_input`, `_versions`; `StoreContract` is their sum.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ..._protocols import Store
from .._harness import BackendHarness
from ._appends import AppendContract
from ._bad_input import BadInputContract
from ._checkpoints import CheckpointContract
from ._hosts import HostContract
from ._leadership import LeadershipContract
from ._personal import PersonalDataContract as PersonalDataContract
from ._reads import ReadContract
from ._subscriptions import SubscriptionContract
from ._support import events as events
from ._support import follow_until as follow_until
from ._support import read_all as read_all
from ._tags import TaggedContract as TaggedContract
from ._versions import VersionContract


@pytest.mark.trio
class StoreContract(
    AppendContract,
    ReadContract,
    SubscriptionContract,
    CheckpointContract,
    LeadershipContract,
    HostContract,
    BadInputContract,
    VersionContract,
    TaggedContract,
):
    """The contract every backend satisfies; subclass it and provide a ``harness`` fixture.

    .. versionadded:: 0.1
    """

    @pytest.fixture
    def harness(self) -> BackendHarness:
        """Override in the subclass: the backend under test."""
        raise NotImplementedError("provide a `harness` fixture returning a BackendHarness")

    @pytest.fixture
    async def store(self, harness: BackendHarness) -> AsyncIterator[Store]:
        """A store opened through the harness for the whole test."""
        async with harness.open_store() as store:
            yield store


def _adopt_tests(contract: type, parts: tuple[type, ...]) -> None:
    # The parts' tests become the contract's own attributes, so they report
    # `StoreContract.test_...` (as docs/bad-input.md cites them) and, once the public package
    # fixes up its names, the public module: exactly as when the suite was one class.
    for part in parts:
        for name, test in list(vars(part).items()):
            if name.startswith("test_"):
                prefix = f"{part.__qualname__}."
                if test.__qualname__.startswith(prefix):
                    test.__qualname__ = (
                        f"{contract.__qualname__}.{test.__qualname__[len(prefix) :]}"
                    )
                setattr(contract, name, test)


_adopt_tests(StoreContract, StoreContract.__bases__)
