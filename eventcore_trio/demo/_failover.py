"""``eventcore-trio demo`` on PostgreSQL: three host processes, a killed leader, a verification.

Writers in this process run concurrent money transfers as commands (`execute`, two streams,
optimistic concurrency, retries). Three host processes compete to run two transactional
projectors; one leads each, the others stand by. Part-way through, the leader of "balances" is
killed with SIGKILL and a standby takes over. At the end the read model is checked against a
fold of every stream: balances equal, money conserved, nothing lost, nothing applied twice.
"""

from __future__ import annotations

import random
import signal
import sys
import time
import uuid
from collections.abc import Callable

import attrs
import trio

from .._errors import RetriesExhausted
from .._events import StreamAppend
from .._leaders import wait_for_leader
from .._processes import run_ready_process
from .._status import ProjectionStatus
from ..commands import execute
from ..postgres import DSN_ENVIRONMENT_VARIABLE, PostgresStore, open_postgres_store
from ._bank import (
    INITIAL_BALANCE,
    AccountOpened,
    InsufficientFunds,
    Transfer,
    balance_after,
    registry,
)

ACCOUNTS = 20


@attrs.define
class _Stats:
    transfers: int = 0
    refused: int = 0
    retried: int = 0
    failover_ms: float | None = None
    killed_pid: int | None = None
    status: list[ProjectionStatus] = attrs.Factory(list)


async def _host(
    dsn: str,
    schema: str,
    app: str,
    *,
    task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
) -> None:
    # The DSN (which may hold a password) goes through the environment, not the command line.
    await run_ready_process(
        [sys.executable, "-m", "eventcore_trio.demo._host", schema, app],
        stop_grace=10,
        env={DSN_ENVIRONMENT_VARIABLE: dsn},
        task_status=task_status,
    )


def _status_leader(status: list[ProjectionStatus], name: str) -> int | None:
    # From a status the dashboard already fetched: no extra query.
    return next((s.leader.pid for s in status if s.name == name and s.leader is not None), None)


async def _writer(
    store: PostgresStore, accounts: list[str], seed: int, stats: _Stats, stop: trio.Event
) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        source, target = rng.sample(accounts, 2)
        try:
            result = await execute(
                store, Transfer(source, target, rng.randint(1, 200)), registry=registry
            )
        except (InsufficientFunds, RetriesExhausted):
            stats.refused += 1
        else:
            stats.transfers += 1
            stats.retried += result.attempts - 1
        await trio.sleep(0.002)


def _render(stats: _Stats, elapsed: float) -> list[str]:
    rate = 2 * stats.transfers / elapsed if elapsed >= 1 else 0.0
    lines = [
        f"{elapsed:5.1f}s  transfers {stats.transfers} ({rate:,.0f} events/s)  "
        f"refused {stats.refused}  conflicts retried {stats.retried}"
    ]
    for record in stats.status:
        leader = "-" if record.leader is None else f"pid {record.leader.pid}"
        lines.append(
            f"   {record.name:10} {record.state.value:8} leader {leader:10} "
            f"standbys {record.standbys}  checkpoint {record.checkpoint or '-'}  "
            f"lag {record.lag_events} events / {record.lag_seconds:.2f}s"
        )
    if stats.failover_ms is not None:
        lines.append(
            f"   failover: leader pid {stats.killed_pid} killed with SIGKILL, standby took "
            f"over in {stats.failover_ms:.0f} ms"
        )
    return lines


async def run_failover_demo(
    dsn: str, *, duration: float, out: Callable[[str], None], live: bool
) -> bool:
    """Run the demo against *dsn* for about *duration* seconds; True if verified."""
    schema = f"demo_{uuid.uuid4().hex[:8]}"
    app = f"{schema}_app"
    stats = _Stats()
    accounts = [f"account-{n:03d}" for n in range(ACCOUNTS)]
    async with open_postgres_store(dsn, schema=schema) as store:
        await _open_accounts(store, app, accounts)
        out(f"opened {ACCOUNTS} accounts with {INITIAL_BALANCE} each; starting 3 host processes…")
        try:
            async with trio.open_nursery() as nursery:
                hosts = [await nursery.start(_host, dsn, schema, app) for _ in range(3)]
                out(f"hosts running: pids {', '.join(str(h.pid) for h in hosts)}")
                stop = trio.Event()
                for seed in range(4):
                    nursery.start_soon(_writer, store, accounts, seed, stats, stop)
                begin = time.monotonic()
                shown = 0
                next_line = 0.0
                while (elapsed := time.monotonic() - begin) < duration:
                    stats.status = await store.projection_status()
                    if stats.killed_pid is None and elapsed >= duration * 0.4:
                        leader = _status_leader(stats.status, "balances")
                        if leader is not None:
                            await _kill_and_time(store, hosts, leader, stats)
                            out(
                                f"killed the leader of 'balances' (pid {leader}) with SIGKILL; "
                                f"a standby took over in {stats.failover_ms:.0f} ms"
                            )
                            shown = 0
                    lines = _render(stats, elapsed)
                    if live:
                        if shown:
                            sys.stdout.write(f"\x1b[{shown}F\x1b[J")
                        out("\n".join(lines))
                        shown = len(lines)
                    elif elapsed >= next_line:
                        out("\n".join(lines))
                        next_line = elapsed + 2
                    await trio.sleep(0.5)
                stop.set()
                out("writers stopped; waiting for the projections to catch up…")
                with trio.fail_after(60):
                    while True:
                        stats.status = await store.projection_status()
                        if stats.status and all(s.lag_events == 0 for s in stats.status):
                            break
                        await trio.sleep(0.1)
                nursery.cancel_scope.cancel()
            return await _verify(store, app, accounts, stats, out)
        finally:
            with trio.CancelScope(shield=True):
                for name in (app, schema):
                    await store.admin.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


async def _open_accounts(store: PostgresStore, app: str, accounts: list[str]) -> None:
    # The read model's tables, and the accounts with their opening balances.
    await store.admin.execute(
        f'CREATE SCHEMA "{app}"; '
        f'CREATE TABLE "{app}".balances (account text PRIMARY KEY, balance bigint NOT NULL); '
        f'CREATE TABLE "{app}".applied (event_id uuid NOT NULL, applied_by int NOT NULL); '
        f'CREATE TABLE "{app}".totals (transfers bigint NOT NULL, moved bigint NOT NULL); '
        f'INSERT INTO "{app}".totals VALUES (0, 0)'
    )
    await store.append_atomic(
        [
            StreamAppend(
                a, [registry.new_event(AccountOpened(INITIAL_BALANCE))], expected_version=0
            )
            for a in accounts
        ]
    )


async def _kill_and_time(
    store: PostgresStore, hosts: list[trio.Process], leader: int, stats: _Stats
) -> None:
    victim = next(h for h in hosts if h.pid == leader)
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    stats.killed_pid = leader
    with trio.fail_after(30):
        await wait_for_leader(store, "balances", other_than=leader)
    stats.failover_ms = (time.monotonic() - killed_at) * 1000


async def _verify(
    store: PostgresStore, app: str, accounts: list[str], stats: _Stats, out: Callable[[str], None]
) -> bool:
    problems = []
    reference: dict[str, int] = {}
    events = 0
    for account in accounts:
        for event in await store.read_stream(account):
            events += 1
            reference[account] = balance_after(reference.get(account, 0), event)
    rows = await store.admin.fetch(f'SELECT account, balance FROM "{app}".balances')
    projected = {r["account"]: r["balance"] for r in rows}
    if projected != reference:
        problems.append("projected balances differ from the streams' fold")
    if sum(reference.values()) != ACCOUNTS * INITIAL_BALANCE:
        problems.append("money was created or destroyed")
    if any(v < 0 for v in reference.values()):
        problems.append("an account is overdrawn")
    applied = await store.admin.fetchrow(
        f"SELECT count(*) AS n, count(DISTINCT event_id) AS distinct_n, "
        f'count(DISTINCT applied_by) AS hosts FROM "{app}".applied'
    )
    assert applied is not None
    if applied["n"] != applied["distinct_n"]:
        problems.append(f"{applied['n'] - applied['distinct_n']} events were applied twice")
    if applied["distinct_n"] != events:
        problems.append(f"{events - applied['distinct_n']} events were not applied")
    totals = await store.admin.fetchrow(f'SELECT transfers, moved FROM "{app}".totals')
    assert totals is not None
    if totals["transfers"] != stats.transfers:
        problems.append("the transfer count projection does not match the transfers made")
    out(
        f"done: {stats.transfers} transfers, {stats.refused} refused for lack of funds, "
        f"{stats.retried} version conflicts retried; {events} events applied by "
        f"{applied['hosts']} host processes"
        + ("" if stats.failover_ms is None else f"; failover took {stats.failover_ms:.0f} ms")
    )
    if problems:
        for problem in problems:
            out(f"FAILED: {problem}")
        return False
    out(
        f"VERIFIED: balances match the event streams, total {ACCOUNTS * INITIAL_BALANCE} "
        "conserved, no account overdrawn, every event applied exactly once across the failover"
    )
    return True
