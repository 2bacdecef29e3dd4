"""`Position`: where an event sits in a store's global, commit-safe order."""

from __future__ import annotations

import re
from typing import Final, final

import attrs

from ._errors import InvalidArgument

_FORMAT: Final = re.compile(r"\A(0|[1-9][0-9]{0,18}):(0|[1-9][0-9]{0,18})\Z")
_MAX: Final = 2**63 - 1


def _check_component(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if type(value) is not int or not 0 <= value <= _MAX:
        raise InvalidArgument(
            f"Position.{attribute.alias} must be an int in [0, 2**63 - 1], got {value!r}"
        )


@final
@attrs.frozen(eq=False, order=False, repr=False)
class Position:
    """An opaque, totally ordered, hashable place in a store's global event order.

    Positions compare in the order in which a reader sees events, which on PostgreSQL is commit
    order (see the docs on gap-free reads), not the order in which appends started. Treat a
    position as a token: store it with ``str(position)`` and get it back with
    `Position.parse`; only positions from the same store are comparable in a meaningful way.

    .. versionadded:: 0.1
    """

    # The writing transaction's ordinal (PostgreSQL: its xid8; memory: an append counter).
    # Invariant: every event of one transaction shares it, and a reader sees transactions in
    # ascending order of it.
    _commit: int = attrs.field(validator=_check_component)
    # The event's ordinal within the store, increasing within a transaction.
    _sequence: int = attrs.field(validator=_check_component)

    # Comparisons are hand-written: readers compare positions for every event they see, and
    # attrs' generic tuple-building versions cost several times more.
    def __eq__(self, other: object) -> bool:
        if type(other) is not Position:
            return NotImplemented
        return self._commit == other._commit and self._sequence == other._sequence

    def __hash__(self) -> int:
        return hash((self._commit, self._sequence))

    def __lt__(self, other: Position) -> bool:
        if type(other) is not Position:
            return NotImplemented
        return (self._commit, self._sequence) < (other._commit, other._sequence)

    def __le__(self, other: Position) -> bool:
        if type(other) is not Position:
            return NotImplemented
        return (self._commit, self._sequence) <= (other._commit, other._sequence)

    def __gt__(self, other: Position) -> bool:
        if type(other) is not Position:
            return NotImplemented
        return (self._commit, self._sequence) > (other._commit, other._sequence)

    def __ge__(self, other: Position) -> bool:
        if type(other) is not Position:
            return NotImplemented
        return (self._commit, self._sequence) >= (other._commit, other._sequence)

    def __str__(self) -> str:
        return f"{self._commit}:{self._sequence}"

    def __repr__(self) -> str:
        return f"Position.parse({str(self)!r})"

    @classmethod
    def parse(cls, text: str) -> Position:
        """Rebuild a position from its string form, ``str(position)``.

        Raises:
            InvalidArgument: *text* is not a string made by ``str(position)``.
        """
        if not isinstance(text, str):
            raise InvalidArgument(f"Position.parse() takes a str, got {type(text).__name__}")
        match = _FORMAT.match(text)
        if match is None:
            raise InvalidArgument(
                f"{text!r} is not a position; positions look like '1234:56' (use str(position))"
            )
        return cls(int(match[1]), int(match[2]))


_new = object.__new__


# The slots' own setters (their member descriptors' __set__): a frozen class refuses setattr,
# and this skips the name lookup object.__setattr__ makes per call; trusted_position runs
# once per event read.
_set_commit = vars(Position)["_commit"].__set__
_set_sequence = vars(Position)["_sequence"].__set__


def trusted_position(commit: int, sequence: int) -> Position:
    """Backend helper: a position from values the database produced, without re-validating."""
    position: Position = _new(Position)
    _set_commit(position, commit)
    _set_sequence(position, sequence)
    return position


def position_parts(position: Position) -> tuple[int, int]:
    """Backend helper: the (commit, sequence) pair behind an opaque position."""
    return position._commit, position._sequence
