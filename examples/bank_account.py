"""A bank account application: commands write, a projection keeps balances.

Run it with ``uv run python examples/bank_account.py`` (in-memory) or set ``EVENTCORE_DSN`` to
run it on PostgreSQL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import trio

from eventcore_trio import (
    EventRegistry,
    RecordedEvent,
    Store,
    execute,
    open_memory_store,
    open_postgres_store,
)
from eventcore_trio.projection import ProjectionContext, projector, run_projection

registry = EventRegistry()


@registry.register("example.AccountOpened")
@attrs.frozen
class AccountOpened:
    owner: str


@registry.register("example.Deposited")
@attrs.frozen
class Deposited:
    amount: int


@registry.register("example.Withdrawn")
@attrs.frozen
class Withdrawn:
    amount: int


class Overdraft(Exception):
    """Refused: the account does not hold enough."""


def balance_of(events: Sequence[Any]) -> int:
    balance = 0
    for event in events:
        if isinstance(event, Deposited):
            balance += event.amount
        elif isinstance(event, Withdrawn):
            balance -= event.amount
    return balance


@attrs.frozen
class Open:
    account: str
    owner: str

    def streams(self) -> Sequence[str]:
        return [self.account]

    def initial_state(self) -> bool:
        return False

    def evolve(self, opened: bool, event: RecordedEvent) -> bool:
        return True

    def decide(self, opened: bool) -> Mapping[str, Sequence[Any]]:
        return {} if opened else {self.account: [AccountOpened(self.owner)]}


@attrs.frozen
class Withdraw:
    account: str
    amount: int

    def streams(self) -> Sequence[str]:
        return [self.account]

    def initial_state(self) -> list[Any]:
        return []

    def evolve(self, events: list[Any], event: RecordedEvent) -> list[Any]:
        return [*events, registry.decode(event)]

    def decide(self, events: list[Any]) -> Mapping[str, Sequence[Any]]:
        if balance_of(events) < self.amount:
            raise Overdraft(f"{self.account} holds {balance_of(events)}")
        return {self.account: [Withdrawn(self.amount)]}


@attrs.frozen
class Deposit:
    account: str
    amount: int

    def streams(self) -> Sequence[str]:
        return [self.account]

    def initial_state(self) -> None:
        return None

    def evolve(self, state: None, event: RecordedEvent) -> None:
        return None

    def decide(self, state: None) -> Mapping[str, Sequence[Any]]:
        return {self.account: [Deposited(self.amount)]}


balances: dict[str, int] = {}


@projector(
    "example-balances", event_types=["example.Deposited", "example.Withdrawn"], registry=registry
)
async def track_balances(event: Deposited | Withdrawn, ctx: ProjectionContext) -> None:
    assert ctx.event is not None
    delta = event.amount if isinstance(event, Deposited) else -event.amount
    balances[ctx.event.stream_id] = balances.get(ctx.event.stream_id, 0) + delta


async def run(store: Store) -> dict[str, int]:
    await execute(store, Open("account-ada", "Ada"), registry=registry)
    await execute(store, Deposit("account-ada", 100), registry=registry)
    await execute(store, Withdraw("account-ada", 30), registry=registry)
    try:
        await execute(store, Withdraw("account-ada", 500), registry=registry)
    except Overdraft as refused:
        print(f"refused: {refused}")
    await run_projection(store, track_balances)
    return balances


async def main() -> None:
    dsn = os.environ.get("EVENTCORE_DSN")
    if dsn:
        async with open_postgres_store(dsn, schema="example_bank") as store:
            result = await run(store)
    else:
        async with open_memory_store() as store:
            result = await run(store)
    print(f"balances: {result}")
    assert result["account-ada"] >= 70


if __name__ == "__main__":
    trio.run(main)
