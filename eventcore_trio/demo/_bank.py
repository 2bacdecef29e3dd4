"""The bank: the one domain model the demo, the benchmarks and the tests share.

Accounts are streams, each folded into an `Account` state; a transfer is a state command
that reads both accounts, refuses to overdraw the source, and appends a withdrawal and a
deposit atomically with both expected versions. `balance_after` reads the stored JSON
directly, for verifications that fold whole streams without the registry.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

from .._events import RecordedEvent
from .._protocols import EventStore
from .._typed import EventRegistry
from ..commands import RetryPolicy, StateCache, execute

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


@registry.state("Account", version=1, snapshot_every=500)
@attrs.frozen
class Account:
    """An account's state, folded from its stream's typed events."""

    opened: bool = False
    balance: int = 0

    def evolve(self, event: object) -> Account:
        """The account after *event*."""
        match event:
            case AccountOpened(initial=initial):
                return Account(opened=True, balance=initial)
            case MoneyWithdrawn(amount=amount):
                return Account(opened=True, balance=self.balance - amount)
            case MoneyDeposited(amount=amount):
                return Account(opened=True, balance=self.balance + amount)
        return self


@attrs.frozen
class OpenAccount:
    """Open *account* with *initial* (exactly once)."""

    account: str
    initial: int

    def streams(self) -> Mapping[str, type[Account]]:
        """The account's stream."""
        return {self.account: Account}

    def decide(self, states: Mapping[str, Account]) -> Mapping[str, Sequence[Any]]:
        """Open it, unless it is open already."""
        if states[self.account].opened:
            raise ValueError(f"{self.account} is already open")
        return {self.account: [AccountOpened(self.initial)]}


@attrs.frozen
class Transfer:
    """Move *amount* from *source* to *target*; refuse to overdraw *source*."""

    source: str
    target: str
    amount: int

    def streams(self) -> Mapping[str, type[Account]]:
        """Both accounts: the target is read so its version is checked too."""
        return {self.source: Account, self.target: Account}

    def decide(self, states: Mapping[str, Account]) -> Mapping[str, Sequence[Any]]:
        """A withdrawal and a deposit, or `InsufficientFunds`."""
        balance = states[self.source].balance
        if balance < self.amount:
            raise InsufficientFunds(f"{self.source} has {balance}")
        return {
            self.source: [MoneyWithdrawn(self.amount, self.target)],
            self.target: [MoneyDeposited(self.amount, self.source)],
        }


async def random_transfer(
    store: EventStore,
    accounts: Sequence[str],
    rng: random.Random,
    *,
    most: int,
    cache: StateCache | None = None,
    retry: RetryPolicy | None = None,
) -> int | None:
    """Run one `Transfer` of 1 to *most* between two of *accounts* that *rng* picks.

    The writers of the demo, the benchmarks and the tests all run this: a command across
    two streams, retried on version conflicts.

    Returns:
        How many attempts it took (1 without a conflict), or None when the source lacked
        the funds and the transfer was refused.

    Raises:
        RetriesExhausted: it met a conflict at every attempt *retry* allows.
    """
    source, target = rng.sample(accounts, 2)
    try:
        result = await execute(
            store,
            Transfer(source, target, rng.randint(1, most)),
            registry=registry,
            retry=retry,
            cache=cache,
        )
    except InsufficientFunds:
        return None
    return result.attempts
