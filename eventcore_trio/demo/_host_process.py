"""A projector host for the demo: ``python -m eventcore_trio.demo._host_process SCHEMA APP``.

The DSN comes in ``EVENTCORE_DSN``.

Hosts three transactional projectors over the bank-account events, six units in all (the
balances are built in four partitions); the hosts spread the units among themselves. Each
event "balances" applies is also recorded with the host's pid, so the demo can show who
applied what and prove nothing was applied twice. Prints "ready" once running or standing
by; stops cleanly on SIGTERM.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

from .._events import RecordedEvent
from .._tools._processes import run_program
from ..postgres import DSN_ENVIRONMENT_VARIABLE, open_postgres_store
from ..projection import ProjectionConfig, ProjectionContext, projector, run_host

BANK_EVENTS = ("AccountOpened", "MoneyWithdrawn", "MoneyDeposited")


def make_projectors(app: str) -> list[Any]:
    """The demo's projectors, writing their read models into schema *app* through ctx.db."""

    # Partitioned: each account's events stay in order in one partition, and a balance is
    # keyed by account, so four units (spread over the hosts) can build it side by side.
    @projector("balances", event_types=BANK_EVENTS, stream_prefix="account-", partitions=4)
    async def balances(event: RecordedEvent, ctx: ProjectionContext) -> None:
        if event.type == "AccountOpened":
            delta = int(event.data["initial"])
        elif event.type == "MoneyWithdrawn":
            delta = -int(event.data["amount"])
        else:
            delta = int(event.data["amount"])
        ctx.db.queue(
            f'INSERT INTO "{app}".balances (account, balance) VALUES ($1, $2) '
            "ON CONFLICT (account) DO UPDATE SET balance = balances.balance + excluded.balance",
            event.stream_id,
            delta,
        )
        ctx.db.queue(
            f'INSERT INTO "{app}".applied (event_id, applied_by) VALUES ($1, $2)',
            event.event_id,
            os.getpid(),
        )

    @projector("transfers", event_types=["MoneyDeposited"])
    async def transfers(event: RecordedEvent, ctx: ProjectionContext) -> None:
        ctx.db.queue(
            f'UPDATE "{app}".totals SET transfers = transfers + 1, moved = moved + $1',
            int(event.data["amount"]),
        )

    @projector("activity", event_types=BANK_EVENTS)
    async def activity(event: RecordedEvent, ctx: ProjectionContext) -> None:
        ctx.db.queue(
            f'INSERT INTO "{app}".activity (type, events) VALUES ($1, 1) '
            "ON CONFLICT (type) DO UPDATE SET events = activity.events + 1",
            event.type,
        )

    return [balances, transfers, activity]


async def main(dsn: str, schema: str, app: str) -> int:
    """Host the demo's projectors until SIGTERM or SIGINT (see `run_host`)."""
    return await run_host(
        functools.partial(
            open_postgres_store, dsn, schema=schema, application_name="eventcore-demo"
        ),
        make_projectors(app),
        ProjectionConfig(batch_size=100, poll_interval=0.5, balance_interval=0.5),
    )


if __name__ == "__main__":
    # The DSN comes from the environment (see run_ready_process), never the command line.
    sys.exit(run_program(main, os.environ[DSN_ENVIRONMENT_VARIABLE], sys.argv[1], sys.argv[2]))
