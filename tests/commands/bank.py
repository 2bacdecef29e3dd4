"""A small bank domain for command tests: typed events, a transfer with no overdraft."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from eventcore_trio import EventRegistry, RecordedEvent

registry = EventRegistry()


@registry.register("AccountOpened")
@attrs.frozen
class AccountOpened:
    initial: int


@registry.register("MoneyWithdrawn")
@attrs.frozen
class MoneyWithdrawn:
    amount: int
    to: str


@registry.register("MoneyDeposited")
@attrs.frozen
class MoneyDeposited:
    amount: int
    source: str


class InsufficientFunds(Exception):
    """The domain refuses a transfer that would overdraw the source account."""


def balance_after(balance: int, event: RecordedEvent) -> int:
    typed = registry.decode(event)
    if isinstance(typed, AccountOpened):
        return typed.initial
    if isinstance(typed, MoneyWithdrawn):
        return balance - typed.amount
    if isinstance(typed, MoneyDeposited):
        return balance + typed.amount
    return balance


@attrs.frozen
class OpenAccount:
    """Open an account with an initial balance (exactly once)."""

    account: str
    initial: int

    def streams(self) -> Sequence[str]:
        return [self.account]

    def initial_state(self) -> bool:
        return False

    def evolve(self, state: bool, event: RecordedEvent) -> bool:
        return True

    def decide(self, state: bool) -> Mapping[str, Sequence[Any]]:
        if state:
            raise ValueError(f"{self.account} is already open")
        return {self.account: [AccountOpened(self.initial)]}


@attrs.frozen
class Transfer:
    """Move money between two accounts; refuse to overdraw the source."""

    source: str
    target: str
    amount: int

    def streams(self) -> Sequence[str]:
        return [self.source, self.target]

    def initial_state(self) -> dict[str, int]:
        return {}

    def evolve(self, state: dict[str, int], event: RecordedEvent) -> dict[str, int]:
        return {**state, event.stream_id: balance_after(state.get(event.stream_id, 0), event)}

    def decide(self, state: dict[str, int]) -> Mapping[str, Sequence[Any]]:
        if state.get(self.source, 0) < self.amount:
            raise InsufficientFunds(f"{self.source} has {state.get(self.source, 0)}")
        return {
            self.source: [MoneyWithdrawn(self.amount, self.target)],
            self.target: [MoneyDeposited(self.amount, self.source)],
        }
