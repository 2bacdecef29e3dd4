"""`ReadEventsBase`: `EventReader.read_events`, its two overloads and its argument checks, once.

The protocol types ``read_events`` by *undecodable*: ``"raise"`` gives `RecordedEvent` only,
``"include"`` may give `UndecodableEvent` too. A backend subclasses this and implements
`ReadEventsBase._read_page`, which fetches the page and decodes it as asked; the arguments
are checked here, before any I/O.
"""

from __future__ import annotations

import abc
from typing import Literal, overload

from .._events import RecordedEvent, UndecodableEvent
from .._filters import EventFilter
from .._positions import Position
from ._decoding import check_read_arguments

#: What `EventReader.read_events` does with an event that does not decode.
Undecodable = Literal["raise", "include"]
#: A page of `EventReader.read_events`: undecodable events only with ``"include"``.
Page = list[RecordedEvent] | list[RecordedEvent | UndecodableEvent]


class ReadEventsBase(abc.ABC):
    """`EventReader.read_events` for a backend that implements `_read_page`."""

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
