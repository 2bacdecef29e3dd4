"""The in-memory demo (``eventcore-trio demo --memory``): the bank in one process.

Writers run `Transfer` commands with `execute` (optimistic concurrency across two streams,
retried on conflicts); a projector, run by `run_projection` under leadership, follows the
global order and keeps balances with its checkpoint. At the end the projected balances are
checked against a fold of every stream: the demo exits 0 only if nothing was lost or counted
twice.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import attrs
import trio

from .._events import RecordedEvent
from .._filters import EventFilter
from .._positions import Position
from .._protocols import Store
from ..commands import StateCache, execute
from ..projection import ProjectionConfig, ProjectionContext, run_projection
from ._bank import INITIAL_BALANCE, OpenAccount, balance_after, random_transfer, registry

PROJECTION = "demo-balances"


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


@attrs.define
class _Balances:
    # The projector: balances kept in memory (the memory store has no ctx.db).
    report: DemoReport
    balances: dict[str, int] = attrs.Factory(dict)
    name: str = PROJECTION
    filter: EventFilter = attrs.Factory(lambda: EventFilter(stream_prefix="account-"))

    async def apply(self, event: RecordedEvent, ctx: ProjectionContext) -> None:
        self.balances[event.stream_id] = balance_after(self.balances.get(event.stream_id, 0), event)
        self.report.projected_events += 1
        self.report.checkpoint = event.position


async def _transfer_worker(
    store: Store,
    accounts: list[str],
    transfers: int,
    seed: int,
    report: DemoReport,
    cache: StateCache,
) -> None:
    rng = random.Random(seed)
    for _ in range(transfers):
        attempts = await random_transfer(store, accounts, rng, most=300, cache=cache)
        if attempts is None:
            report.refused += 1
        else:
            report.transfers += 1
            report.conflicts += attempts - 1


async def _wait_caught_up(store: Store, projector: _Balances) -> None:
    # Caught up once the *committed* checkpoint is the last position; nothing signals a
    # commit, so poll the store (the demo's pace, not a test's synchronisation).
    target = await store.last_position(projector.filter)
    while await store.load_checkpoint(PROJECTION) != target:  # noqa: ASYNC110
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
    projector = _Balances(report)
    async with open_store() as store:
        for name in names:
            await execute(store, OpenAccount(name, INITIAL_BALANCE), registry=registry)
        out(f"opened {accounts} accounts with {INITIAL_BALANCE} each")
        started = time.monotonic()
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
            config = ProjectionConfig(continuous=True, poll_interval=0.05)
            await nursery.start(run_projection, store, projector, config)
            cache = StateCache()
            async with trio.open_nursery() as writing:
                for w in range(writers):
                    writing.start_soon(
                        _transfer_worker, store, names, transfers_per_writer, w, report, cache
                    )
            with trio.move_on_after(wait) as waiting:
                await _wait_caught_up(store, projector)
            if waiting.cancelled_caught:
                report.problems.append(f"the projection did not catch up within {wait}s")
            nursery.cancel_scope.cancel()
        await _verify(store, names, projector.balances, report)
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


async def _verify(
    store: Store, names: list[str], projected: dict[str, int], report: DemoReport
) -> None:
    # Against a reference fold of every stream; each problem found goes into the report.
    reference: dict[str, int] = {}
    for name in names:
        for event in await store.read_stream(name):
            reference[name] = balance_after(reference.get(name, 0), event)
    if projected != reference:
        report.problems.append("projected balances differ from the streams' fold")
    if sum(reference.values()) != len(names) * INITIAL_BALANCE:
        report.problems.append("money was created or destroyed")
    if any(balance < 0 for balance in reference.values()):
        report.problems.append("an account is overdrawn")
    if report.projected_events != len(names) + 2 * report.transfers:
        report.problems.append("the projection saw a different number of events")
    if await store.load_checkpoint(PROJECTION) != report.checkpoint:
        report.problems.append("the saved checkpoint is not the last projected position")
