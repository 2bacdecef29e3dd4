"""Typed events: attrs classes registered under stable type names."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar, final

import attrs

from ._errors import ConfigurationError, EventDecodeError, InvalidArgument
from ._events import NewEvent, RecordedEvent
from ._validation import MAX_EVENT_TYPE_LENGTH, check_identifier

T = TypeVar("T")


@final
class EventRegistry:
    """Maps stable event type names to attrs classes, both ways.

    The type name is what is stored, so renaming or moving a class never changes stored
    data; renaming the *type name* does, so treat names as part of your schema. Fields must
    hold JSON values (``str``, ``int``, ``float``, ``bool``, ``None``, lists, dicts); data is
    stored with `attrs.asdict` and decoded with ``cls(**data)``.

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

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Register an attrs class under *name* (a class decorator).

        Raises:
            ConfigurationError: the class is not an attrs class, or the name or the class is
                already registered.
        """
        check_identifier("event type", name, max_length=MAX_EVENT_TYPE_LENGTH)

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
            self._by_name[name] = cls
            self._by_class[cls] = name
            return cls

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

    def new_event(self, event: object, *, metadata: Mapping[str, Any] | None = None) -> NewEvent:
        """Encode a registered event object as a `NewEvent`."""
        if isinstance(event, NewEvent):
            if metadata:
                return attrs.evolve(event, metadata={**event.metadata, **metadata})
            return event
        return NewEvent(
            self.name_of(event),
            attrs.asdict(event),  # type: ignore[arg-type]  # registered: an attrs instance
            metadata=dict(metadata or {}),
        )

    def decode(self, event: RecordedEvent) -> Any:
        """Decode a recorded event into its registered class.

        Raises:
            EventDecodeError: the type is not registered, or the data does not fit the class.
        """
        cls = self._by_name.get(event.type)
        if cls is None:
            raise EventDecodeError(
                f"event type {event.type!r} at {event.position} is not registered; register a "
                "class for it, or filter it out with event_types",
                position=event.position,
            )
        try:
            return cls(**event.data)
        except (TypeError, ValueError) as exc:
            raise EventDecodeError(
                f"event at {event.position} does not fit {cls.__qualname__} ({exc})",
                position=event.position,
            ) from exc
