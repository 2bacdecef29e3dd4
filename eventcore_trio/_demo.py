"""The demo behind ``eventcore-trio demo``: bank accounts, concurrent transfers, a projection.

Writers move money between accounts with optimistic concurrency across two streams at once
(`append_atomic` with both expected versions); a projection, holding leadership, follows the
global order and keeps balances and a checkpoint. At the end the projected balances are checked
against a fold of every stream: the demo exits 0 only if nothing was lost or counted twice.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import attrs
import trio

from ._concurrency import run_program
from ._errors import VersionConflict
from ._events import NewEvent, RecordedEvent, StreamAppend
from ._filters import EventFilter
from ._positions import Position
from ._protocols import Store

INITIAL_BALANCE = 1_000


@attrs.define
class DemoReport:
    """What the demo did and whether the verification held."""

    accounts: int
    transfers: int = 0
    refused: int = 0
    conflicts: int = 0
    projected_events: int = 0
    checkpoint: Position | None = None
    problems: list[str] = attrs.Factory(list)

    @property
    def ok(self) -> bool:
        """True when the projection matched the reference fold exactly."""
        return not self.problems


def _apply(balances: dict[str, int], event: RecordedEvent) -> None:
    if event.type == "AccountOpened":
        balances[event.stream_id] = event.data["initial"]
    elif event.type == "MoneyWithdrawn":
        balances[event.stream_id] -= event.data["amount"]
    elif event.type == "MoneyDeposited":
        balances[event.stream_id] += event.data["amount"]


async def _transfer_worker(
    store: Store, accounts: list[str], transfers: int, seed: int, report: DemoReport
) -> None:
    rng = random.Random(seed)
    for _ in range(transfers):
        source, target = rng.sample(accounts, 2)
        amount = rng.randint(1, 300)
        while True:
            balances: dict[str, int] = {}
            source_events = await store.read_stream(source)
            target_events = await store.read_stream(target)
            for event in source_events:
                _apply(balances, event)
            if balances[source] < amount:
                report.refused += 1
                break
            transfer = {"from": source, "to": target, "amount": amount}
            try:
                await store.append_atomic(
                    [
                        StreamAppend(
                            source,
                            [NewEvent("MoneyWithdrawn", transfer)],
                            expected_version=len(source_events),
                        ),
                        StreamAppend(
                            target,
                            [NewEvent("MoneyDeposited", transfer)],
                            expected_version=len(target_events),
                        ),
                    ]
                )
            except VersionConflict:
                report.conflicts += 1
                continue
            report.transfers += 1
            break


async def _project(
    store: Store, balances: dict[str, int], report: DemoReport, writers_done: trio.Event
) -> None:
    event_filter = EventFilter(stream_prefix="account-")
    async with store.try_acquire("demo-balances"):
        position = await store.load_checkpoint("demo-balances")
        while True:
            finished = writers_done.is_set()
            page = await store.read_events(position, limit=500, filter=event_filter)
            for event in page:
                _apply(balances, event)
            report.projected_events += len(page)
            if page:
                position = page[-1].position
                await store.save_checkpoint("demo-balances", position)
                report.checkpoint = position
            elif finished:
                return
            else:
                await trio.sleep(0.05)


async def run_demo(
    open_store: Callable[[], AbstractAsyncContextManager[Store]],
    *,
    accounts: int = 20,
    writers: int = 4,
    transfers_per_writer: int = 150,
    out: Callable[[str], None] = print,
    wait: float = 60,
) -> DemoReport:
    """Run the bank-account demo against the store *open_store* opens; return its report.

    The projection gets *wait* seconds after the writers finish to see every event; if it
    does not, that is reported as a problem.
    """
    names = [f"account-{n:03d}" for n in range(accounts)]
    report = DemoReport(accounts=accounts)
    projected: dict[str, int] = {}
    async with open_store() as store:
        for name in names:
            await store.append(
                name, [NewEvent("AccountOpened", {"initial": INITIAL_BALANCE})], expected_version=0
            )
        out(f"opened {accounts} accounts with {INITIAL_BALANCE} each")
        started = time.monotonic()
        writers_done = trio.Event()
        async with trio.open_nursery() as nursery:

            async def progress() -> None:
                while True:
                    await trio.sleep(1)
                    elapsed = time.monotonic() - started
                    out(
                        f"{elapsed:5.1f}s  transfers {report.transfers:5d}  conflicts retried "
                        f"{report.conflicts:4d}  projected {report.projected_events:6d} events  "
                        f"checkpoint {report.checkpoint}"
                    )

            nursery.start_soon(progress)
            async with trio.open_nursery() as projecting:
                # The projection returns once the writers are done and it has caught up.
                projecting.start_soon(_project, store, projected, report, writers_done)
                async with trio.open_nursery() as writing:
                    for w in range(writers):
                        writing.start_soon(
                            _transfer_worker, store, names, transfers_per_writer, w, report
                        )
                writers_done.set()
                projecting.cancel_scope.deadline = trio.current_time() + wait
            if projecting.cancel_scope.cancelled_caught:
                report.problems.append(f"the projection did not catch up within {wait}s")
            nursery.cancel_scope.cancel()

        # Verification against a reference fold of every stream.
        reference: dict[str, int] = {}
        for name in names:
            for event in await store.read_stream(name):
                _apply(reference, event)
        if projected != reference:
            report.problems.append("projected balances differ from the streams' fold")
        if sum(reference.values()) != accounts * INITIAL_BALANCE:
            report.problems.append("money was created or destroyed")
        if any(balance < 0 for balance in reference.values()):
            report.problems.append("an account is overdrawn")
        if report.projected_events != accounts + 2 * report.transfers:
            report.problems.append("the projection saw a different number of events")
        if await store.load_checkpoint("demo-balances") != report.checkpoint:
            report.problems.append("the saved checkpoint is not the last projected position")
    elapsed = time.monotonic() - started
    out(
        f"done in {elapsed:.1f}s: {report.transfers} transfers, {report.refused} refused for lack "
        f"of funds, {report.conflicts} version conflicts retried, "
        f"{report.projected_events} events projected"
    )
    if report.ok:
        out(
            f"VERIFIED: balances match the event streams, total {accounts * INITIAL_BALANCE} "
            "conserved, no account overdrawn, every event projected exactly once"
        )
    else:
        for problem in report.problems:
            out(f"FAILED: {problem}")
    return report


def demo_main(dsn: str | None, *, memory: bool, scale: int, duration: float) -> int:
    """Run the demo on a DSN, an embedded PostgreSQL, or the memory store; return exit code.

    On PostgreSQL it is the failover demo (three host processes, a killed leader); on the
    memory store, the single-process version of the same bank.
    """
    from ._failover_demo import run_failover_demo
    from .memory import open_memory_store

    def out(line: str) -> None:
        print(line, flush=True)

    live = sys.stdout.isatty()
    if memory:
        out("store: in-memory (single process; use PostgreSQL for the failover demo)")
        report = run_program(
            lambda: run_demo(open_memory_store, transfers_per_writer=scale, out=out)
        )
        return 0 if report.ok else 1
    if dsn is not None:
        out("store: PostgreSQL at the given DSN (a temporary schema, dropped afterwards)")
        ok = run_program(lambda: run_failover_demo(dsn, duration=duration, out=out, live=live))
        return 0 if ok else 1
    from ._embedded import EmbeddedPostgres

    out("starting an embedded PostgreSQL (no installation needed)…")
    with EmbeddedPostgres() as server:
        out(f"store: embedded PostgreSQL {server.version} at {server.dsn}")
        ok = run_program(
            lambda: run_failover_demo(server.dsn, duration=duration, out=out, live=live)
        )
    return 0 if ok else 1
