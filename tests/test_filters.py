"""Tests for `EventFilter` and the stream-pattern glob language."""

import fnmatch
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventcore_trio import EventFilter, InvalidArgument, RecordedEvent, glob_to_regex
from eventcore_trio.projection import ProjectionContext, projector


class TestGlob:
    """The glob language behind stream_pattern."""

    @pytest.mark.parametrize(
        ("pattern", "matching", "not_matching"),
        [
            ("order-*", ["order-", "order-1", "order-1/2"], ["order", "xorder-1"]),
            ("a?c", ["abc", "a/c"], ["ac", "abbc"]),
            ("acc-[12]", ["acc-1", "acc-2"], ["acc-3", "acc-12"]),
            ("acc-[!12]", ["acc-3", "acc-x"], ["acc-1", "acc-"]),
            ("x[a-c]y", ["xby"], ["xdy"]),
            ("[]]", ["]"], ["a"]),
            ("[!]]", ["a"], ["]"]),
            ("a.b+c", ["a.b+c"], ["aXb+c", "a.bbc"]),
            ("(x)|{y}^$", ["(x)|{y}^$"], ["x"]),
            ("back\\slash", ["back\\slash"], ["backslash"]),
            ("[*]", ["*"], ["a"]),
            ("ünïcode-*", ["ünïcode-1"], ["unicode-1"]),
        ],
    )
    def test_matches(self, pattern: str, matching: list[str], not_matching: list[str]) -> None:
        """Each pattern matches exactly the stream ids it should."""
        event_filter = EventFilter(stream_pattern=pattern)
        for stream_id in matching:
            assert event_filter.matches(stream_id, "T"), stream_id
        for stream_id in not_matching:
            assert not event_filter.matches(stream_id, "T"), stream_id

    @pytest.mark.parametrize("pattern", ["[abc", "a[", "[!", "[]", "[b-a]"])
    def test_invalid_patterns_are_refused(self, pattern: str) -> None:
        """Unterminated sets and reversed ranges raise InvalidArgument naming the pattern."""
        with pytest.raises(InvalidArgument, match=re.escape(repr(pattern))):
            EventFilter(stream_pattern=pattern)

    @given(
        st.text(alphabet="ab/*?[]!-", min_size=1, max_size=7),
        st.text(alphabet="ab/-]", max_size=6),
    )
    def test_agrees_with_fnmatchcase(self, pattern: str, stream_id: str) -> None:
        """Where fnmatch has the same syntax, both agree on every id."""
        try:
            regex = re.compile(glob_to_regex(pattern), re.DOTALL)
        except InvalidArgument:
            return
        assert (regex.match(stream_id) is not None) == fnmatch.fnmatchcase(stream_id, pattern)


class TestEventFilter:
    """EventFilter construction and matching."""

    def test_empty_filter_matches_everything(self) -> None:
        """The default filter matches every event."""
        assert EventFilter().is_empty
        assert EventFilter().matches("any", "Any")

    def test_event_types_become_a_frozenset(self) -> None:
        """Event types may be any iterable; they are stored as a frozenset."""
        assert EventFilter(event_types=["A", "B", "A"]).event_types == frozenset({"A", "B"})

    def test_single_string_is_refused(self) -> None:
        """A bare string for event_types is a mistake; the error shows the fix."""
        with pytest.raises(InvalidArgument, match=r"event_types=\['Opened'\]"):
            EventFilter(event_types="Opened")

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"event_types": []},
            {"event_types": [""]},
            {"event_types": [1]},
            {"event_types": 5},
            {"stream_prefix": ""},
            {"stream_prefix": "a\x00"},
            {"stream_pattern": 3},
        ],
    )
    def test_invalid_criteria_are_refused(self, kwargs: dict[str, object]) -> None:
        """Empty, non-string or control-character criteria raise InvalidArgument."""
        with pytest.raises(InvalidArgument):
            EventFilter(**kwargs)  # type: ignore[arg-type]

    def test_prefix_is_literal(self) -> None:
        """SQL wildcards in a prefix are plain characters."""
        event_filter = EventFilter(stream_prefix="a_%")
        assert event_filter.matches("a_%1", "T")
        assert not event_filter.matches("ab%1", "T")

    def test_equality_ignores_compiled_pattern(self) -> None:
        """Two filters with the same criteria are equal and hash alike."""
        assert EventFilter(stream_pattern="a*") == EventFilter(stream_pattern="a*")
        assert hash(EventFilter(stream_pattern="a*")) == hash(EventFilter(stream_pattern="a*"))

    def test_an_event_passes_tags_when_it_carries_every_one(self) -> None:
        """Tags are sorted and distinct; an event needs all of them, extra tags are fine,
        and tags combine with the other criteria by AND. No tags: any event."""
        event_filter = EventFilter(tags=["y", "x", "y"], event_types=["A"])
        assert event_filter.tags == ("x", "y")
        assert not event_filter.is_empty
        assert event_filter.matches("s", "A", ("x", "y", "z"))
        assert not event_filter.matches("s", "A", ("x",))
        assert not event_filter.matches("s", "A")
        assert not event_filter.matches("s", "B", ("x", "y"))
        assert EventFilter(tags=[]) == EventFilter()
        assert EventFilter(tags=[]).is_empty

    @pytest.mark.parametrize(
        "tags",
        [
            "username:ada",
            [""],
            ["a\x00b"],
            ["line\nbreak"],
            [" padded"],
            ["x" * 256],
            [1],
            [f"t{i}" for i in range(65)],
        ],
        ids=[
            "lone string",
            "empty",
            "NUL",
            "control",
            "padded",
            "too long",
            "not a string",
            "65 tags",
        ],
    )
    def test_bad_tags_are_refused(self, tags: object) -> None:
        """Tags are checked as an event's are, in `EventFilter` and in ``@projector``."""
        with pytest.raises(InvalidArgument, match="tag"):
            EventFilter(tags=tags)
        with pytest.raises(InvalidArgument, match="tag"):
            projector("p", tags=tags)  # type: ignore[arg-type]

    def test_projectors_declare_tags(self) -> None:
        """``@projector(tags=...)`` puts them in its filter with its other criteria."""

        @projector("p", event_types=["A"], tags=["course:c1"])
        async def apply(event: RecordedEvent, ctx: ProjectionContext) -> None:
            pass

        assert apply.filter == EventFilter(event_types=["A"], tags=["course:c1"])
