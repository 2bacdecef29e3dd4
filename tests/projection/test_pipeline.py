"""The pure projection pipeline, driven by hand: feed it results, check the next effect."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable

import pytest

from eventcore_trio import (
    EventDecodeError,
    Position,
    RecordedEvent,
    StoreConnectionError,
    UndecodableEvent,
)
from eventcore_trio.projection import Failure, FailureStrategy, ProjectionConfig
from eventcore_trio.projection._pipeline import (
    ApplyBatch,
    BatchCommitted,
    BatchFailed,
    CheckpointLoaded,
    Done,
    Effect,
    Fail,
    FindTarget,
    LoadCheckpoint,
    PageRead,
    PipelineMisuse,
    ProjectionPipeline,
    ReadFailed,
    ReadPage,
    Result,
    Sleep,
    Slept,
    TargetFound,
    WaitForEvents,
    Woken,
)

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def event(n: int) -> RecordedEvent:
    return RecordedEvent(
        event_id=uuid.UUID(int=n),
        stream_id="s",
        stream_version=n,
        position=Position(n, n),
        type="E",
        data={"n": n},
        metadata={},
        recorded_at=NOW,
    )


def undecodable(n: int) -> UndecodableEvent:
    return UndecodableEvent(
        event_id=uuid.UUID(int=n),
        stream_id="s",
        stream_version=n,
        position=Position(n, n),
        type="E",
        raw_data="[1]",
        raw_metadata="{}",
        recorded_at=NOW,
        error="not an object",
    )


class Checked:
    """A pipeline whose every promise of a read (`ApplyBatch.read_next`) is checked: the
    effect that follows that batch's commit is exactly that read. Every test here drives one.
    """

    def __init__(self, inner: ProjectionPipeline) -> None:
        self._inner = inner
        self._last: Effect | None = None

    @property
    def checkpoint(self) -> Position | None:
        return self._inner.checkpoint

    def start(self) -> Effect:
        self._last = self._inner.start()
        return self._last

    def resume(self, result: Result) -> Effect:
        last = self._last
        effect = self._inner.resume(result)
        if isinstance(last, ApplyBatch) and last.read_next is not None:
            if isinstance(result, BatchCommitted):
                assert effect == last.read_next, "read_next must be what the commit leads to"
            else:
                assert not isinstance(effect, ReadPage), "no read right after a failed batch"
        self._last = effect
        return effect


def pipeline(
    on_error: Callable[[Failure], FailureStrategy] = lambda f: FailureStrategy.FATAL,
    *,
    has_batch_hook: bool = False,
    **config: object,
) -> Checked:
    return Checked(
        ProjectionPipeline(
            config=ProjectionConfig(**config),  # type: ignore[arg-type]
            on_error=on_error,
            has_batch_hook=has_batch_hook,
        )
    )


def catch_up_to(p: Checked, checkpoint: int | None, target: int | None) -> Effect:
    assert p.start() == LoadCheckpoint()
    loaded = None if checkpoint is None else Position(checkpoint, checkpoint)
    assert p.resume(CheckpointLoaded(loaded)) == FindTarget()
    return p.resume(TargetFound(None if target is None else Position(target, target)))


def positions(effect: Effect) -> list[int]:
    assert isinstance(effect, ApplyBatch)
    return [e.stream_version for e in effect.events]


class TestCatchUp:
    """Catch-up mode reads every page up to the target, then stops."""

    def test_nothing_to_do(self) -> None:
        """With no events at all, the run is done at once."""
        effect = catch_up_to(pipeline(), None, None)
        assert isinstance(effect, Done)
        assert effect.result.events_applied == 0

    def test_already_caught_up(self) -> None:
        """A checkpoint at the target needs no read."""
        effect = catch_up_to(pipeline(), 5, 5)
        assert isinstance(effect, Done)

    def test_pages_batches_and_checkpoints(self) -> None:
        """Across several pages, each batch is one page from the checkpoint, in order."""
        p = pipeline(batch_size=3)
        effect = catch_up_to(p, None, 7)
        assert effect == ReadPage(after=None, limit=3)
        effect = p.resume(PageRead((event(1), event(2), event(3))))
        assert positions(effect) == [1, 2, 3]
        assert effect == ApplyBatch(
            effect.events,  # type: ignore[union-attr]
            None,
            Position(3, 3),
            read_next=ReadPage(after=Position(3, 3), limit=3),
        )
        assert p.resume(BatchCommitted()) == ReadPage(after=Position(3, 3), limit=3)
        effect = p.resume(PageRead((event(4), event(5), event(6))))
        assert positions(effect) == [4, 5, 6]
        assert p.resume(BatchCommitted()) == ReadPage(after=Position(6, 6), limit=3)
        effect = p.resume(PageRead((event(7), event(8))))
        assert positions(effect) == [7], "events past the target are not part of this run"
        done = p.resume(BatchCommitted())
        assert isinstance(done, Done)
        assert done.result.events_applied == 7
        assert done.result.checkpoint == Position(7, 7)

    def test_batch_size_comes_from_config(self) -> None:
        """The page limit is the configured batch size, not a constant."""
        for size in (1, 17, 1000):
            p = pipeline(batch_size=size)
            assert catch_up_to(p, None, 99) == ReadPage(after=None, limit=size)

    def test_short_page_before_target_ends_when_empty(self) -> None:
        """An empty page ends a catch-up run even if the target was not reached."""
        p = pipeline()
        catch_up_to(p, None, 9)
        assert isinstance(p.resume(PageRead(())), Done)


class TestContinuous:
    """Continuous mode never finishes by itself."""

    def test_idle_waits_for_events_then_reads_again(self) -> None:
        """When caught up it waits (bounded by poll_interval), then reads from the checkpoint."""
        p = pipeline(continuous=True, poll_interval=2.5, batch_size=10)
        assert p.start() == LoadCheckpoint()
        assert p.resume(CheckpointLoaded(Position(4, 4))) == ReadPage(Position(4, 4), 10)
        assert p.resume(PageRead(())) == WaitForEvents(timeout=2.5)
        assert p.resume(Woken()) == ReadPage(Position(4, 4), 10)
        effect = p.resume(PageRead((event(5),)))
        assert positions(effect) == [5]
        assert p.resume(BatchCommitted()) == ReadPage(Position(5, 5), 10)

    def test_waiting_without_notifications_is_decided_here(self) -> None:
        """With use_notifications=False the wait says so: the shell only sleeps."""
        p = pipeline(continuous=True, poll_interval=1.0, use_notifications=False)
        p.start()
        p.resume(CheckpointLoaded(None))
        assert p.resume(PageRead(())) == WaitForEvents(timeout=1.0, notified=False)


class TestFailures:
    """on_error decides what happens to a failing event."""

    def test_fatal_fails_after_committing_the_good_prefix(self) -> None:
        """Events before the failing one commit; the run then fails on it."""
        p = pipeline(batch_size=5)
        catch_up_to(p, None, 5)
        p.resume(PageRead(tuple(event(n) for n in range(1, 6))))
        boom = ValueError("boom")
        prefix = p.resume(BatchFailed(2, boom))
        assert positions(prefix) == [1, 2]
        failed = p.resume(BatchCommitted())
        assert isinstance(failed, Fail)
        assert failed.error is boom
        assert failed.failure is not None
        assert failed.failure.position == Position(3, 3)
        assert p.checkpoint == Position(2, 2)

    def test_skip_records_a_dead_letter_and_continues(self) -> None:
        """SKIP moves the checkpoint past the event with a dead letter, then goes on."""
        p = pipeline(lambda f: FailureStrategy.SKIP, batch_size=5)
        catch_up_to(p, None, 3)
        p.resume(PageRead((event(1), event(2), event(3))))
        effect = p.resume(BatchFailed(0, KeyError("k")))
        assert isinstance(effect, ApplyBatch)
        assert effect.events == ()
        assert effect.dead_letter is not None
        assert effect.dead_letter.position == Position(1, 1)
        assert effect.checkpoint == Position(1, 1)
        assert positions(p.resume(BatchCommitted())) == [2, 3]
        done = p.resume(BatchCommitted())
        assert isinstance(done, Done)
        assert (done.result.events_applied, done.result.dead_letters) == (2, 1)

    def test_retry_backs_off_then_succeeds(self) -> None:
        """RETRY sleeps with exponential backoff and applies the event again."""
        seen: list[int] = []

        def on_error(failure: Failure) -> FailureStrategy:
            seen.append(failure.retries)
            return FailureStrategy.RETRY

        p = pipeline(on_error, retry_initial_backoff=0.5, retry_max_backoff=1.5, max_retries=5)
        catch_up_to(p, None, 2)
        p.resume(PageRead((event(1), event(2))))
        delays = []
        for _ in range(3):
            sleep = p.resume(BatchFailed(0, OSError("flaky")))
            assert isinstance(sleep, Sleep)
            delays.append(sleep.seconds)
            assert positions(p.resume(Slept())) == [1, 2]
        assert delays == [0.5, 1.0, 1.5]
        assert seen == [0, 1, 2]
        assert isinstance(p.resume(BatchCommitted()), Done)

    def test_retry_gives_up_after_max_retries(self) -> None:
        """After max_retries retries the failure is fatal."""
        p = pipeline(lambda f: FailureStrategy.RETRY, max_retries=2)
        catch_up_to(p, None, 1)
        p.resume(PageRead((event(1),)))
        for _ in range(2):
            assert isinstance(p.resume(BatchFailed(0, OSError())), Sleep)
            p.resume(Slept())
        failed = p.resume(BatchFailed(0, OSError("still")))
        assert isinstance(failed, Fail)
        assert failed.failure is not None
        assert failed.failure.retries == 2

    def test_invalid_strategy_is_fatal(self) -> None:
        """An on_error that returns something else stops the run with a clear message."""
        p = pipeline(lambda f: "skip")  # type: ignore[arg-type, return-value]
        catch_up_to(p, None, 1)
        p.resume(PageRead((event(1),)))
        failed = p.resume(BatchFailed(0, OSError()))
        assert isinstance(failed, Fail)
        assert "not a FailureStrategy" in failed.message

    def test_batch_hook_failure_is_isolated_event_by_event(self) -> None:
        """A failing batch hook is retried one event at a time to find the culprit."""
        p = pipeline(lambda f: FailureStrategy.SKIP, batch_size=4, has_batch_hook=True)
        catch_up_to(p, None, 4)
        whole = p.resume(PageRead(tuple(event(n) for n in range(1, 5))))
        assert isinstance(whole, ApplyBatch)
        assert whole.use_batch_hook
        single = p.resume(BatchFailed(None, ValueError()))
        assert positions(single) == [1]
        assert isinstance(single, ApplyBatch)
        assert not single.use_batch_hook
        assert positions(p.resume(BatchCommitted())) == [2]
        skip = p.resume(BatchFailed(None, ValueError("culprit")))
        assert isinstance(skip, ApplyBatch)
        assert skip.dead_letter is not None
        assert skip.dead_letter.position == Position(2, 2)
        assert positions(p.resume(BatchCommitted())) == [3]
        assert positions(p.resume(BatchCommitted())) == [4]
        assert isinstance(p.resume(BatchCommitted()), Done)


class TestBatchHookPolicy:
    """The pipeline, not the shell, decides when a batch goes to the batch hook."""

    def test_batches_use_the_hook_only_when_there_is_one_and_more_than_one_event(self) -> None:
        """No hook: never; a hook: for batches of two or more events."""
        for hook, page, expected in ((False, 3, False), (True, 3, True), (True, 1, False)):
            p = pipeline(batch_size=5, has_batch_hook=hook)
            catch_up_to(p, None, page)
            effect = p.resume(PageRead(tuple(event(n) for n in range(1, page + 1))))
            assert isinstance(effect, ApplyBatch)
            assert effect.use_batch_hook is expected


class TestUndecodable:
    """Stored events that do not decode reach on_error, never a silent drop or a stall."""

    def test_page_of_undecodable_events(self) -> None:
        """Each undecodable event is offered to on_error; SKIP dead-letters them one by one."""
        failures: list[Failure] = []

        def on_error(failure: Failure) -> FailureStrategy:
            failures.append(failure)
            return FailureStrategy.SKIP

        p = pipeline(on_error, batch_size=3)
        catch_up_to(p, None, 3)
        effect = p.resume(PageRead((undecodable(1), undecodable(2), undecodable(3))))
        for n in (1, 2, 3):
            assert isinstance(effect, ApplyBatch)
            assert effect.events == ()
            assert effect.checkpoint == Position(n, n)
            effect = p.resume(BatchCommitted())
        assert isinstance(effect, Done)
        assert all(isinstance(f.error, EventDecodeError) for f in failures)
        assert [f.position for f in failures] == [Position(n, n) for n in (1, 2, 3)]

    def test_undecodable_splits_a_batch(self) -> None:
        """Good events before an undecodable one are applied first; it then fails the run."""
        p = pipeline(batch_size=5)
        catch_up_to(p, None, 3)
        effect = p.resume(PageRead((event(1), undecodable(2), event(3))))
        assert positions(effect) == [1]
        failed = p.resume(BatchCommitted())
        assert isinstance(failed, Fail)
        assert isinstance(failed.error, EventDecodeError)


class TestReads:
    """Failed reads back off, then give up."""

    def test_read_failures_back_off_and_recover(self) -> None:
        """A failed read sleeps with growing delays; a good read resets the count."""
        p = pipeline(read_initial_backoff=0.2, read_max_backoff=0.5, max_read_failures=5)
        catch_up_to(p, None, 1)
        delays = []
        for _ in range(3):
            sleep = p.resume(ReadFailed(StoreConnectionError("down")))
            assert isinstance(sleep, Sleep)
            delays.append(sleep.seconds)
            assert p.resume(Slept()) == ReadPage(after=None, limit=500)
        assert delays == [0.2, 0.4, 0.5]
        assert positions(p.resume(PageRead((event(1),)))) == [1]

    def test_too_many_read_failures_fail_the_run(self) -> None:
        """max_read_failures consecutive failures end the run."""
        p = pipeline(max_read_failures=2)
        catch_up_to(p, None, 1)
        p.resume(ReadFailed(StoreConnectionError("down")))
        p.resume(Slept())
        assert isinstance(p.resume(ReadFailed(StoreConnectionError("down"))), Fail)


class TestReadNext:
    """ApplyBatch.read_next: the next page may be read while a batch commits, exactly when
    the pipeline knows that the commit leads to that read (`Checked` checks every case)."""

    def test_a_batch_that_empties_a_full_page_promises_the_next_read(self) -> None:
        """Catch-up before the target, and continuous mode: the read after the batch's end."""
        p = pipeline(batch_size=3)
        catch_up_to(p, None, 9)
        effect = p.resume(PageRead((event(1), event(2), event(3))))
        assert isinstance(effect, ApplyBatch)
        assert effect.read_next == ReadPage(after=Position(3, 3), limit=3)
        assert p.resume(BatchCommitted()) == effect.read_next
        p = pipeline(continuous=True, batch_size=2)
        p.start()
        p.resume(CheckpointLoaded(None))
        effect = p.resume(PageRead((event(1), event(2))))
        assert isinstance(effect, ApplyBatch)
        assert effect.read_next == ReadPage(after=Position(2, 2), limit=2)

    def test_no_promise_after_a_short_page_or_at_the_target(self) -> None:
        """A short page is the head of the store (a read now would find nothing); a batch
        that reaches the target ends the run."""
        p = pipeline(batch_size=3, continuous=True)
        p.start()
        p.resume(CheckpointLoaded(None))
        short = p.resume(PageRead((event(1), event(2))))
        assert isinstance(short, ApplyBatch)
        assert short.read_next is None
        p = pipeline(batch_size=3)
        catch_up_to(p, None, 3)
        last = p.resume(PageRead((event(1), event(2), event(3))))
        assert isinstance(last, ApplyBatch)
        assert last.read_next is None
        assert isinstance(p.resume(BatchCommitted()), Done)
        p = pipeline(batch_size=3)
        catch_up_to(p, None, 2)
        cut = p.resume(PageRead((event(1), event(2), event(3))))
        assert positions(cut) == [1, 2]
        assert isinstance(cut, ApplyBatch)
        assert cut.read_next is None

    def test_no_promise_while_events_of_the_page_remain(self) -> None:
        """A good prefix before a failure, or before an undecodable event, is followed by
        what remains of the page, not by a read."""
        p = pipeline(lambda f: FailureStrategy.SKIP, batch_size=3)
        catch_up_to(p, None, 9)
        p.resume(PageRead((event(1), event(2), event(3))))
        prefix = p.resume(BatchFailed(1, ValueError("boom")))
        assert positions(prefix) == [1]
        assert isinstance(prefix, ApplyBatch)
        assert prefix.read_next is None
        skip = p.resume(BatchCommitted())
        assert isinstance(skip, ApplyBatch)
        assert skip.dead_letter is not None
        assert skip.read_next is None, "event 3 remains"
        rest = p.resume(BatchCommitted())
        assert positions(rest) == [3]
        assert isinstance(rest, ApplyBatch)
        assert rest.read_next == ReadPage(after=Position(3, 3), limit=3)
        p = pipeline(lambda f: FailureStrategy.SKIP, batch_size=3)
        catch_up_to(p, None, 9)
        split = p.resume(PageRead((event(1), event(2), undecodable(3))))
        assert isinstance(split, ApplyBatch)
        assert split.read_next is None
        dead = p.resume(BatchCommitted())
        assert isinstance(dead, ApplyBatch)
        assert dead.dead_letter is not None
        assert dead.read_next == ReadPage(after=Position(3, 3), limit=3)
        assert p.resume(BatchCommitted()) == dead.read_next

    def test_a_failed_batch_is_never_followed_by_its_read(self) -> None:
        """RETRY: the batch is applied again after a sleep, and promises its read again."""
        p = pipeline(lambda f: FailureStrategy.RETRY, batch_size=2)
        catch_up_to(p, None, 9)
        first = p.resume(PageRead((event(1), event(2))))
        assert isinstance(first, ApplyBatch)
        assert first.read_next is not None
        assert isinstance(p.resume(BatchFailed(0, OSError("flaky"))), Sleep)
        again = p.resume(Slept())
        assert again == first
        assert p.resume(BatchCommitted()) == first.read_next

    def test_a_batch_hook_isolation_promises_only_on_its_last_event(self) -> None:
        """Applying events one at a time, only the batch that empties the page reads next."""
        p = pipeline(lambda f: FailureStrategy.SKIP, batch_size=2, has_batch_hook=True)
        catch_up_to(p, None, 9)
        p.resume(PageRead((event(1), event(2))))
        single = p.resume(BatchFailed(None, ValueError()))
        assert isinstance(single, ApplyBatch)
        assert single.read_next is None
        last = p.resume(BatchCommitted())
        assert isinstance(last, ApplyBatch)
        assert last.read_next == ReadPage(after=Position(2, 2), limit=2)


class TestMisuse:
    """Calling the pipeline out of order is a loud error."""

    def test_wrong_result_for_phase(self) -> None:
        """A result the current phase does not expect raises PipelineMisuse."""
        p = pipeline()
        p.start()
        with pytest.raises(PipelineMisuse, match="CheckpointLoaded"):
            p.resume(BatchCommitted())

    def test_start_twice(self) -> None:
        """start() may be called once."""
        p = pipeline()
        p.start()
        with pytest.raises(PipelineMisuse):
            p.start()
