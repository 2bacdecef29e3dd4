"""`ReadEventsBase`: `EventReader.read_events` and `EventReader.subscribe`, their overloads
and their argument checks, once.

The protocol types both by *undecodable*: ``"raise"`` gives `RecordedEvent` only,
``"include"`` may give `UndecodableEvent` too. A backend subclasses this and implements
`ReadEventsBase._read_page`, which fetches the page and decodes it as asked, and
`wait_for_events`; the arguments are checked here, before any I/O. A subscription pages
through `read_events` (so it sees exactly what a reader paging by hand sees) and waits on
`wait_for_events`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Literal, overload

from .._errors import InvalidArgument
from .._events import RecordedEvent, UndecodableEvent
from .._filters import EventFilter
from .._positions import Position
from .._validation import MAX_BIGINT
from ._decoding import check_read_arguments, require_decoded
from ._subscription import EventSubscription

#: What `EventReader.read_events` does with an event that does not decode.
Undecodable = Literal["raise", "include"]
#: A page of `EventReader.read_events`: undecodable events only with ``"include"``.
Page = list[RecordedEvent] | list[RecordedEvent | UndecodableEvent]


class ReadEventsBase(abc.ABC):
    """`EventReader.read_events` and `EventReader.subscribe` for a backend that implements
    `_read_page` and `wait_for_events`."""

    __slots__ = ()

    @overload
    async def read_events(
        self,
        after: Position | None,
        *,
        limit: int,
        filter: EventFilter | None = None,
        undecodable: Literal["raise"] = "raise",
    ) -> list[RecordedEvent]: ...

    @overload
    async def read_events(
        self,
        after: Position | None,
        *,
        limit: int,
        filter: EventFilter | None = None,
        undecodable: Literal["include"],
    ) -> list[RecordedEvent | UndecodableEvent]: ...

    async def read_events(
        self,
        after: Position | None,
        *,
        limit: int,
        filter: EventFilter | None = None,
        undecodable: Undecodable = "raise",
    ) -> Page:
        """Return up to *limit* events after *after* (see `EventReader.read_events`).

        Raises:
            InvalidArgument: an argument has the wrong type or value (before any I/O).
            EventDecodeError: with ``undecodable="raise"``, a stored event does not decode.
        """
        check_read_arguments(after, limit, filter, undecodable)
        return await self._read_page(after, limit, filter, undecodable)

    @abc.abstractmethod
    async def _read_page(
        self, after: Position | None, limit: int, filter: EventFilter | None, mode: Undecodable
    ) -> Page:
        """Up to *limit* events after *after* matching *filter*, in position order, each
        decoded as *mode* says: with ``"raise"`` an undecodable one raises `EventDecodeError` (see
        `require_decoded`), with ``"include"`` it is returned as an `UndecodableEvent`.

        The arguments are already checked; the backend checks that it is open.
        """

    @abc.abstractmethod
    async def wait_for_events(self) -> None:
        """Return when new events may have been committed (see `EventReader.wait_for_events`)."""

    @overload
    def subscribe(
        self,
        after: Position | None = None,
        *,
        filter: EventFilter | None = None,
        page_size: int = 100,
        poll_interval: float = 1.0,
        undecodable: Literal["raise"] = "raise",
    ) -> EventSubscription[RecordedEvent]: ...

    @overload
    def subscribe(
        self,
        after: Position | None = None,
        *,
        filter: EventFilter | None = None,
        page_size: int = 100,
        poll_interval: float = 1.0,
        undecodable: Literal["include"],
    ) -> EventSubscription[RecordedEvent | UndecodableEvent]: ...

    def subscribe(
        self,
        after: Position | None = None,
        *,
        filter: EventFilter | None = None,
        page_size: int = 100,
        poll_interval: float = 1.0,
        undecodable: Undecodable = "raise",
    ) -> EventSubscription[RecordedEvent | UndecodableEvent]:
        """Follow every committed event after *after*, live (see `EventReader.subscribe`).

        Raises:
            InvalidArgument: an argument has the wrong type or value (raised by this call,
                before any I/O).

        .. versionadded:: 0.4
        """
        check_subscribe_arguments(after, filter, page_size, poll_interval, undecodable)

        async def read_page(cursor: Position | None) -> Sequence[RecordedEvent | UndecodableEvent]:
            # Through the public method, looked up at each read: a subscription pages exactly
            # as a caller of read_events does. Always "include": under "raise" the subscription
            # raises at the undecodable event itself, once the events before it are yielded.
            return await self.read_events(
                cursor, limit=page_size, filter=filter, undecodable="include"
            )

        return EventSubscription(
            read_page=read_page,
            wait=self.wait_for_events,
            decode=require_decoded if undecodable == "raise" else _as_read,
            after=after,
            poll_interval=poll_interval,
        )


def _as_read(event: RecordedEvent | UndecodableEvent) -> RecordedEvent | UndecodableEvent:
    return event


def check_subscribe_arguments(
    after: object, filter: object, page_size: object, poll_interval: object, undecodable: object
) -> None:
    """Validate `EventReader.subscribe` arguments: those it shares with `read_events` as that
    checks them, *page_size* as its *limit*, and *poll_interval*.

    Raises:
        InvalidArgument: an argument has the wrong type or value.
    """
    if type(page_size) is not int or not 1 <= page_size <= MAX_BIGINT:
        raise InvalidArgument(f"page_size must be an int from 1 to 2**63 - 1, got {page_size!r}")
    if (
        isinstance(poll_interval, bool)
        or not isinstance(poll_interval, int | float)
        or not 0 < poll_interval < math.inf
    ):
        raise InvalidArgument(
            f"poll_interval must be a finite number of seconds > 0, got {poll_interval!r}"
        )
    check_read_arguments(after, page_size, filter, undecodable)
