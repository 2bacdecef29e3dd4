"""Tests for the event values: NewEvent, StreamAppend, AppendResult, RecordedEvent."""

import uuid

import pytest

from eventcore_trio import InvalidArgument, NewEvent, StreamAppend


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
