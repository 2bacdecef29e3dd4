"""The runner reads the next page while a batch commits, and uses it only after that commit.

On the memory backend, with the store's reads observed: each read is numbered, and the events
it returns carry its number, so a test sees which read delivered what a projector applied.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio

from eventcore_trio import NewEvent, Position, RecordedEvent
from eventcore_trio.memory import MemoryStore, open_memory_store
from eventcore_trio.projection import (
    Failure,
    FailureStrategy,
    ProjectionConfig,
    ProjectionContext,
    run_projection,
)


class ObservedReads:
    """Wraps a memory store's read_events: logs each read (and what else the test logs), and
    stamps the events it returns with the read's number."""

    def __init__(self, store: MemoryStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.reads = 0
        # By the position a read starts after: set once such a read is issued, and returned.
        self._issued: dict[Position | None, trio.Event] = {}
        self._returned: dict[Position | None, trio.Event] = {}
        self._read = store.read_events
        monkeypatch.setattr(store, "read_events", self.read_events)

    async def read_events(self, after: Position | None, **options: Any) -> list[Any]:
        self.reads += 1
        number = self.reads
        self.log.append(("read", number, after))
        self._issued.setdefault(after, trio.Event()).set()
        page = await self._read(after, **options)
        self._returned.setdefault(after, trio.Event()).set()
        return [
            attrs.evolve(e, metadata={**e.metadata, "read": number})
            if isinstance(e, RecordedEvent)
            else e
            for e in page
        ]

    async def issued(self, after: Position) -> None:
        """Return once a read after *after* has been issued."""
        await self._issued.setdefault(after, trio.Event()).wait()

    async def returned(self, after: Position) -> None:
        """Return once a read after *after* has returned."""
        await self._returned.setdefault(after, trio.Event()).wait()

    def issued_at(self, number: int) -> int:
        """Where read *number* is in the log."""
        return next(i for i, entry in enumerate(self.log) if entry[:2] == ("read", number))


def numbered(n: int) -> list[NewEvent]:
    return [NewEvent("E", {"n": i}) for i in range(n)]


async def test_a_page_read_during_a_failed_batch_is_never_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch of a full page fails after the next page's read was issued; the events
    after it come from a read issued after the failure, not from that one."""
    async with open_memory_store() as store:
        await store.append("s", numbered(6))
        reads = ObservedReads(store, monkeypatch)
        # By position, the last application (the one that committed): a failed batch rolls
        # back, and its events are applied again.
        applied: dict[Position, tuple[int, int]] = {}
        failed = False

        class FailsOnceAtTwo:
            name = "fails-once"

            async def apply(self, event: RecordedEvent, ctx: ProjectionContext) -> None:
                nonlocal failed
                n = event.data["n"]
                if n == 2 and not failed:
                    # The read of the next page is issued while this batch runs.
                    with trio.fail_after(5):
                        await reads.issued(event.position)
                    failed = True
                    reads.log.append(("failed",))
                    raise ValueError("once")
                applied[event.position] = (n, event.metadata["read"])

            def on_error(self, failure: Failure) -> FailureStrategy:
                return FailureStrategy.RETRY

        config = ProjectionConfig(batch_size=3, retry_initial_backoff=0.01)
        result = await run_projection(store, FailsOnceAtTwo(), config)
        assert result.events_applied == 6
        assert [n for n, _ in applied.values()] == list(range(6))
        failure = reads.log.index(("failed",))
        for n, number in applied.values():
            if n >= 3:
                assert reads.issued_at(number) > failure, (
                    f"event {n} came from read {number}, issued before the batch failed: "
                    f"{reads.log}"
                )


async def test_the_next_page_is_read_while_the_batch_commits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A catch-up across full pages reads each next page before the checkpoint moves, and
    applies every event once, in order."""
    async with open_memory_store() as store:
        await store.append("s", numbered(10))
        reads = ObservedReads(store, monkeypatch)
        applied: list[int] = []
        ahead: list[bool] = []

        class Recorder:
            name = "recorder"

            async def apply(self, event: RecordedEvent, ctx: ProjectionContext) -> None:
                applied.append(event.data["n"])

        original = reads.read_events

        async def read_events(after: Position | None, **options: Any) -> list[Any]:
            # Issued before the commit that moves the checkpoint to *after*?
            ahead.append(await store.load_checkpoint("recorder") != after)
            return await original(after, **options)

        monkeypatch.setattr(store, "read_events", read_events)
        result = await run_projection(store, Recorder(), ProjectionConfig(batch_size=3))
        assert applied == list(range(10))
        assert result.events_applied == 10
        assert any(ahead), "no page was read ahead"


async def test_an_empty_page_read_ahead_is_read_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Continuous mode: a page read during the batch found nothing, and an event was
    appended before the batch committed (its notification came before any wait). The run
    reads again instead of waiting for the next notification or poll."""
    async with open_memory_store() as store:
        await store.append("s", numbered(3))
        reads = ObservedReads(store, monkeypatch)
        applied: list[int] = []
        done = trio.Event()

        class AppendsDuringTheBatch:
            name = "appends"

            async def apply(self, event: RecordedEvent, ctx: ProjectionContext) -> None:
                n = event.data["n"]
                if n == 2:
                    # Wait until the read of the next page returned, then append.
                    with trio.fail_after(5):
                        await reads.returned(event.position)
                    await store.append("s", [NewEvent("E", {"n": 3})])
                applied.append(n)
                if n == 3:
                    done.set()

        config = ProjectionConfig(batch_size=3, continuous=True, poll_interval=60)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_projection, store, AppendsDuringTheBatch(), config)
            with trio.fail_after(5):
                await done.wait()
            nursery.cancel_scope.cancel()
        assert applied == [0, 1, 2, 3]
