"""Small helpers used across the package: public namespaces' module metadata, and
structured concurrency shared by the backends, the projection layer and the commands."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeVar, TypeVarTuple, get_type_hints

import attrs
import trio


def _is_private_module(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "eventcore_trio" and any(part.startswith("_") for part in parts)


def _public_home(module: str) -> str:
    """The public package a private module belongs to: ``eventcore_trio._snapshots`` and
    ``eventcore_trio._tools._embedded`` belong to ``eventcore_trio``,
    ``eventcore_trio.commands._states`` to ``eventcore_trio.commands``."""
    parts = module.split(".")
    for index, part in enumerate(parts):
        if part.startswith("_"):
            return ".".join(parts[:index])
    return module


def _resolve_annotations(cls: type) -> None:
    # Annotations are strings (postponed evaluation), which typing.get_type_hints, attrs'
    # resolve_types and cattrs evaluate in the globals of the module the class reports:
    # once it reports the public one, names such as ``uuid`` or ``Mapping`` are not there.
    # Resolved now, in the module that defines the class, they need no globals later.
    own = inspect.get_annotations(cls)
    if not own:
        return
    try:
        hints = get_type_hints(cls, include_extras=True)
    except (NameError, TypeError, AttributeError):
        return  # a name only type checkers import (TYPE_CHECKING): left as it was
    cls.__annotations__ = {name: hints.get(name, value) for name, value in own.items()}
    if attrs.has(cls):
        attrs.resolve_types(cls)


# Where each public object was defined, recorded before any namespace renames it.
_defined_in: dict[int, str] = {}


def fixup_module_metadata(module_name: str, namespace: dict[str, Any]) -> None:
    """Make public names report the public module they are exported from.

    Tracebacks, reprs, pickles and the API docs then show ``eventcore_trio.Position`` rather
    than ``eventcore_trio._positions.Position`` (the same trick as ``trio._util``). A name
    exported from several namespaces reports the public package its definition belongs to
    when that package exports it (``Snapshot``, defined in the root and re-exported by
    ``commands``, reports ``eventcore_trio``), else the first namespace that exports it.
    """
    seen: set[int] = set()

    def fix_one(qualname: str, name: str, obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        mod = getattr(obj, "__module__", None)
        if not isinstance(mod, str):
            return
        defined_in = _defined_in.setdefault(id(obj), mod)
        if not _is_private_module(mod) and _public_home(defined_in) != module_name:
            return
        if not _is_private_module(defined_in):
            return
        if isinstance(obj, type):
            _resolve_annotations(obj)
        obj.__module__ = module_name
        if isinstance(obj, type):
            obj.__name__ = name
            obj.__qualname__ = qualname
            for attr_name, attr_value in obj.__dict__.items():
                fix_one(f"{qualname}.{attr_name}", attr_name, attr_value)

    for name in namespace.get("__all__", ()):
        # A name imported on first use (the package root's `__getattr__`) fixes itself in
        # the subpackage that defines it.
        if name in namespace:
            fix_one(name, name, namespace[name])


T = TypeVar("T")
Ts = TypeVarTuple("Ts")


@asynccontextmanager
async def background(fn: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    """Run *fn* in a task for the duration of the block, then cancel it.

    A nursery would wrap an exception raised by the block in an ExceptionGroup; since *fn*
    reports through state and never raises on purpose, a group holding a single exception is
    unwrapped so callers see the block's own exception, as with any other context manager.
    """
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fn)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise_single(group)


def raise_single(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Re-raise the only exception inside (nested) single-member groups, else the group.

    For context managers that run tasks only as plumbing: the exception that reaches the
    caller is the one their block raised, not a group of one.
    """
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if exc is group:
        raise group
    raise exc from exc.__cause__


@asynccontextmanager
async def service_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery for background services of a resource, cancelled when the block ends.

    Services report through state and do not raise on purpose, so the block's own exception
    reaches the caller unwrapped (see `background`).
    """
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise_single(group)


async def wait_any(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as any of *waits* returns; the others are cancelled."""
    async with trio.open_nursery() as nursery:

        async def run(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(run, wait)


# (class, protocol) -> whether instances of the class satisfy the protocol.
_CONFORMS: dict[tuple[type, type], bool] = {}


def conforms(value: object, protocol: Any) -> bool:
    """``isinstance(value, protocol)`` for a runtime-checkable protocol, decided once per
    class: Python 3.11 walks every member of the protocol on each such check (18 µs for a
    command that is not a `Command`), which a per-call path pays on every call. Members set
    on an instance rather than its class are not seen after the first check of the class,
    which the protocols checked this way (commands, stores) never rely on."""
    key = (type(value), protocol)
    known = _CONFORMS.get(key)
    if known is None:
        known = _CONFORMS[key] = isinstance(value, protocol)
    return known
