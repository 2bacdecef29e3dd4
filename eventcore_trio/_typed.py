"""Typed events and states: attrs classes registered under stable names, with upcasters.

Stored events never change; classes do. An event's stored shape is its type name, its data,
and the schema version it was written with (metadata key ``event_version``, absent = 1).
Decoding walks upcasters from that shape to registered classes at their current versions,
so every read path (commands, projectors, dead-letter replay) sees today's classes.
"""

from __future__ import annotations

import hashlib
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, TypeVar, final

import attrs
import cattrs
from cattrs.gen import make_mapping_unstructure_fn

from ._errors import ConfigurationError, EventDecodeError, InvalidArgument
from ._events import NewEvent, RecordedEvent
from ._personal._fields import check_personal_names
from ._validation import MAX_EVENT_TYPE_LENGTH, check_identifier

T = TypeVar("T")

#: The metadata key holding the schema version an event's data was written with (absent: 1).
EVENT_VERSION: Final = "event_version"

# A cycle of upcasters would loop for ever; no honest chain is this long.
_MAX_UPCASTS: Final = 1_000

#: The key in a snapshot's data that holds the fingerprint of the fields of the state class
#: that took it (`fields_fingerprint`). Not an identifier: no field declared in a class body
#: is named so.
STATE_FIELDS_KEY: Final = "@fields"


def _int_keyed_mapping(type_: Any) -> bool:
    # A mapping type whose keys are declared int (``dict[int, X]``, ``Mapping[int, X]``).
    origin = typing.get_origin(type_)
    args = typing.get_args(type_)
    return (
        isinstance(origin, type)
        and issubclass(origin, Mapping)
        and len(args) == 2
        and args[0] is int
    )


def _int_key_text(key: Any, _type: Any = None) -> Any:
    # What JSON would write for an int key (int.__repr__: an IntEnum or a bool gives its
    # number); anything else is left for the encoder to refuse. (Called with the key only;
    # the second parameter is what cattrs' signature for key handlers allows.)
    return int.__repr__(key) if isinstance(key, int) else key


@final
@attrs.frozen
class EventShape:
    """An event as an upcaster returns it: a type name, data, and that data's schema version.

    An upcaster that renames a type, or splits one event in two, returns `EventShape` values;
    one that only changes the data returns the new data (the same type, one version on).

    Attributes:
        type: the event type name.
        data: the event data (JSON values).
        version: the schema version *data* is in (default 1).

    .. versionadded:: 0.3
    """

    type: str
    data: Mapping[str, Any]
    version: int = 1


#: What an upcaster returns: new data (same type, next version), one shape, or several.
UpcastResult = Mapping[str, Any] | EventShape | Sequence[EventShape]
Upcaster = Callable[[dict[str, Any]], UpcastResult]
StateUpcaster = Callable[[dict[str, Any]], Mapping[str, Any]]


@final
@attrs.frozen
class StateType:
    """A registered state class: its name, schema version and snapshot interval (internal)."""

    cls: type[Any]
    name: str
    version: int
    snapshot_every: int | None


def fields_fingerprint(cls: type[Any]) -> str:
    """A fingerprint of attrs class *cls*'s fields: their names and declared types.

    Nested attrs classes count by their own fields (not by name: moving or renaming a class
    changes nothing stored), and so do the attrs classes inside generic types (``list[Item]``,
    ``Item | None``). Other types count by their qualified name (``int``, ``Decimal``,
    ``Colour``), unions in any order and spelling (``int | None``, ``Optional[int]``) alike.
    The order of the fields does not count. An annotation that does not resolve (a name
    defined only in a function, or under ``TYPE_CHECKING``) counts by its text.
    """
    return hashlib.sha256(_describe(cls, ()).encode()).hexdigest()[:16]


def _describe(annotation: object, within: tuple[type[Any], ...]) -> str:
    # A canonical text for a type: what fields_fingerprint hashes.
    if annotation is None or annotation is type(None):
        return "None"
    if isinstance(annotation, str):
        return "".join(annotation.split())  # unresolved: its text, without spaces
    if isinstance(annotation, type) and attrs.has(annotation):
        if annotation in within:
            return f"^{annotation.__qualname__}"  # a class that holds itself
        try:
            hints = typing.get_type_hints(annotation)
        except Exception:
            hints = {}  # some annotation does not resolve here: each counts by its text
        inner = (*within, annotation)
        fields = sorted(attrs.fields(annotation), key=lambda field: field.name)
        return (
            "{"
            + ",".join(f"{f.name}:{_describe(hints.get(f.name, f.type), inner)}" for f in fields)
            + "}"
        )
    origin = typing.get_origin(annotation)
    if origin is not None:
        args = typing.get_args(annotation)
        if origin is typing.Union or origin is types.UnionType:
            return "Union[" + ",".join(sorted(_describe(a, within) for a in args)) + "]"
        if origin is typing.Literal:
            return "Literal[" + ",".join(repr(a) for a in args) + "]"
        return _describe(origin, within) + "[" + ",".join(_describe(a, within) for a in args) + "]"
    name = getattr(annotation, "__qualname__", None)
    return name if isinstance(name, str) else repr(annotation)


@final
@attrs.frozen
class PersonalSpec:
    """What a registered event class declares about personal data (internal): the field
    holding the subject's id, and the personal fields."""

    subject: str
    personal: tuple[str, ...]


def _personal_spec(
    cls: type[Any], name: str, subject: object, personal: object
) -> PersonalSpec | None:
    # The declaration checked against the class's fields.
    owner = f"event type {name!r} ({cls.__qualname__})"
    try:
        fields = check_personal_names(personal, owner=f"{owner}: personal")
    except InvalidArgument as exc:
        raise ConfigurationError(str(exc)) from None
    by_name = {field.name: field for field in attrs.fields(cls)}
    if subject is not None and (not isinstance(subject, str) or subject not in by_name):
        raise ConfigurationError(
            f"{owner}: subject={subject!r} must name the field that holds the subject's id "
            f"(one of {sorted(by_name)!r})"
        )
    if fields and subject is None:
        raise ConfigurationError(
            f"{owner}: personal fields {list(fields)!r} need subject='<field>', the field "
            "holding the id of the person they are about"
        )
    for field in fields:
        if field not in by_name:
            raise ConfigurationError(
                f"{owner}: personal field {field!r} is not a field of the class "
                f"(its fields: {sorted(by_name)!r})"
            )
        if field == subject:
            raise ConfigurationError(
                f"{owner}: {field!r} is the subject field, which is stored in plain text; it "
                "cannot be personal too (use an id, not personal data, as the subject)"
            )
        if by_name[field].default is attrs.NOTHING:
            raise ConfigurationError(
                f'{owner}: personal field {field!r} needs a default (e.g. None or ""): '
                "once its subject is forgotten the field reads back absent, and the "
                "decoded object gets the default"
            )
    return None if subject is None else PersonalSpec(str(subject), fields)


def _check_version(owner: str, version: object) -> int:
    if type(version) is not int or version < 1:
        raise ConfigurationError(f"{owner}: version must be an int >= 1, got {version!r}")
    return version


@final
class EventRegistry:
    """Maps stable event type names to attrs classes, both ways, and old shapes to new ones.

    The type name is what is stored, so renaming or moving a class never changes stored
    data; renaming the *type name* or changing the fields does, and is what upcasters are
    for (`upcaster`). Fields must hold JSON values (``str``, ``int``, ``float``, ``bool``,
    ``None``, lists, dicts); data is stored with `attrs.asdict` and decoded with
    ``cls(**data)``.

    The registry also holds the state classes of `StateCommand` (`state`).

    Example::

        registry = EventRegistry()

        @registry.register("MoneyDeposited")
        @attrs.frozen
        class MoneyDeposited:
            account: str
            amount: int

    .. versionadded:: 0.1
    """

    def __init__(self) -> None:
        self._by_name: dict[str, type[Any]] = {}
        self._by_class: dict[type[Any], str] = {}
        self._versions: dict[str, int] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        # Classes that declared a subject or personal fields.
        self._personal: dict[type[Any], PersonalSpec] = {}
        self._states_by_class: dict[type[Any], StateType] = {}
        self._state_names: set[str] = set()
        self._state_upcasters: dict[tuple[str, int], StateUpcaster] = {}
        # Each state class's fields_fingerprint, computed on first use: by then the module that
        # defines it has been imported whole, so its annotations resolve.
        self._state_fields: dict[type[Any], str] = {}
        # Extra keys mean the fields changed without a new state version: not this shape.
        self._converter = cattrs.Converter(forbid_extra_keys=True)
        # Snapshots are JSON, whose object keys are strings, and keys that are not are
        # refused (encode_json_object). A mapping declared with int keys is unstructured with
        # the keys' decimal text, which structuring turns back into the same ints.
        self._converter.register_unstructure_hook_factory(
            _int_keyed_mapping,
            lambda type_: make_mapping_unstructure_fn(
                type_, self._converter, unstructure_to=dict, key_handler=_int_key_text
            ),
        )

    def register(
        self,
        name: str,
        *,
        version: int = 1,
        subject: str | None = None,
        personal: Iterable[str] = (),
    ) -> Callable[[type[T]], type[T]]:
        """Register an attrs class under *name* (a class decorator).

        Args:
            name: the stored type name.
            version: the schema version of the class's fields (default 1). Raise it when
                the fields change, and register an `upcaster` from the previous version;
                events are written with it in their metadata (``event_version``, only
                when above 1).
            subject: the field holding the id of the data subject the event is about
                (`NewEvent.subject`); `new_event` reads it from the object.
            personal: the fields that are personal data of that subject
                (`NewEvent.personal`): sealed when stored, absent once the subject is
                forgotten. Each needs a default, which is what `decode` gives the object
                of a forgotten event.

        Raises:
            ConfigurationError: the class is not an attrs class, the name or the class is
                already registered, an upcaster claims this version or a later one, or
                *subject* or *personal* do not name fields as said above.

        .. versionchanged:: 0.3
            *version*.
        .. versionchanged:: 0.4
            *subject* and *personal*.
        """
        check_identifier("event type", name, max_length=MAX_EVENT_TYPE_LENGTH)
        _check_version(f"event type {name!r}", version)

        def decorate(cls: type[T]) -> type[T]:
            candidate: type[Any] = cls
            if not attrs.has(candidate):
                raise ConfigurationError(
                    f"{cls.__qualname__} is not an attrs class; decorate it with @attrs.frozen "
                    f"before registering it as {name!r}"
                )
            if name in self._by_name:
                raise ConfigurationError(
                    f"event type {name!r} is already registered to "
                    f"{self._by_name[name].__qualname__}"
                )
            if cls in self._by_class:
                raise ConfigurationError(
                    f"{cls.__qualname__} is already registered as {self._by_class[cls]!r}"
                )
            for up_name, up_version in self._upcasters:
                if up_name == name and up_version >= version:
                    raise ConfigurationError(
                        f"an upcaster reads {name!r} version {up_version}, but the class is "
                        f"registered at version {version}; upcasters lead to the current "
                        "version, so register the class with a higher version"
                    )
            spec = _personal_spec(candidate, name, subject, personal)
            if spec is not None:
                self._personal[cls] = spec
            self._by_name[name] = cls
            self._by_class[cls] = name
            self._versions[name] = version
            return cls

        return decorate

    def upcaster(self, name: str, *, version: int = 1) -> Callable[[Upcaster], Upcaster]:
        """Register a function that reads the stored shape (*name*, *version*) (a decorator).

        The function gets a copy of the data and returns one of:

        - new data: the same type, at ``version + 1``;
        - an `EventShape`: another type name (a renamed event) and its version;
        - a sequence of `EventShape`: one event split into several, in order (or none, for
          an event that no longer means anything).

        Shapes are upcast again until each is a registered class at its registered version,
        so chains (1 → 2 → 3, or a rename followed by a field change) compose. An event
        with no way to a registered class raises `EventDecodeError` where it is decoded (a
        projector's ``on_error`` gets it).

        Example::

            @registry.upcaster("MoneyDeposited", version=1)
            def renamed_from(data):
                data["source"] = data.pop("from")
                return data

        Raises:
            ConfigurationError: there already is an upcaster for this shape, or *name* is
                registered at *version* or below (its current shape needs no upcaster).

        .. versionadded:: 0.3
        """
        check_identifier("event type", name, max_length=MAX_EVENT_TYPE_LENGTH)
        _check_version(f"upcaster for {name!r}", version)

        def decorate(function: Upcaster) -> Upcaster:
            if not callable(function):
                raise ConfigurationError(f"an upcaster must be callable, got {function!r}")
            if (name, version) in self._upcasters:
                raise ConfigurationError(
                    f"there already is an upcaster for {name!r} version {version}"
                )
            current = self._versions.get(name)
            if current is not None and version >= current:
                raise ConfigurationError(
                    f"{name!r} is registered at version {current}; an upcaster reads an "
                    f"older version (1 to {current - 1}), not {version}"
                )
            self._upcasters[(name, version)] = function
            return function

        return decorate

    @property
    def names(self) -> frozenset[str]:
        """Every registered type name."""
        return frozenset(self._by_name)

    def name_of(self, event: object) -> str:
        """The registered type name of *event*'s class.

        Raises:
            InvalidArgument: its class is not registered.
        """
        name = self._by_class.get(type(event))
        if name is None:
            raise InvalidArgument(
                f"{type(event).__qualname__} is not a registered event class; register it "
                "with @registry.register('TypeName')"
            )
        return name

    def new_event(
        self,
        event: object,
        *,
        metadata: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
    ) -> NewEvent:
        """Encode a registered event object as a `NewEvent` (with *tags*, for queries).

        A class registered with *subject* and *personal* gives an event with that subject
        (read from the object) and those personal fields.

        Raises:
            InvalidArgument: the class is not registered, or its subject field does not
                hold a valid subject id.

        .. versionchanged:: 0.4
           *tags*; the subject and personal fields the class was registered with.
        """
        if isinstance(event, NewEvent):
            if metadata:
                event = attrs.evolve(event, metadata={**event.metadata, **metadata})
            if tags:
                event = attrs.evolve(event, tags=(*event.tags, *tags))
            return event
        name = self.name_of(event)
        stamped = dict(metadata or {})
        version = self._versions[name]
        if version > 1:
            stamped[EVENT_VERSION] = version
        spec = self._personal.get(type(event))
        return NewEvent(
            name,
            attrs.asdict(event),  # type: ignore[arg-type]  # registered: an attrs instance
            metadata=stamped,
            tags=tuple(tags),
            subject=None if spec is None else getattr(event, spec.subject),
            personal=() if spec is None else spec.personal,
        )

    def decode(self, event: RecordedEvent) -> Any:
        """Decode a recorded event into its registered class, upcasting an older shape.

        Raises:
            EventDecodeError: the type is not registered and no upcaster reads it, the data
                does not fit the class, or the event upcasts into several events (use
                `decode_all`).
        """
        decoded = self.decode_all(event)
        if len(decoded) != 1:
            raise EventDecodeError(
                f"event at {event.position} ({event.type!r}) upcasts into {len(decoded)} "
                "events; read it with registry.decode_all()",
                position=event.position,
            )
        return decoded[0]

    def decode_all(self, event: RecordedEvent) -> tuple[Any, ...]:
        """Decode a recorded event into the registered objects it stands for today.

        One object, unless an upcaster split the event (several) or retired it (none).

        Raises:
            EventDecodeError: as `decode`, except that any number of objects is fine.

        .. versionadded:: 0.3
        """
        version = event.metadata.get(EVENT_VERSION, 1)
        cls = self._by_name.get(event.type)
        if cls is not None and version == self._versions[event.type]:
            return (self._instantiate(cls, event.data, event),)
        if type(version) is not int or version < 1:
            raise EventDecodeError(
                f"event at {event.position} has {EVENT_VERSION}={version!r} in its metadata; "
                "it must be an int >= 1",
                position=event.position,
            )
        return tuple(self._upcast(EventShape(event.type, event.data, version), event))

    def _upcast(self, shape: EventShape, event: RecordedEvent) -> list[Any]:
        pending = [shape]
        decoded: list[Any] = []
        steps = 0
        while pending:
            shape = pending.pop(0)
            cls = self._by_name.get(shape.type)
            if cls is not None and shape.version == self._versions[shape.type]:
                decoded.append(self._instantiate(cls, shape.data, event))
                continue
            function = self._upcasters.get((shape.type, shape.version))
            if function is None:
                raise EventDecodeError(self._no_way(shape, event), position=event.position)
            steps += 1
            if steps > _MAX_UPCASTS:
                raise EventDecodeError(
                    f"event at {event.position}: upcasters did not reach a registered class "
                    f"in {_MAX_UPCASTS} steps; do they form a cycle?",
                    position=event.position,
                )
            try:
                result = function(dict(shape.data))
            except Exception as exc:
                raise EventDecodeError(
                    f"event at {event.position}: the upcaster for {shape.type!r} version "
                    f"{shape.version} raised {type(exc).__name__}{_detail(exc, event)}",
                    position=event.position,
                ) from exc
            pending[0:0] = self._upcast_result(result, shape, event)
        return decoded

    def _no_way(self, shape: EventShape, event: RecordedEvent) -> str:
        current = self._versions.get(shape.type)
        if current is None:
            return (
                f"event type {shape.type!r} at {event.position} is not registered and no "
                f"upcaster reads its version {shape.version}; register a class or an upcaster "
                "for it, or filter it out with event_types"
            )
        return (
            f"event at {event.position}: {shape.type!r} is registered at version {current}, "
            f"but this data is version {shape.version} and no upcaster reads it; register "
            f"@registry.upcaster({shape.type!r}, version={shape.version})"
        )

    @staticmethod
    def _upcast_result(result: object, shape: EventShape, event: RecordedEvent) -> list[EventShape]:
        if isinstance(result, EventShape):
            return [result]
        if isinstance(result, Mapping):
            return [EventShape(shape.type, result, shape.version + 1)]
        if isinstance(result, Sequence) and all(isinstance(r, EventShape) for r in result):
            return list(result)
        raise EventDecodeError(
            f"event at {event.position}: the upcaster for {shape.type!r} version "
            f"{shape.version} returned {type(result).__name__}; return the new data, an "
            "EventShape or a list of EventShape",
            position=event.position,
        )

    @staticmethod
    def _instantiate(cls: type[Any], data: Mapping[str, Any], event: RecordedEvent) -> Any:
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            advice = (
                f"; its personal fields {list(event.forgotten)!r} were forgotten: declare "
                "them personal, with defaults, in @registry.register(..., personal=[...])"
                if event.forgotten
                else ""
            )
            raise EventDecodeError(
                f"event at {event.position} does not fit {cls.__qualname__} "
                f"({type(exc).__name__}{_detail(exc, event)}){advice}",
                position=event.position,
            ) from exc

    # States ---------------------------------------------------------------------------

    def state(
        self, name: str, *, version: int = 1, snapshot_every: int | None = None
    ) -> Callable[[type[T]], type[T]]:
        """Register the state class of one stream, for `StateCommand` (a class decorator).

        The class is an attrs class whose fields all have defaults (``cls()`` is the state
        before any event) with a pure method ``evolve(self, event) -> Self`` that takes the
        stream's typed events. `execute` keeps folded states in a `StateCache` and, when
        *snapshot_every* is set, in snapshots.

        Args:
            name: the stable name snapshots and caches are keyed by.
            version: the schema version of the fields. Raise it when they change, or when
                ``evolve`` folds events into them differently: snapshots of an older version
                are then ignored (or upcast by `state_upcaster`). A snapshot of the same
                version taken with other fields (names or types; forgot to raise it) is
                not used either, and a warning says to raise it.
            snapshot_every: take a snapshot when a command has folded this many events
                since the last one (None: never; `take_snapshot` still takes one).

        Raises:
            ConfigurationError: not an attrs class, a field without a default, no
                ``evolve``, a bad *version* or *snapshot_every*, or a name or class
                already registered.

        .. versionadded:: 0.3
        """
        check_identifier("state", name, max_length=MAX_EVENT_TYPE_LENGTH)
        _check_version(f"state {name!r}", version)
        if snapshot_every is not None and (type(snapshot_every) is not int or snapshot_every < 1):
            raise ConfigurationError(
                f"state {name!r}: snapshot_every must be an int >= 1 or None, got "
                f"{snapshot_every!r}"
            )

        def decorate(cls: type[T]) -> type[T]:
            candidate: type[Any] = cls
            if not attrs.has(candidate):
                raise ConfigurationError(
                    f"{cls.__qualname__} is not an attrs class; decorate it with @attrs.frozen "
                    f"before registering it as state {name!r}"
                )
            if not callable(getattr(cls, "evolve", None)):
                raise ConfigurationError(
                    f"state {cls.__qualname__} needs a method evolve(self, event) returning "
                    "the next state"
                )
            try:
                cls()
            except TypeError as exc:
                raise ConfigurationError(
                    f"state {cls.__qualname__}: {cls.__qualname__}() must be the state before "
                    f"any event, so give every field a default ({exc})"
                ) from exc
            if name in self._state_names or cls in self._states_by_class:
                raise ConfigurationError(f"state {name!r} or its class is already registered")
            self._states_by_class[cls] = StateType(cls, name, version, snapshot_every)
            self._state_names.add(name)
            return cls

        return decorate

    def state_upcaster(
        self, name: str, *, version: int
    ) -> Callable[[StateUpcaster], StateUpcaster]:
        """Register a function from a snapshot's data at *version* to the next version.

        Without one, a snapshot of an older state version is ignored and the stream is
        folded from its events.

        .. versionadded:: 0.3
        """
        _check_version(f"state upcaster for {name!r}", version)

        def decorate(function: StateUpcaster) -> StateUpcaster:
            if (name, version) in self._state_upcasters:
                raise ConfigurationError(
                    f"there already is a state upcaster for {name!r} version {version}"
                )
            self._state_upcasters[(name, version)] = function
            return function

        return decorate

    def state_type(self, cls: object) -> StateType:
        """The registration of state class *cls* (internal).

        Raises:
            InvalidArgument: it is not a registered state class.
        """
        found = self._states_by_class.get(cls) if isinstance(cls, type) else None
        if found is None:
            raise InvalidArgument(
                f"{cls!r} is not a registered state class; register it with @registry.state('Name')"
            )
        return found

    def state_fields(self, kind: StateType) -> str:
        """The fingerprint of *kind*'s fields (`fields_fingerprint`; internal)."""
        found = self._state_fields.get(kind.cls)
        if found is None:
            found = self._state_fields[kind.cls] = fields_fingerprint(kind.cls)
        return found

    def encode_state(self, kind: StateType, state: object) -> dict[str, Any]:
        """A state as JSON values, for a snapshot, with its fields' fingerprint (internal)."""
        data = self._converter.unstructure(state)
        if not isinstance(data, dict):
            raise InvalidArgument(f"state {type(state).__qualname__} did not encode to a dict")
        data[STATE_FIELDS_KEY] = self.state_fields(kind)
        return data

    def decode_state(self, kind: StateType, data: Mapping[str, Any], version: int) -> Any:
        """A snapshot's state, upcast to *kind*'s version; None when that is impossible.

        The fingerprint is not checked here (see `_states._other_fields`); upcasters never
        see it.
        """
        current = dict(data)
        current.pop(STATE_FIELDS_KEY, None)
        while version < kind.version:
            function = self._state_upcasters.get((kind.name, version))
            if function is None:
                return None
            try:
                current = dict(function(current))
            except Exception:
                return None
            version += 1
        if version != kind.version:
            return None
        try:
            return self._converter.structure(current, kind.cls)
        except Exception:
            # A snapshot is a cache: one that no longer fits is folded from events instead.
            return None


def _detail(exc: BaseException, event: RecordedEvent) -> str:
    # An error's text may quote a value it was given (a validator's "'ada@x.org' doesn't
    # match"), and these messages are stored in plain text (dead letters, a projection's
    # last error) and logged: for an event with personal fields, only the error's type.
    if event.personal:
        return " (its text is left out: the event has personal fields)"
    return f": {exc}"
