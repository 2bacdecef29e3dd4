"""Small helpers for the package's public namespaces."""

from __future__ import annotations

from typing import Any


def _is_private_module(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "eventcore_trio" and any(part.startswith("_") for part in parts)


def fixup_module_metadata(module_name: str, namespace: dict[str, Any]) -> None:
    """Make public names report the public module they are exported from.

    Tracebacks, reprs, pickles and the API docs then show ``eventcore_trio.Position`` rather
    than ``eventcore_trio._positions.Position`` (the same trick as ``trio._util``).
    """
    seen: set[int] = set()

    def fix_one(qualname: str, name: str, obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        mod = getattr(obj, "__module__", None)
        if not isinstance(mod, str) or not _is_private_module(mod):
            return
        obj.__module__ = module_name
        if isinstance(obj, type):
            obj.__name__ = name
            obj.__qualname__ = qualname
            for attr_name, attr_value in obj.__dict__.items():
                fix_one(f"{qualname}.{attr_name}", attr_name, attr_value)

    for name in namespace.get("__all__", ()):
        fix_one(name, name, namespace[name])
