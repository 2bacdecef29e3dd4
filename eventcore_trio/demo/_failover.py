"""``eventcore-trio demo`` on PostgreSQL: three host processes, a killed leader, a verification.

Writers in this process run concurrent money transfers as commands (`execute`, two streams,
optimistic concurrency, retries). Three host processes run three transactional projectors,
six units (the balances in four partitions), and spread the units evenly among themselves,
each unit with a standby on another host. Part-way through, the busiest host is killed with
SIGKILL: the standbys take its units over at once, and the hosts left even out the spread.
At the end the read model is checked against a fold of every stream: balances equal, money
conserved, nothing lost, nothing applied twice.
"""

from __future__ import annotations

import functools
import random
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable

import attrs
import trio

from .._errors import RetriesExhausted
from .._events import StreamAppend
from .._status import ProjectionStatus
from .._tools._processes import run_ready_process
from ..commands import StateCache
from ..postgres import DSN_ENVIRONMENT_VARIABLE, PostgresStore, open_postgres_store
from ._bank import INITIAL_BALANCE, AccountOpened, balance_after, random_transfer, registry

ACCOUNTS = 20


@attrs.define
class _Stats:
    transfers: int = 0
    refused: int = 0
    retried: int = 0
    failover_ms: float | None = None
    killed_pid: int | None = None
    killed_units: int = 0
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
        [sys.executable, "-m", "eventcore_trio.demo._host_process", schema, app],
        stop_grace=10,
        env={DSN_ENVIRONMENT_VARIABLE: dsn},
        task_status=task_status,
    )


def _units_per_host(status: list[ProjectionStatus]) -> Counter[int]:
    # From a status the dashboard already fetched: no extra query.
    return Counter(s.leader.pid for s in status if s.leader is not None)


async def _writer(
    store: PostgresStore,
    accounts: list[str],
    seed: int,
    stats: _Stats,
    stop: trio.Event,
    cache: StateCache,
) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        try:
            attempts = await random_transfer(store, accounts, rng, most=200, cache=cache)
        except RetriesExhausted:
            attempts = None
        if attempts is None:
            stats.refused += 1
        else:
            stats.transfers += 1
            stats.retried += attempts - 1
        await trio.sleep(0.002)


async def _open_dashboard(
    store: PostgresStore, nursery: trio.Nursery, out: Callable[[str], None]
) -> None:
    # The same run in a browser: the units spread over the hosts, the failover.
    try:
        from ..dashboard import serve_dashboard
    except ImportError:
        out("(install the dashboard extra to watch this run in a browser)")
        return
    # Port 8000 when it is free (a URL to remember), else any free one.
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 8000))
            bind = "127.0.0.1:8000"
        except OSError:
            bind = "127.0.0.1:0"
    urls = await nursery.start(functools.partial(serve_dashboard, store, bind=bind))
    out(f"dashboard: open {urls[0]} to watch the units and the failover live")


def _render(stats: _Stats, elapsed: float) -> list[str]:
    rate = 2 * stats.transfers / elapsed if elapsed >= 1 else 0.0
    lines = [
        f"{elapsed:5.1f}s  transfers {stats.transfers} ({rate:,.0f} events/s)  "
        f"refused {stats.refused}  conflicts retried {stats.retried}"
    ]
    for record in stats.status:
        leader = "-" if record.leader is None else f"pid {record.leader.pid}"
        lines.append(
            f"   {record.unit:14} {record.state.value:8} leader {leader:10} "
            f"standbys {record.standbys}  checkpoint {record.checkpoint or '-'!s:12}  "
            f"lag {record.lag_events} events / {record.lag_seconds:.2f}s"
        )
    spread = _units_per_host(stats.status)
    lines.append(
        "   units per host: " + ", ".join(f"pid {pid}: {n}" for pid, n in sorted(spread.items()))
    )
    if stats.failover_ms is not None:
        lines.append(
            f"   failover: host pid {stats.killed_pid} killed with SIGKILL while leading "
            f"{stats.killed_units} units; standbys took them over in {stats.failover_ms:.0f} ms"
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
                await _open_dashboard(store, nursery, out)
                stop = trio.Event()
                # One cache for the writers: a transfer reads only its accounts' new events,
                # so the rate stays level as the accounts grow.
                cache = StateCache()
                for seed in range(4):
                    nursery.start_soon(_writer, store, accounts, seed, stats, stop, cache)
                begin = time.monotonic()
                shown = 0
                next_line = 0.0
                while (elapsed := time.monotonic() - begin) < duration:
                    stats.status = await store.projection_status()
                    spread = _units_per_host(stats.status)
                    # Once every host leads something (or, in a very short run, anyway).
                    if (
                        stats.killed_pid is None
                        and spread
                        and elapsed >= duration * 0.4
                        and (len(spread) == len(hosts) or elapsed >= duration * 0.7)
                    ):
                        out(
                            "units per host before the kill: "
                            + ", ".join(f"pid {p}: {n}" for p, n in sorted(spread.items()))
                        )
                        busiest = max(spread, key=lambda pid: spread[pid])
                        await _kill_and_time(store, hosts, busiest, stats)
                        out(
                            f"killed host pid {busiest} (leading {stats.killed_units} units) "
                            f"with SIGKILL; standbys took its units over in "
                            f"{stats.failover_ms:.0f} ms"
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
                spread = _units_per_host(stats.status)
                out(
                    "units per host now: "
                    + ", ".join(f"pid {p}: {n}" for p, n in sorted(spread.items()))
                )
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
        f'CREATE TABLE "{app}".activity (type text PRIMARY KEY, events bigint NOT NULL); '
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
    store: PostgresStore, hosts: list[trio.Process], victim_pid: int, stats: _Stats
) -> None:
    # Timed by the locks themselves (one cheap query every 2 ms): a unit is taken over
    # once a session other than the dead host's holds its lock.
    units = [s.unit for s in stats.status if s.leader is not None and s.leader.pid == victim_pid]
    before = await store.admin.lock_sessions(units)
    victim = next(h for h in hosts if h.pid == victim_pid)
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    stats.killed_pid = victim_pid
    stats.killed_units = len(units)
    with trio.fail_after(30):
        while True:
            now = await store.admin.lock_sessions(units)
            if len(now) == len(units) and all(now[u] != before.get(u) for u in units):
                break
            await trio.sleep(0.002)
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
