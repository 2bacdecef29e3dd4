"""Tests for `Position`: opaque, ordered, hashable, round-tripping through strings."""

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventcore_trio import InvalidArgument, Position

components = st.integers(0, 2**63 - 1)


class TestPosition:
    """Position values."""

    @given(components, components)
    def test_str_parse_round_trip(self, commit: int, sequence: int) -> None:
        """Every position parses back from its string form."""
        position = Position(commit, sequence)
        assert Position.parse(str(position)) == position

    @given(components, components, components, components)
    def test_order_is_commit_then_sequence(self, c1: int, s1: int, c2: int, s2: int) -> None:
        """Positions order by commit first, then sequence, consistently with equality."""
        a, b = Position(c1, s1), Position(c2, s2)
        assert (a < b) == ((c1, s1) < (c2, s2))
        assert (a == b) == (hash(a) == hash(b) and (c1, s1) == (c2, s2))

    @pytest.mark.parametrize(
        "text", ["", "1", "1:", ":1", "01:1", "1:01", "-1:2", "1:2:3", " 1:2", "a:b", "1:2\n"]
    )
    def test_parse_rejects_malformed_text(self, text: str) -> None:
        """Strings that str(position) never produces are refused with InvalidArgument."""
        with pytest.raises(InvalidArgument):
            Position.parse(text)

    def test_parse_rejects_non_strings(self) -> None:
        """Parsing something that is not a str names the type received."""
        with pytest.raises(InvalidArgument, match="int"):
            Position.parse(12)  # type: ignore[arg-type]

    @pytest.mark.parametrize(("commit", "sequence"), [(-1, 0), (0, -1), (2**63, 0), (1.0, 2)])
    def test_constructor_validates_components(self, commit: object, sequence: object) -> None:
        """Out-of-range or non-int components are refused."""
        with pytest.raises(InvalidArgument):
            Position(commit, sequence)  # type: ignore[arg-type]

    def test_repr_shows_how_to_rebuild(self) -> None:
        """The repr is an expression that rebuilds the position."""
        assert repr(Position(7, 9)) == "Position.parse('7:9')"

    def test_pickle_round_trip(self) -> None:
        """Positions survive pickling (for multiprocessing hosts)."""
        position = Position(3, 4)
        assert pickle.loads(pickle.dumps(position)) == position

    def test_frozen(self) -> None:
        """Positions are immutable."""
        position = Position(1, 2)
        with pytest.raises(AttributeError):
            position._commit = 5  # type: ignore[misc]
