"""Two projectors feeding each other through the store.

"fraud-screen" watches large withdrawals and appends a ``FlaggedForReview`` event carrying the
withdrawal's causal metadata; "review-queue" projects those flags into a queue. It runs on
the memory store: ``uv run python examples/chained_projectors.py``.
"""

from __future__ import annotations

import contextlib

import trio

from eventcore_trio import NewEvent, RecordedEvent, VersionConflict, caused_by, open_memory_store
from eventcore_trio.projection import ProjectionContext, projector, run_projections

queue: list[tuple[str, int, str]] = []
reviewed = trio.Event()


@projector("fraud-screen", event_types=["Withdrawn"])
async def fraud_screen(event: RecordedEvent, ctx: ProjectionContext) -> None:
    if event.data["amount"] < 1_000:
        return
    flag = NewEvent(
        "FlaggedForReview",
        {"account": event.stream_id, "amount": event.data["amount"]},
        metadata=caused_by(event),
    )
    # One review stream per withdrawal: if this batch is applied again (effects outside
    # ctx.db are at least once), the second append finds the stream and is refused.
    with contextlib.suppress(VersionConflict):
        await ctx.store.append(f"review-{event.event_id}", [flag], expected_version=0)


@projector("review-queue", event_types=["FlaggedForReview"])
async def review_queue(event: RecordedEvent, ctx: ProjectionContext) -> None:
    queue.append((event.data["account"], event.data["amount"], event.metadata["causation_id"]))
    reviewed.set()


async def main() -> None:
    async with open_memory_store() as store, trio.open_nursery() as nursery:
        await nursery.start(run_projections, store, [fraud_screen, review_queue])
        await store.append("account-1", [NewEvent("Withdrawn", {"amount": 20})])
        await store.append("account-2", [NewEvent("Withdrawn", {"amount": 5_000})])
        with trio.fail_after(10):
            await reviewed.wait()
        (withdrawal,) = await store.read_stream("account-2")
        nursery.cancel_scope.cancel()
    print(f"review queue: {queue}")
    assert queue == [("account-2", 5_000, str(withdrawal.event_id))]


if __name__ == "__main__":
    trio.run(main)
