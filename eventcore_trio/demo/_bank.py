"""The bank: the one domain model the demo, the benchmarks and the tests share.

Accounts are streams; a transfer is a command that reads both accounts, refuses to overdraw
the source, and appends a withdrawal and a deposit atomically with both expected versions.
Events are typed (an `EventRegistry`); folds read the stored JSON directly, since a balance
needs only two fields and this fold runs once per event a command reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

from .._events import RecordedEvent
from .._typed import EventRegistry

#: What every demo account is opened with.
INITIAL_BALANCE: Final = 1_000

#: The bank's event types.
registry = EventRegistry()


@registry.register("AccountOpened")
@attrs.frozen
class AccountOpened:
    """An account was opened with *initial* in it."""

    initial: int


@registry.register("MoneyWithdrawn")
@attrs.frozen
class MoneyWithdrawn:
    """*amount* left this account for account *to*."""

    amount: int
    to: str


@registry.register("MoneyDeposited")
@attrs.frozen
class MoneyDeposited:
    """*amount* arrived in this account from account *source*."""

    amount: int
    source: str


class InsufficientFunds(Exception):
    """The bank refuses a transfer that would overdraw the source account."""


def balance_after(balance: int, event: RecordedEvent) -> int:
    """An account's balance after *event* of its stream."""
    if event.type == "AccountOpened":
        return int(event.data["initial"])
    if event.type == "MoneyWithdrawn":
        return balance - int(event.data["amount"])
    if event.type == "MoneyDeposited":
        return balance + int(event.data["amount"])
    return balance


@attrs.frozen
class OpenAccount:
    """Open *account* with *initial* (exactly once)."""

    account: str
    initial: int

    def streams(self) -> Sequence[str]:
        """The account's stream."""
        return [self.account]

    def initial_state(self) -> bool:
        """Not open yet."""
        return False

    def evolve(self, state: bool, event: RecordedEvent) -> bool:
        """Any event means the account exists."""
        return True

    def decide(self, state: bool) -> Mapping[str, Sequence[Any]]:
        """Open it, unless it is open already."""
        if state:
            raise ValueError(f"{self.account} is already open")
        return {self.account: [AccountOpened(self.initial)]}


@attrs.frozen
class Transfer:
    """Move *amount* from *source* to *target*; refuse to overdraw *source*."""

    source: str
    target: str
    amount: int

    def streams(self) -> Sequence[str]:
        """Both accounts: the target is read so its version is checked too."""
        return [self.source, self.target]

    def initial_state(self) -> dict[str, int]:
        """No balances known yet."""
        return {}

    def evolve(self, state: dict[str, int], event: RecordedEvent) -> dict[str, int]:
        """Each account's balance."""
        return {**state, event.stream_id: balance_after(state.get(event.stream_id, 0), event)}

    def decide(self, state: dict[str, int]) -> Mapping[str, Sequence[Any]]:
        """A withdrawal and a deposit, or `InsufficientFunds`."""
        if state.get(self.source, 0) < self.amount:
            raise InsufficientFunds(f"{self.source} has {state.get(self.source, 0)}")
        return {
            self.source: [MoneyWithdrawn(self.amount, self.target)],
            self.target: [MoneyDeposited(self.amount, self.source)],
        }
