"""Tests for the event values: NewEvent, StreamAppend, AppendResult, RecordedEvent."""

import datetime as dt
import sys
import unicodedata
import uuid

import attrs
import pytest

from eventcore_trio import InvalidArgument, NewEvent, Position, RecordedEvent, StreamAppend
from eventcore_trio._events import trusted_recorded_event
from eventcore_trio._validation import check_stream_id


class TestNewEvent:
    """NewEvent validation."""

    def test_defaults(self) -> None:
        """Metadata defaults to an empty mapping and the id to None (store-generated)."""
        event = NewEvent("Opened", {"owner": "ada"})
        assert dict(event.metadata) == {}
        assert event.event_id is None

    @pytest.mark.parametrize(
        ("args", "kwargs", "message"),
        [
            (("", {}), {}, "must not be empty"),
            (("A\nB", {}), {}, "control"),
            ((1, {}), {}, "must be a str"),
            (("A", [1, 2]), {}, "must be a mapping"),
            (("A", {}), {"metadata": "x"}, "must be a mapping"),
            (("A", {}), {"event_id": "not-a-uuid"}, "uuid.UUID"),
            (("x" * 256, {}), {}, "maximum is 255"),
        ],
    )
    def test_invalid_fields(
        self, args: tuple[object, ...], kwargs: dict[str, object], message: str
    ) -> None:
        """Each invalid field raises InvalidArgument saying what was expected."""
        with pytest.raises(InvalidArgument, match=message):
            NewEvent(*args, **kwargs)  # type: ignore[arg-type]

    def test_event_id_accepts_uuid(self) -> None:
        """A caller-supplied UUID is kept."""
        event_id = uuid.uuid4()
        assert NewEvent("A", {}, event_id=event_id).event_id == event_id

    @pytest.mark.parametrize(
        ("text", "refused"),
        [
            ("Dépôt", False),
            ("a\u00a0b", False),  # a no-break space: a separator, allowed
            ("a\u3000b", False),
            ("a\x7fb", True),
            ("a\u200bb", True),  # zero-width space: a format character
            ("a\u0378b", True),  # unassigned
            ("a\ud800b", True),  # a lone surrogate
            ("a\x00b", True),
        ],
    )
    def test_identifiers_refuse_exactly_the_control_categories(
        self, text: str, refused: bool
    ) -> None:
        """Identifiers refuse characters of the "C" categories, and nothing else, also where
        the check takes its quick way (printable text)."""
        if refused:
            with pytest.raises(InvalidArgument, match="control"):
                NewEvent(text, {})
        else:
            assert NewEvent(text, {}).type == text

    def test_printable_text_has_no_control_character(self) -> None:
        """What the identifier check relies on: no printable character is in a "C"
        category, over every code point."""
        printable_control = [
            hex(code)
            for code in range(sys.maxunicode + 1)
            if chr(code).isprintable() and unicodedata.category(chr(code))[0] == "C"
        ]
        assert printable_control == []
        check_stream_id("stream-\u00e9")

    def test_frozen(self) -> None:
        """NewEvent is immutable."""
        event = NewEvent("A", {})
        with pytest.raises(AttributeError):
            event.type = "B"  # type: ignore[misc]


class TestStreamAppend:
    """StreamAppend validation."""

    def test_events_are_frozen_into_a_tuple(self) -> None:
        """A list of events becomes a tuple, so the request cannot change afterwards."""
        append = StreamAppend("s", [NewEvent("A", {})], expected_version=0)
        assert isinstance(append.events, tuple)

    def test_any_sequence_of_events_is_accepted(self) -> None:
        """Lists, tuples and other sequences of events (a list subclass, a range-like view)
        all become the same tuple."""

        class Events(list[NewEvent]):
            pass

        events = [NewEvent("A", {}), NewEvent("B", {})]
        for given in (events, tuple(events), Events(events)):
            assert StreamAppend("s", given).events == tuple(events)

    def test_the_first_item_that_is_not_an_event_is_named(self) -> None:
        """The error names the index of the first item that is not a NewEvent."""
        items = [NewEvent("A", {}), NewEvent("B", {}), {"type": "C"}, 7]
        with pytest.raises(InvalidArgument, match=r"events\[2\] must be a NewEvent, got dict"):
            StreamAppend("s", items)  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("stream_id", "events", "expected_version"),
        [
            ("", [], None),
            ("s", NewEvent("A", {}), None),
            ("s", "AB", None),
            ("s", [{"type": "A"}], None),
            ("s", [], -2),
            ("s", [], "1"),
        ],
    )
    def test_invalid_requests(
        self, stream_id: object, events: object, expected_version: object
    ) -> None:
        """Bad ids, event lists and versions raise InvalidArgument."""
        with pytest.raises(InvalidArgument):
            StreamAppend(stream_id, events, expected_version=expected_version)  # type: ignore[arg-type]


class TestRecordedEvent:
    """RecordedEvent as stores build it."""

    def test_the_stores_constructor_builds_the_same_event(self) -> None:
        """`trusted_recorded_event` (what decoding a row uses) gives an event equal to the
        one the public constructor gives, with every field set, and as frozen."""
        fields = {
            "event_id": uuid.uuid4(),
            "stream_id": "s",
            "stream_version": 3,
            "position": Position(7, 9),
            "type": "A",
            "data": {"n": 1},
            "metadata": {},
            "recorded_at": dt.datetime.now(dt.UTC),
            "tags": ("a", "b"),
            "subject": "customer-1",
            "personal": ("email",),
            "forgotten": ("email",),
        }
        assert [f.name for f in attrs.fields(RecordedEvent)] == list(fields)
        trusted = trusted_recorded_event(*fields.values())  # type: ignore[arg-type]
        public = RecordedEvent(**fields)  # type: ignore[arg-type]
        assert trusted == public
        assert repr(trusted) == repr(public)
        assert attrs.asdict(trusted, recurse=False) == fields
        with pytest.raises(AttributeError):
            trusted.type = "B"  # type: ignore[misc]
