"""The projection pipeline: a pure state machine that decides, and never does, I/O.

The shell (`_runner`) asks it for the next effect, performs that effect (a read, a batch
transaction, a sleep) and feeds the outcome back with `resume`. All policy lives here: paging
and catch-up, batch sizing, undecodable events, on_error's FATAL/SKIP/RETRY, backoff, isolating
the failing event of a batch hook, read failures. There is no trio, no database and no clock in
this module, so every path is unit-tested by hand (tests/projection/test_pipeline.py).
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Callable
from typing import final

import attrs

from .._errors import EventDecodeError
from .._events import RecordedEvent, UndecodableEvent
from .._positions import Position
from ._config import ProjectionConfig
from ._projector import Failure, FailureStrategy

AnyEvent = RecordedEvent | UndecodableEvent

# -- effects: what the shell must do next ----------------------------------------------


@attrs.frozen
class LoadCheckpoint:
    """Load the projector's checkpoint; answer with `CheckpointLoaded`."""


@attrs.frozen
class FindTarget:
    """Catch-up mode: find the last matching event visible now; answer with `TargetFound`."""


@attrs.frozen
class ReadPage:
    """Read up to *limit* matching events after *after*; answer `PageRead` or `ReadFailed`."""

    after: Position | None
    limit: int


@attrs.frozen
class ApplyBatch:
    """In one transaction: apply *events*, record *dead_letter*, move the checkpoint.

    The checkpoint moves from *expected* to *checkpoint* (compare-and-set). With
    *use_batch_hook* the events go to the projector's batch hook in one call; otherwise they
    are applied one at a time (always so while isolating a batch hook's failure). Answer with
    `BatchCommitted` or `BatchFailed`.

    *read_next* is the read that `BatchCommitted` will be answered with, when the pipeline
    knows it already (the batch empties a full page, and the run goes on after it): the shell
    may issue it while the batch commits, and use its page only for exactly that effect right
    after the commit. None: the commit leads anywhere else (a failure, the end, a wait).
    """

    events: tuple[RecordedEvent, ...]
    expected: Position | None
    checkpoint: Position
    dead_letter: Failure | None = None
    use_batch_hook: bool = False
    read_next: ReadPage | None = None


@attrs.frozen
class Sleep:
    """Sleep *seconds*; answer with `Slept`."""

    seconds: float
    reason: str


@attrs.frozen
class WaitForEvents:
    """Continuous mode, caught up: wait *timeout*, or less if *notified* and a notification
    comes; answer `Woken`."""

    timeout: float
    notified: bool = True


@attrs.frozen
class Done:
    """The run is over (catch-up mode only)."""

    result: ProjectionResult


@attrs.frozen
class Fail:
    """The run failed fatally on *failure* (or on reads, with *failure* None)."""

    message: str
    error: BaseException
    failure: Failure | None


Effect = LoadCheckpoint | FindTarget | ReadPage | ApplyBatch | Sleep | WaitForEvents | Done | Fail

# -- results: what the shell reports back ----------------------------------------------


@attrs.frozen
class CheckpointLoaded:
    """The checkpoint (None: start from the beginning)."""

    position: Position | None


@attrs.frozen
class TargetFound:
    """The last matching visible event's position, or None."""

    position: Position | None


@attrs.frozen
class PageRead:
    """The events read, in order."""

    events: tuple[AnyEvent, ...]


@attrs.frozen
class ReadFailed:
    """The read failed (the store was unreachable, say)."""

    error: BaseException


@attrs.frozen
class BatchCommitted:
    """The batch's transaction committed."""


@attrs.frozen
class BatchFailed:
    """The projector raised; the transaction rolled back.

    *index* is the failing event's index in the batch, or None when a batch hook failed
    (the pipeline then finds the culprit by applying the events one at a time).
    """

    index: int | None
    error: BaseException


@attrs.frozen
class Slept:
    """The sleep is over."""


@attrs.frozen
class Woken:
    """The wait for events is over (notified or timed out)."""


Result = (
    CheckpointLoaded
    | TargetFound
    | PageRead
    | ReadFailed
    | BatchCommitted
    | BatchFailed
    | Slept
    | Woken
)


@final
@attrs.frozen(kw_only=True)
class ProjectionResult:
    """What a catch-up run did.

    Attributes:
        events_applied: events applied and committed.
        dead_letters: events skipped into dead letters.
        checkpoint: the checkpoint at the end.
        superseded: the run ended because its projection version no longer runs: a higher
            version caught up and serves, or an operator switched back below it (see
            `VersionRole`). A continuous run ends so too.

    .. versionadded:: 0.1
    .. versionchanged:: 0.4
       ``superseded``.
    """

    events_applied: int
    dead_letters: int
    checkpoint: Position | None
    superseded: bool = False


class Phase(enum.Enum):
    """Where the pipeline is; each awaiting phase accepts exactly one kind of result."""

    START = "start"
    AWAITING_CHECKPOINT = "awaiting-checkpoint"
    AWAITING_TARGET = "awaiting-target"
    AWAITING_PAGE = "awaiting-page"
    AWAITING_BATCH = "awaiting-batch"
    AWAITING_SLEEP = "awaiting-sleep"
    AWAITING_EVENTS = "awaiting-events"
    FINISHED = "finished"


_EXPECTED: dict[Phase, tuple[type, ...]] = {
    Phase.AWAITING_CHECKPOINT: (CheckpointLoaded,),
    Phase.AWAITING_TARGET: (TargetFound,),
    Phase.AWAITING_PAGE: (PageRead, ReadFailed),
    Phase.AWAITING_BATCH: (BatchCommitted, BatchFailed),
    Phase.AWAITING_SLEEP: (Slept,),
    Phase.AWAITING_EVENTS: (Woken,),
}


class PipelineMisuse(RuntimeError):
    """The shell called the pipeline out of order (a bug in the shell, never user error)."""


@final
class ProjectionPipeline:
    """The decisions of one projection run.

    Call `start` once, then `resume` with the outcome of each effect until `Done` or `Fail`.
    """

    def __init__(
        self,
        *,
        config: ProjectionConfig,
        on_error: Callable[[Failure], FailureStrategy],
        has_batch_hook: bool = False,
    ) -> None:
        self._config = config
        self._on_error = on_error
        # Whether the projector takes whole batches in one call (apply_batch).
        self._has_batch_hook = has_batch_hook
        self._phase = Phase.START
        # The last committed checkpoint; batches move it by compare-and-set from this value.
        self._checkpoint: Position | None = None
        # Catch-up mode: stop once the checkpoint reaches this (None: nothing to do).
        self._target: Position | None = None
        # Events read but not yet committed (or dead-lettered), in order.
        self._pending: list[AnyEvent] = []
        # Whether the last page read was full: more events are likely waiting after it, so
        # the next page is worth reading before the batch that empties this one commits (a
        # short page means the run is at the head, where that read would find nothing).
        self._page_full = False
        # The batch in flight, and what committing it achieves.
        self._in_flight: ApplyBatch | None = None
        # A failure waiting for its batch's good prefix to commit first.
        self._deferred_failure: tuple[AnyEvent, BaseException] | None = None
        # Retries so far of the event at the head of _pending (reset when it is passed).
        self._retries = 0
        self._read_failures = 0
        # How many of the next events to apply one at a time (finding a batch hook's culprit).
        self._singly = 0
        self._after_sleep: Callable[[], Effect] = self._next
        self._applied = 0
        self._dead_lettered = 0

    @property
    def phase(self) -> Phase:
        """The current phase."""
        return self._phase

    @property
    def checkpoint(self) -> Position | None:
        """The last committed checkpoint."""
        return self._checkpoint

    def start(self) -> Effect:
        """Begin the run: the first effect is always `LoadCheckpoint`."""
        if self._phase is not Phase.START:
            raise PipelineMisuse(f"start() called in phase {self._phase.value}")
        return self._go(Phase.AWAITING_CHECKPOINT, LoadCheckpoint())

    def resume(self, result: Result) -> Effect:
        """Deliver the outcome of the last effect; return the next effect."""
        expected = _EXPECTED.get(self._phase, ())
        if not isinstance(result, expected):
            raise PipelineMisuse(
                f"resume({type(result).__name__}) in phase {self._phase.value}; expected "
                f"{' or '.join(t.__name__ for t in expected) or 'nothing'}"
            )
        match result:
            case CheckpointLoaded(position):
                self._checkpoint = position
                if self._config.continuous:
                    return self._read()
                return self._go(Phase.AWAITING_TARGET, FindTarget())
            case TargetFound(position):
                self._target = position
                return self._next()
            case PageRead(events):
                self._read_failures = 0
                self._page_full = len(events) >= self._config.batch_size
                target = self._target
                continuous = self._config.continuous
                if (
                    not continuous
                    and target is not None
                    and events
                    and events[-1].position > target
                ):
                    # Only the tail can lie past the target: cut it off by bisection.
                    positions = [e.position for e in events]
                    events = events[: bisect.bisect_right(positions, target)]
                if not events:
                    return self._idle()
                self._pending = list(events)
                return self._next()
            case ReadFailed(error):
                self._read_failures += 1
                if self._read_failures >= self._config.max_read_failures:
                    return self._fail(
                        f"{self._read_failures} consecutive reads failed", error, None
                    )
                return self._sleep(
                    self._config.read_backoff(self._read_failures), "read failed", self._read
                )
            case BatchCommitted():
                return self._committed()
            case BatchFailed(index, error):
                return self._batch_failed(index, error)
            case Slept():
                follow = self._after_sleep
                self._after_sleep = self._next
                return follow()
            case Woken():
                return self._read()
        raise AssertionError(result)  # pragma: no cover

    # -- transitions ---------------------------------------------------------------------

    def _go(self, phase: Phase, effect: Effect) -> Effect:
        self._phase = phase
        return effect

    def _read(self) -> Effect:
        return self._go(
            Phase.AWAITING_PAGE, ReadPage(after=self._checkpoint, limit=self._config.batch_size)
        )

    def _sleep(self, seconds: float, reason: str, then: Callable[[], Effect]) -> Effect:
        self._after_sleep = then
        return self._go(Phase.AWAITING_SLEEP, Sleep(seconds=seconds, reason=reason))

    def _idle(self) -> Effect:
        if self._config.continuous:
            return self._go(
                Phase.AWAITING_EVENTS,
                WaitForEvents(
                    timeout=self._config.poll_interval,
                    notified=self._config.use_notifications,
                ),
            )
        return self._done()

    def _caught_up(self) -> bool:
        return self._target is None or (
            self._checkpoint is not None and self._checkpoint >= self._target
        )

    def _done(self) -> Effect:
        return self._go(Phase.FINISHED, Done(self.result_so_far()))

    def result_so_far(self) -> ProjectionResult:
        """What the run has done until now (what `Done` reports at the end)."""
        return ProjectionResult(
            events_applied=self._applied,
            dead_letters=self._dead_lettered,
            checkpoint=self._checkpoint,
        )

    def _fail(self, message: str, error: BaseException, failure: Failure | None) -> Effect:
        return self._go(Phase.FINISHED, Fail(message=message, error=error, failure=failure))

    def _next(self) -> Effect:
        if not self._pending:
            if not self._config.continuous and self._caught_up():
                return self._done()
            return self._read()
        head = self._pending[0]
        if isinstance(head, UndecodableEvent):
            error = EventDecodeError(
                f"event at {head.position} ({head.type} in {head.stream_id!r}) cannot be "
                f"decoded: {head.error}",
                position=head.position,
            )
            return self._handle_failure(head, error)
        batch: list[RecordedEvent] = []
        limit = 1 if self._singly else self._config.batch_size
        for event in self._pending:
            if isinstance(event, UndecodableEvent) or len(batch) == limit:
                break
            batch.append(event)
        hook = self._has_batch_hook and not self._singly and len(batch) > 1
        return self._apply(
            ApplyBatch(tuple(batch), self._checkpoint, batch[-1].position, use_batch_hook=hook)
        )

    def _apply(self, effect: ApplyBatch) -> Effect:
        read_next = self._read_after(effect)
        if read_next is not None:
            effect = attrs.evolve(effect, read_next=read_next)
        self._in_flight = effect
        return self._go(Phase.AWAITING_BATCH, effect)

    def _read_after(self, effect: ApplyBatch) -> ReadPage | None:
        # The read that _committed() will return for *effect*, or None when it returns
        # anything else; kept in step with _committed and _next (test_pipeline checks that
        # every read_next is the effect that follows BatchCommitted).
        done = len(effect.events) + (1 if effect.dead_letter is not None else 0)
        if not self._page_full or done < len(self._pending) or self._deferred_failure is not None:
            return None
        if not self._config.continuous and (
            self._target is None or effect.checkpoint >= self._target
        ):
            return None
        return ReadPage(after=effect.checkpoint, limit=self._config.batch_size)

    def _committed(self) -> Effect:
        effect = self._in_flight
        assert effect is not None
        self._in_flight = None
        done = len(effect.events) + (1 if effect.dead_letter is not None else 0)
        del self._pending[:done]
        self._checkpoint = effect.checkpoint
        self._applied += len(effect.events)
        self._retries = 0
        if effect.dead_letter is not None:
            self._dead_lettered += 1
        if self._singly:
            self._singly = max(0, self._singly - done)
        if self._deferred_failure is not None:
            event, error = self._deferred_failure
            self._deferred_failure = None
            return self._handle_failure(event, error)
        return self._next()

    def _batch_failed(self, index: int | None, error: BaseException) -> Effect:
        effect = self._in_flight
        assert effect is not None
        self._in_flight = None
        if index is None:
            if len(effect.events) > 1:
                # A batch hook failed somewhere in the batch: apply its events one at a time
                # to commit the good ones and find the culprit.
                self._singly = len(effect.events)
                return self._next()
            index = 0
        failing = effect.events[index]
        if index > 0:
            # Commit the events before the failing one, then deal with it.
            self._deferred_failure = (failing, error)
            prefix = effect.events[:index]
            return self._apply(ApplyBatch(prefix, self._checkpoint, prefix[-1].position))
        return self._handle_failure(failing, error)

    def _handle_failure(self, event: AnyEvent, error: BaseException) -> Effect:
        failure = Failure(error=error, event=event, position=event.position, retries=self._retries)
        # Typed as object: a user's on_error may return anything at run time.
        strategy: object = self._on_error(failure)
        if strategy is FailureStrategy.SKIP:
            return self._apply(
                ApplyBatch((), self._checkpoint, event.position, dead_letter=failure)
            )
        if strategy is FailureStrategy.RETRY:
            if self._retries >= self._config.max_retries:
                return self._fail(
                    f"event at {event.position} still failed after {self._retries} retries",
                    error,
                    failure,
                )
            delay = self._config.retry_backoff(self._retries)
            self._retries += 1
            return self._sleep(
                delay, f"retry {self._retries} of event at {event.position}", self._next
            )
        if strategy is not FailureStrategy.FATAL:
            return self._fail(
                f"on_error returned {strategy!r}, not a FailureStrategy", error, failure
            )
        return self._fail(f"event at {event.position} failed", error, failure)
