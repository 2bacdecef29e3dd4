"""Check that the built API reference documents every public method, inherited ones too.

    uv run --group docs mkdocs build --strict && uv run python tools/check_reference.py site

A method that a public class inherits from a private base (``OneStreamAppend.append``,
``ReadEventsBase.read_events``) is part of that class's API, so the reference must show it
under the class. Exits 1 listing what is missing.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

PUBLIC_MODULES = [
    "eventcore_trio",
    "eventcore_trio.memory",
    "eventcore_trio.commands",
    "eventcore_trio.postgres",
    "eventcore_trio.projection",
    "eventcore_trio.testing",
    "eventcore_trio.torture",
    "eventcore_trio.demo",
]


def expected_anchors() -> set[str]:
    """``module.Class.method`` for each public method of each exported class, wherever in
    the package the method is defined."""
    anchors = set()
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            cls = getattr(module, name)
            if not inspect.isclass(cls) or issubclass(cls, BaseException):
                continue
            if cls.__module__ != module_name:
                continue  # documented where it reports its home
            for attr in dir(cls):
                if attr.startswith("_"):
                    continue
                owner = next((base for base in cls.__mro__ if attr in vars(base)), None)
                if owner is None or not owner.__module__.startswith("eventcore_trio"):
                    continue
                value = vars(owner)[attr]
                if callable(value) or isinstance(value, property):
                    anchors.add(f"{module_name}.{name}.{attr}")
    return anchors


def main(site: str) -> int:
    html = (Path(site) / "reference" / "index.html").read_text()
    missing = sorted(anchor for anchor in expected_anchors() if f'id="{anchor}"' not in html)
    for anchor in missing:
        print(f"not in the API reference: {anchor}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "site"))
