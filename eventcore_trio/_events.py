"""Event values: what callers append and what stores give back."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Protocol, final

import attrs

from ._errors import EventDecodeError, InvalidArgument
from ._personal._fields import check_personal_event, check_personal_names, check_subject
from ._positions import Position
from ._validation import (
    MAX_EVENT_TYPE_LENGTH,
    check_expected_version,
    check_identifier,
    check_stream_id,
    check_tags,
)

#: NewEvent's default metadata (no metadata): appends encode it as ``{}`` without looking.
NO_METADATA: Final[Mapping[str, Any]] = MappingProxyType({})


def _check_event_type(_: Any, __: Any, value: Any) -> None:
    check_identifier("event type", value, max_length=MAX_EVENT_TYPE_LENGTH)


def _check_mapping(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if type(value) is not dict and not isinstance(value, Mapping):
        raise InvalidArgument(
            f"NewEvent.{attribute.name} must be a mapping (a JSON object), "
            f"got {type(value).__name__}: {value!r:.80}"
        )


def _check_personal(instance: NewEvent, _: Any, value: tuple[str, ...]) -> None:
    # The subject's check too: one call per event, not two, on the path of every append.
    # attrs runs validators once every field is set: data and subject are there.
    subject = instance.subject
    if subject is not None:
        check_subject(subject)
    if value:
        check_personal_event(subject, value, instance.data)


def _check_event_id(_: Any, __: Any, value: Any) -> None:
    if value is not None and not isinstance(value, uuid.UUID):
        raise InvalidArgument(
            f"NewEvent.event_id must be a uuid.UUID or None, got {type(value).__name__}: {value!r}"
        )


@final
@attrs.frozen
class NewEvent:
    """An event to append: a type name, a JSON object of data, and optional metadata.

    Attributes:
        type: the event type, e.g. ``"AccountOpened"`` (1-255 characters, no control characters).
        data: a JSON object (a mapping with string keys and JSON values).
        metadata: a JSON object of metadata such as correlation and causation ids.
        event_id: a unique id; the store generates one when None. Passing your own makes a
            retried append idempotent (a duplicate raises `DuplicateEventId`).
        tags: strings that queries select events by (`EventQuery`), e.g.
            ``["username:ada"]``: distinct, 1-255 characters, at most 64; kept sorted.
            Both stores keep them, on every write path.
        subject: the data subject (the person) the event is about, e.g. ``"customer-42"``:
            an id (1-244 characters, no control characters), not personal data itself,
            since it is stored in plain text. `PersonalDataStore.forget` forgets a subject.
        personal: the top-level keys of *data* that are personal data of *subject*: each
            must be in *data*; distinct, at most 64; kept sorted. The store seals their
            values (AES-GCM under the subject's key) before they leave the process, and
            after a forget they read back absent (see `RecordedEvent.forgotten`). The rest
            of *data* stays plain. Needs a *subject*, and a store that keeps personal data
            (the memory store; PostgreSQL follows, issue 29).

    Raises:
        InvalidArgument: a field has the wrong type or an invalid value, a personal field
            is not in *data*, or personal fields have no subject. Whether data and metadata
            are JSON-serialisable is checked by ``append`` (raising `EventEncodeError`)
            before anything is written.

    .. versionadded:: 0.1
    .. versionchanged:: 0.4
       ``tags``, ``subject`` and ``personal``.
    """

    type: str = attrs.field(validator=_check_event_type)
    data: Mapping[str, Any] = attrs.field(validator=_check_mapping)
    metadata: Mapping[str, Any] = attrs.field(
        default=NO_METADATA, validator=_check_mapping, kw_only=True
    )
    event_id: uuid.UUID | None = attrs.field(default=None, validator=_check_event_id, kw_only=True)
    tags: tuple[str, ...] = attrs.field(default=(), converter=check_tags, kw_only=True)
    # Checked by _check_personal.
    subject: str | None = attrs.field(default=None, kw_only=True)
    personal: tuple[str, ...] = attrs.field(
        default=(), converter=check_personal_names, validator=_check_personal, kw_only=True
    )


class SealedOpener(Protocol):
    """How a read event's personal fields are opened when its data is first read
    (`_personal._envelope.open_event`, installed by that module: it depends on this one)."""

    def __call__(self, event: RecordedEvent, sealed: dict[str, Any], key: Any) -> dict[str, Any]:
        """*event*'s data: *sealed* (as stored) with its personal fields opened with *key*.

        Raises:
            EventDecodeError: they do not open (altered, moved, or sealed under another key).
        """
        ...


def _no_opener(event: RecordedEvent, sealed: dict[str, Any], key: Any) -> dict[str, Any]:
    raise RuntimeError("eventcore_trio._personal._envelope was not imported")


_opener: SealedOpener = _no_opener


# Held while an opened event's data is set (never while opening): one lock for every
# event, so that an event costs no lock object; held for a few instructions, once per event.
_opening: Final = threading.Lock()


def install_sealed_opener(opener: SealedOpener) -> None:
    """Make *opener* open the personal fields of read events (see `SealedOpener`)."""
    global _opener
    _opener = opener


class _OpensOnRead:
    # RecordedEvent's base, for two slots attrs does not manage: an event read with personal
    # fields holds its stored data (the fields sealed) in _sealed and its subject's key in
    # _key, and its data slot stays empty until the data is first read (a projection that
    # never reads them never pays to open them). Two slots rather than one object holding
    # both: a catch-up reads hundreds of thousands of events, and an object per event is
    # both its own cost and more for the garbage collector to walk. Outside attrs, so no
    # attrs tool (asdict, fields, evolve, pickling) sees them: they all read data instead.
    __slots__ = ("_key", "_sealed")

    if not TYPE_CHECKING:  # type checkers would take any attribute name as valid

        def __getattr__(self, name: str) -> Any:
            # Reached only when an attribute is not found: data, for an event not yet opened.
            if name == "data":
                sealed = unopened(self)
                key = _key_slot.__get__(self) if sealed is not None else None
                # No key: another thread opened the event between the two reads.
                if key is not None:
                    data = _opener(self, sealed, key)
                    with _opening:
                        # Threads that opened it at once all return the dict the first
                        # one set, as for an opened event: not each its own.
                        try:
                            return _data_slot.__get__(self)
                        except AttributeError:
                            pass
                        # Data first: another thread that finds the seal gone finds it.
                        _set_data(self, data)
                        _set_sealed(self, None)
                        _set_key(self, None)  # nor the key kept once opened
                    return data
                try:  # opened meanwhile by another thread
                    return _data_slot.__get__(self)
                except AttributeError:
                    pass
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


@final
@attrs.frozen(kw_only=True, repr=False)
class RecordedEvent(_OpensOnRead):
    """An event as stored: its identity, its place in its stream and in the store, its payload.

    Attributes:
        event_id: the event's unique id.
        stream_id: the stream it belongs to.
        stream_version: its version within the stream; 1 is the stream's first event.
        position: its place in the store's global, commit-safe order.
        type: the event type name.
        data: the decoded JSON data.
        metadata: the decoded JSON metadata.
        recorded_at: when it was stored (timezone-aware, UTC).
        tags: the tags it was appended with, sorted (none for most events).
        subject: the data subject it was appended with (`NewEvent.subject`), or None.
        personal: the names of its personal fields (`NewEvent.personal`), sorted: plain
            values in *data* while the subject's key exists.
        forgotten: the personal fields removed from *data* because the subject was
            forgotten (then every name in *personal*); empty otherwise.

    An event read with personal fields opens them the first time its *data* is read; when
    they do not open (the stored value was altered), reading *data* raises
    `EventDecodeError`.

    .. versionadded:: 0.1
    .. versionchanged:: 0.4
       ``tags``, ``subject``, ``personal`` and ``forgotten``.
    """

    event_id: uuid.UUID
    stream_id: str
    stream_version: int
    position: Position
    type: str
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: dt.datetime
    tags: tuple[str, ...] = ()
    subject: str | None = None
    personal: tuple[str, ...] = ()
    forgotten: tuple[str, ...] = ()

    def __repr__(self) -> str:
        # attrs' form, except that data that does not open is shown as such instead of
        # raising: failures and logs hold events, and printing them must not fail.
        fields = []
        for field in attrs.fields(RecordedEvent):
            try:
                value = repr(getattr(self, field.name))
            except EventDecodeError:
                value = "<personal fields that do not open>"
            fields.append(f"{field.name}={value}")
        return f"RecordedEvent({', '.join(fields)})"


_new: Final = object.__new__


def _slot_setter(name: str) -> Any:
    # A slot's own setter (its member descriptor's __set__): a frozen class refuses setattr,
    # and attrs' __init__ goes around that with object.__setattr__ per field, which looks
    # the name up again each time; this is what that finds.
    return vars(RecordedEvent)[name].__set__


_set_event_id: Final = _slot_setter("event_id")
_set_stream_id: Final = _slot_setter("stream_id")
_set_stream_version: Final = _slot_setter("stream_version")
_set_position: Final = _slot_setter("position")
_set_type: Final = _slot_setter("type")
_set_data: Final = _slot_setter("data")
_set_metadata: Final = _slot_setter("metadata")
_set_recorded_at: Final = _slot_setter("recorded_at")
_set_tags: Final = _slot_setter("tags")
_set_subject: Final = _slot_setter("subject")
_set_personal: Final = _slot_setter("personal")
_set_forgotten: Final = _slot_setter("forgotten")
_data_slot: Final = vars(RecordedEvent)["data"]
_sealed_slot: Final = vars(_OpensOnRead)["_sealed"]
_set_sealed: Final = _sealed_slot.__set__
_key_slot: Final = vars(_OpensOnRead)["_key"]
_set_key: Final = _key_slot.__set__


def unopened(event: object) -> dict[str, Any] | None:
    """The data as stored (personal fields sealed) of a read *event* whose data has not
    been read yet, else None."""
    try:
        sealed: dict[str, Any] | None = _sealed_slot.__get__(event)
    except AttributeError:  # never set: an event without personal fields
        return None
    return sealed


def trusted_recorded_event(
    event_id: uuid.UUID,
    stream_id: str,
    stream_version: int,
    position: Position,
    event_type: str,
    data: dict[str, Any],
    metadata: dict[str, Any],
    recorded_at: dt.datetime,
    tags: tuple[str, ...] = (),
    subject: str | None = None,
    personal: tuple[str, ...] = (),
    forgotten: tuple[str, ...] = (),
    key: object = None,
) -> RecordedEvent:
    """Backend helper: a `RecordedEvent` of values a store produced (a row it decoded), the
    same as ``RecordedEvent(...)`` with these fields, built in about half the time: it runs
    once per event read. With *key* (its subject's data key), *data* is as stored, its
    personal fields sealed, and they are opened with *key* when the data is first read."""
    event: RecordedEvent = _new(RecordedEvent)
    _set_event_id(event, event_id)
    _set_stream_id(event, stream_id)
    _set_stream_version(event, stream_version)
    _set_position(event, position)
    _set_type(event, event_type)
    if key is None:
        _set_data(event, data)
    else:
        _set_sealed(event, data)
        _set_key(event, key)
    _set_metadata(event, metadata)
    _set_recorded_at(event, recorded_at)
    _set_tags(event, tags)
    _set_subject(event, subject)
    _set_personal(event, personal)
    _set_forgotten(event, forgotten)
    return event


def _to_event_tuple(value: Sequence[NewEvent] | NewEvent) -> tuple[NewEvent, ...]:
    # A list or a tuple first: isinstance() against the ABCs is slow, and this runs per append.
    if type(value) is not list and type(value) is not tuple:
        if isinstance(value, NewEvent):
            raise InvalidArgument(
                "events must be a sequence of NewEvent; wrap a single event: [event]"
            )
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
            raise InvalidArgument(
                f"events must be a sequence of NewEvent, got {type(value).__name__}"
            )
    # Any: what the caller passed, checked here.
    events: tuple[Any, ...] = tuple(value)
    for event in events:
        if type(event) is not NewEvent:
            # The slow look only when something is not exactly a NewEvent: the first item
            # that isinstance() refuses is named.
            for index, item in enumerate(events):
                if not isinstance(item, NewEvent):
                    raise InvalidArgument(
                        f"events[{index}] must be a NewEvent, got {type(item).__name__}: "
                        f"{item!r:.80}"
                    )
            break
    return events


def _check_stream_id_field(_: Any, __: Any, value: Any) -> None:
    check_stream_id(value)


def _check_expected_field(_: Any, __: Any, value: Any) -> None:
    check_expected_version(value)


@final
@attrs.frozen
class StreamAppend:
    """One stream's part of an atomic multi-stream append (`append_atomic`).

    Attributes:
        stream_id: the stream to append to.
        events: the events to append, possibly none: a `StreamAppend` with no events and an
            expected version makes the stream a read-only participant whose version is still
            checked, so a decision based on it fails if it changed meanwhile.
        expected_version: None (any version), 0 (the stream must not exist yet) or n (the stream
            has exactly n events).

    .. versionadded:: 0.1
    """

    stream_id: str = attrs.field(validator=_check_stream_id_field)
    events: tuple[NewEvent, ...] = attrs.field(converter=_to_event_tuple)
    expected_version: int | None = attrs.field(
        default=None, validator=_check_expected_field, kw_only=True
    )


@final
@attrs.frozen
class AppendResult:
    """What an append wrote.

    Attributes:
        position: the position of the last event written, or None when the append wrote no
            event (only read-only participants).
        stream_versions: each listed stream's version after the append.

    .. versionadded:: 0.1
    """

    position: Position | None
    stream_versions: Mapping[str, int]


def prepare_appends(appends: Sequence[StreamAppend]) -> tuple[StreamAppend, ...]:
    """Validate an `append_atomic` request: a non-empty list of distinct streams."""
    candidate: object = appends
    if isinstance(candidate, StreamAppend) or not isinstance(candidate, Sequence):
        raise InvalidArgument("append_atomic() takes a list of StreamAppend")
    result = tuple(appends)
    if not result:
        raise InvalidArgument("append_atomic() needs at least one StreamAppend")
    seen: set[str] = set()
    for index, item in enumerate(result):
        if not isinstance(item, StreamAppend):
            raise InvalidArgument(
                f"appends[{index}] must be a StreamAppend, got {type(item).__name__}"
            )
        if item.stream_id in seen:
            raise InvalidArgument(
                f"stream {item.stream_id!r} is listed twice in one append_atomic(); "
                "merge its events into one StreamAppend"
            )
        seen.add(item.stream_id)
    return result


@final
@attrs.frozen(kw_only=True)
class UndecodableEvent:
    """A stored event whose data or metadata could not be decoded.

    Readers that ask for them (``read_events(..., undecodable="include")``, as the projection
    runtime does) get this in place of a `RecordedEvent`, so a bad row reaches the projector's
    ``on_error`` instead of stalling the projection or vanishing.

    Attributes:
        event_id: the event's id.
        stream_id: its stream.
        stream_version: its version within the stream.
        position: its place in the global order.
        type: its type name.
        raw_data: the stored data, as text.
        raw_metadata: the stored metadata, as text.
        recorded_at: when it was stored.
        error: why it could not be decoded.

    .. versionadded:: 0.1
    """

    event_id: uuid.UUID
    stream_id: str
    stream_version: int
    position: Position
    type: str
    raw_data: str
    raw_metadata: str
    recorded_at: dt.datetime
    error: str


# Correlation and causation ids, so a whole causal chain of events can be followed.
CORRELATION_ID = "correlation_id"
CAUSATION_ID = "causation_id"


def caused_by(event: RecordedEvent) -> dict[str, str]:
    """Metadata for events written in reaction to *event*.

    The correlation id is carried over (or starts with *event*'s id when it has none); the
    causation id is *event*'s own id. Pass it as metadata when a projector or a process
    manager appends, or give the event to ``execute(..., caused_by_event=event)``.

    .. versionadded:: 0.1
    """
    return {
        CORRELATION_ID: str(event.metadata.get(CORRELATION_ID, event.event_id)),
        CAUSATION_ID: str(event.event_id),
    }
