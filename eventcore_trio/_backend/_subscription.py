"""`EventSubscription`: the global order followed live with ``async for``, a page at a time.

A subscription is a cursor and at most one page. Each step yields the next event of the page
it holds; with none left it reads the next page after the last event it yielded; when that
page is empty it waits for `EventReader.wait_for_events`, bounded by the poll interval, and
reads again. A wake-up that arrives between the empty read and the wait is lost (the stores
wake only the tasks already waiting), so the bound is what it costs: at most one poll interval
of latency, never an event.

Nothing runs in the background: the subscription reads only while its consumer waits for the
next event, so a slow consumer holds reading back (one page at most is buffered) and cancelling
the consumer cancels the read or the wait it is in, which changes nothing (the page and the
cursor are replaced only once a read has returned).

What it yields is exactly what paging `read_events` gives: the store's read path decides what
is visible (a late commit included); the subscription only keeps the cursor.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar, final

import attrs
import trio

from .._events import RecordedEvent, UndecodableEvent
from .._positions import Position

#: What a subscription yields: `RecordedEvent`, or with ``undecodable="include"`` either kind.
EventT_co = TypeVar("EventT_co", bound=RecordedEvent | UndecodableEvent, covariant=True)

#: Reads the page after a position (the filter, page size and ``"include"`` are bound in).
ReadPage = Callable[[Position | None], Awaitable[Sequence[RecordedEvent | UndecodableEvent]]]


@attrs.frozen
class _Source(Generic[EventT_co]):
    """Where a subscription reads, and how it turns what it read into what it yields."""

    read_page: ReadPage
    wait: Callable[[], Awaitable[None]]
    # Raises EventDecodeError for an undecodable event under "raise" (pages are read with
    # "include", so the error comes at that event, after every event before it was yielded).
    decode: Callable[[RecordedEvent | UndecodableEvent], EventT_co]
    poll_interval: float


class _Phase(enum.Enum):
    NEW = "new"  # made by subscribe(), not entered yet
    OPEN = "open"  # inside its async with block
    CLOSED = "closed"  # the block has ended


@final
class EventSubscription(Generic[EventT_co]):
    """Every committed event after a position, in the global order, as they are written.

    Obtained from `EventReader.subscribe` and used as ``async with ... as events:`` then
    ``async for event in events:``. It yields what paging `EventReader.read_events` yields,
    gap-free (an event whose transaction commits late still comes, in its place), and waits for
    more when it has yielded everything visible: the iteration ends only when the consumer
    leaves the loop or is cancelled.

    It reads a page only when the consumer asks for an event and none is left of the last page,
    so a slow consumer is never read ahead of by more than one page. Nothing runs in the
    background; each step is a Trio checkpoint, and cancelling one loses no event (the next step
    yields the event the cancelled one would have). One task iterates it at a time.

    Raises (from a step):
        EventDecodeError: with ``undecodable="raise"``, the next event does not decode. It is
            not consumed: `position` stays before it, and the next step raises again; read it
            with ``undecodable="include"`` from `position`.
        StoreClosed: the store was closed.
        StoreConnectionError: a read failed (PostgreSQL). Nothing is consumed; the next step
            reads again.

    .. versionadded:: 0.4
    """

    __slots__ = ("_next", "_page", "_phase", "_position", "_source", "_stepping")

    def __init__(
        self,
        *,
        read_page: ReadPage,
        wait: Callable[[], Awaitable[None]],
        decode: Callable[[RecordedEvent | UndecodableEvent], EventT_co],
        after: Position | None,
        poll_interval: float,
    ) -> None:
        """Not for applications: `EventReader.subscribe` makes one, its arguments checked."""
        self._source = _Source(read_page, wait, decode, poll_interval)
        # The position of the last event yielded, or the start: the cursor of the next read
        # whenever the page is used up, and the resume point.
        self._position = after
        # The last page read; the events before index _next have been yielded.
        self._page: Sequence[RecordedEvent | UndecodableEvent] = ()
        self._next = 0
        self._phase = _Phase.NEW
        # True while a task is inside a step: two consumers would split the events.
        self._stepping = False

    @property
    def position(self) -> Position | None:
        """The position of the last event yielded, or *after* while none has been.

        Pass it as *after* to a new subscription (or to `EventReader.read_events`) to go on
        from the next event. Readable during and after the ``async with`` block.
        """
        return self._position

    async def __aenter__(self) -> EventSubscription[EventT_co]:
        """Start the subscription (a checkpoint; it reads nothing until the first step)."""
        if self._phase is not _Phase.NEW:
            raise RuntimeError("a subscription is entered once; subscribe() again to follow anew")
        await trio.lowlevel.checkpoint()
        self._phase = _Phase.OPEN
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """End the subscription: it holds nothing to release, and yields nothing more."""
        self._phase = _Phase.CLOSED
        self._page = ()

    def __aiter__(self) -> EventSubscription[EventT_co]:
        """The subscription is its own iterator."""
        return self

    async def __anext__(self) -> EventT_co:
        """The next event: from the page held, else read, else wait for one to be written."""
        if self._phase is not _Phase.OPEN:
            raise RuntimeError(
                "iterate a subscription inside its `async with` block: "
                "`async with store.subscribe(...) as events: async for event in events: ...`"
                if self._phase is _Phase.NEW
                else "this subscription's `async with` block has ended; go on with "
                "store.subscribe(after=events.position)"
            )
        if self._stepping:
            raise RuntimeError("another task is already waiting for this subscription's next event")
        self._stepping = True
        try:
            if self._next < len(self._page):
                # Every step is a checkpoint, whether or not it has to read.
                await trio.lowlevel.checkpoint()
            while self._next >= len(self._page):
                await self._fill()
            event = self._source.decode(self._page[self._next])
            self._next += 1
            self._position = event.position
            return event
        finally:
            self._stepping = False

    async def _fill(self) -> None:
        # Read the next page; when there is none yet, wait for a hint that events were
        # committed, or for the poll interval (a hint lost between the empty read and the wait,
        # or one the store cannot give, costs that much latency), and let the caller read again.
        source = self._source
        page = await source.read_page(self._position)
        if page:
            self._page, self._next = page, 0
            return
        with trio.move_on_after(source.poll_interval):
            await source.wait()
