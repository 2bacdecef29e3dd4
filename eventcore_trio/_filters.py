"""`EventFilter` and the stream-pattern glob language shared by every backend."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import final

import attrs

from ._errors import InvalidArgument
from ._partitions import Partition
from ._validation import MAX_EVENT_TYPE_LENGTH, MAX_STREAM_ID_LENGTH, check_identifier, check_tags


def _escape(ch: str) -> str:
    # Escaping every ASCII non-alphanumeric character makes it literal both in Python's `re`
    # and in PostgreSQL's advanced regular expressions, where `\` + an alphanumeric would be a
    # class escape instead (`\d`), so those are never escaped.
    if ch.isascii() and not ch.isalnum():
        return "\\" + ch
    return ch


def glob_to_regex(pattern: str) -> str:
    r"""Translate a stream-pattern glob into an anchored regular expression.

    The glob language: ``*`` matches any run of characters, ``/`` included; ``?`` matches one
    character; ``[abc]`` and ``[a-z]`` match one character of a set, ``[!abc]`` one character
    outside it; a ``]`` right after ``[`` or ``[!`` is a literal member. Every other
    character matches itself. There is no escape character: write ``[*]`` for a literal star.

    The result is valid, and means the same, in Python's `re` and in PostgreSQL's ``~``.

    Raises:
        InvalidArgument: an unterminated or empty ``[`` set, or a reversed range.
    """
    out: list[str] = ["^"]
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            out.append(".*")
            i += 1
        elif ch == "?":
            out.append(".")
            i += 1
        elif ch == "[":
            j = i + 1
            negate = j < n and pattern[j] == "!"
            if negate:
                j += 1
            members: list[str] = []
            first = True
            while j < n and (first or pattern[j] != "]"):
                first = False
                low = pattern[j]
                if j + 2 < n and pattern[j + 1] == "-" and pattern[j + 2] != "]":
                    high = pattern[j + 2]
                    if high < low:
                        raise InvalidArgument(
                            f"stream_pattern {pattern!r} has a reversed range "
                            f"[{low}-{high}]; write [{high}-{low}]"
                        )
                    members.append(f"{_escape(low)}-{_escape(high)}")
                    j += 3
                else:
                    members.append(_escape(low))
                    j += 1
            if j >= n:
                raise InvalidArgument(
                    f"stream_pattern {pattern!r} has a '[' at index {i} without a closing ']'; "
                    "write [[] to match a literal '['"
                )
            out.append("[" + ("^" if negate else "") + "".join(members) + "]")
            i = j + 1
        else:
            out.append(_escape(ch))
            i += 1
    out.append("$")
    return "".join(out)


def _to_event_types(value: Iterable[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str | bytes):
        raise InvalidArgument(
            f"event_types must be a collection of type names, not a single string: "
            f"write event_types=[{value!r}]"
        )
    try:
        types = frozenset(value)
    except TypeError as exc:
        raise InvalidArgument(
            f"event_types must be a collection of type names, got {type(value).__name__}"
        ) from exc
    if not types:
        raise InvalidArgument("event_types must name at least one type, or be None for all types")
    for name in types:
        check_identifier("event type", name, max_length=MAX_EVENT_TYPE_LENGTH)
    return types


def _check_prefix(_: object, __: object, value: str | None) -> None:
    if value is not None:
        check_identifier(
            "stream_prefix", value, max_length=MAX_STREAM_ID_LENGTH, trailing_whitespace=True
        )


def _check_pattern(instance: EventFilter, _: object, value: str | None) -> None:
    if value is not None:
        check_identifier("stream_pattern", value, max_length=MAX_STREAM_ID_LENGTH * 4)
        glob_to_regex(value)


def _to_tags(value: object) -> tuple[str, ...]:
    return check_tags(value, owner="EventFilter.tags")


def _check_partition(_: object, __: object, value: Partition | None) -> None:
    if value is not None and not isinstance(value, Partition):
        raise InvalidArgument(f"partition must be a Partition, got {type(value).__name__}")


@final
@attrs.frozen(kw_only=True)
class EventFilter:
    """Which events a reader wants; backends apply it before the page limit.

    All given criteria must hold. An empty filter (the default) matches every event.

    Attributes:
        event_types: event type names to include, or None for all types.
        stream_prefix: a literal prefix of stream ids (``_`` and ``%`` are not wildcards).
        stream_pattern: a glob over the whole stream id (see `glob_to_regex`): ``*`` matches
            any run of characters including ``/``, ``?`` one character, ``[...]`` and
            ``[!...]`` sets.
        partition: only streams in this `Partition` (by the stable `stream_hash`).

            .. versionadded:: 0.2
        tags: only events carrying every one of these tags (distinct and sorted, checked as
            `NewEvent`'s tags are); empty (the default) for any tags.

            .. versionadded:: 0.4

    Raises:
        InvalidArgument: a type name, prefix, pattern or tag is invalid.

    .. versionadded:: 0.1
    .. versionchanged:: 0.4
       *tags*.
    """

    event_types: frozenset[str] | None = attrs.field(default=None, converter=_to_event_types)
    stream_prefix: str | None = attrs.field(default=None, validator=_check_prefix)
    stream_pattern: str | None = attrs.field(default=None, validator=_check_pattern)
    partition: Partition | None = attrs.field(default=None, validator=_check_partition)
    tags: tuple[str, ...] = attrs.field(default=(), converter=_to_tags)
    # The pattern compiled once; derived, so it takes no part in equality or the repr.
    _regex: re.Pattern[str] | None = attrs.field(
        init=False, eq=False, repr=False, hash=False, order=False
    )

    def __attrs_post_init__(self) -> None:
        compiled = None
        if self.stream_pattern is not None:
            compiled = re.compile(glob_to_regex(self.stream_pattern), re.DOTALL)
        object.__setattr__(self, "_regex", compiled)

    @property
    def is_empty(self) -> bool:
        """True when the filter matches every event."""
        return (
            self.event_types is None
            and self.stream_prefix is None
            and self._regex is None
            and self.partition is None
            and not self.tags
        )

    @property
    def stream_regex(self) -> str | None:
        """The stream pattern as an anchored regular expression, or None."""
        return None if self.stream_pattern is None else glob_to_regex(self.stream_pattern)

    def matches(self, stream_id: str, event_type: str, tags: Collection[str] = ()) -> bool:
        """Whether an event of *event_type* in stream *stream_id* carrying *tags* passes this
        filter.

        .. versionchanged:: 0.4
           *tags*: a filter with tags passes no event whose tags are not given.
        """
        if self.event_types is not None and event_type not in self.event_types:
            return False
        if self.tags and not all(tag in tags for tag in self.tags):
            return False
        if self.stream_prefix is not None and not stream_id.startswith(self.stream_prefix):
            return False
        if self._regex is not None and self._regex.match(stream_id) is None:
            return False
        return self.partition is None or self.partition.contains(stream_id)
