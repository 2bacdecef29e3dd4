"""Tests of the public surface: every public name is exported once, documented and public."""

from __future__ import annotations

import ast
import datetime as dt
import importlib
import inspect
import pkgutil
import subprocess
import sys
import typing
import uuid
from pathlib import Path

import cattrs
import pytest

import eventcore_trio

PUBLIC_MODULES = [
    "eventcore_trio",
    "eventcore_trio.memory",
    "eventcore_trio.commands",
    "eventcore_trio.demo",
    "eventcore_trio.postgres",
    "eventcore_trio.projection",
    "eventcore_trio.testing",
    "eventcore_trio.torture",
]
PACKAGE_DIR = Path(eventcore_trio.__file__).parent


def _public_objects() -> list[tuple[str, str, object]]:
    found = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            found.append((module_name, name, getattr(module, name)))
    return found


class TestExports:
    """The public namespaces."""

    @pytest.mark.parametrize(("module", "name", "obj"), _public_objects())
    def test_public_object_has_docstring_and_public_module(
        self, module: str, name: str, obj: object
    ) -> None:
        """Every exported class and function has a docstring and a public __module__."""
        if not (inspect.isclass(obj) or callable(obj)):
            return
        assert inspect.getdoc(obj), f"{module}.{name} has no docstring"
        owner = getattr(obj, "__module__", "")
        assert not any(part.startswith("_") for part in owner.split(".")), owner

    def test_each_name_is_defined_in_exactly_one_public_home(self) -> None:
        """A class or function reports one public module, and that module exports it."""
        for module_name, name, obj in _public_objects():
            if inspect.isclass(obj) or inspect.isfunction(obj):
                home = importlib.import_module(obj.__module__)
                assert getattr(home, name, None) is obj, (module_name, name, obj.__module__)

    def test_public_classes_type_hints_resolve(self) -> None:
        """Annotations of exported classes resolve although the classes report a public
        module whose globals lack the names they use (``uuid``, ``Mapping``): what
        ``typing.get_type_hints``, attrs and cattrs need."""
        failures = []
        for module_name, name, obj in _public_objects():
            if inspect.isclass(obj):
                try:
                    typing.get_type_hints(obj)
                except NameError as exc:
                    failures.append(f"{module_name}.{name}: {exc}")
        assert failures == []

    def test_cattrs_unstructures_events(self) -> None:
        """cattrs (which typed events use) handles the event values."""
        event_id = uuid.UUID(int=7)
        new = eventcore_trio.NewEvent("Deposited", {"amount": 1}, event_id=event_id)
        assert cattrs.unstructure(new)["event_id"] == event_id
        recorded = eventcore_trio.RecordedEvent(
            event_id=event_id,
            stream_id="s",
            stream_version=1,
            position=eventcore_trio.Position(1, 1),
            type="Deposited",
            data={"amount": 1},
            metadata={},
            recorded_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        )
        assert cattrs.unstructure(recorded)["data"] == {"amount": 1}

    @pytest.mark.parametrize(("module", "name", "obj"), _public_objects())
    def test_public_methods_have_docstrings(self, module: str, name: str, obj: object) -> None:
        """Every public method of an exported class is documented."""
        if not inspect.isclass(obj) or issubclass(obj, BaseException):
            return
        for attr, value in vars(obj).items():
            if attr.startswith(("_", "test_")):
                continue
            if callable(value) or isinstance(value, property):
                assert inspect.getdoc(value), f"{module}.{name}.{attr} has no docstring"

    def test_errors_form_one_tree(self) -> None:
        """Every exported exception derives from EventCoreError.

        Except the demo bank's own domain error: it belongs to the application it models.
        """
        for module, name, obj in _public_objects():
            if module == "eventcore_trio.demo":
                continue
            if inspect.isclass(obj) and issubclass(obj, BaseException):
                assert issubclass(obj, eventcore_trio.EventCoreError), name


def _imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    # The package that relative imports start from: the module's own package.
    package = parts[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _modules() -> list[Path]:
    return sorted(PACKAGE_DIR.rglob("*.py"))


class TestLayers:
    """Dependencies point one way, and asyncio stays in the bridge."""

    ASYNCIO_MODULES = ("asyncio", "asyncpg", "trio_asyncio")

    @pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
    def test_asyncio_only_in_the_bridge(self, path: Path) -> None:
        """Only postgres/_bridge.py imports asyncio, asyncpg or trio_asyncio."""
        if path.relative_to(PACKAGE_DIR).as_posix() == "postgres/_bridge.py":
            return
        for name in _imports_of(path):
            assert name.split(".")[0] not in self.ASYNCIO_MODULES, (path, name)

    @pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
    def test_backends_never_import_projection_or_each_other(self, path: Path) -> None:
        """memory/ and postgres/ import only the core, never projection/ or another backend."""
        relative = path.relative_to(PACKAGE_DIR).parts
        if relative[0] not in ("memory", "postgres"):
            return
        forbidden = {
            "projection",
            "testing",
            "torture",
            "cli",
            *({"memory", "postgres"} - {relative[0]}),
        }
        for name in _imports_of(path):
            parts = name.split(".")
            if parts[0] == "eventcore_trio" and len(parts) > 1:
                assert parts[1] not in forbidden, (path, name)

    @pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
    def test_projection_never_imports_a_backend(self, path: Path) -> None:
        """projection/ and commands/ depend on the protocols only, never on a backend."""
        if path.relative_to(PACKAGE_DIR).parts[0] not in ("projection", "commands"):
            return
        for name in _imports_of(path):
            parts = name.split(".")
            if parts[0] == "eventcore_trio" and len(parts) > 1:
                assert parts[1] not in {"memory", "postgres", "testing", "torture", "cli"}, (
                    path,
                    name,
                )

    def test_pipeline_is_pure(self) -> None:
        """The pipeline imports no trio, no database driver and no clock."""
        names = {n.split(".")[0] for n in _imports_of(PACKAGE_DIR / "projection/_pipeline.py")}
        assert not names & {"trio", "asyncpg", "asyncio", "time", "datetime", "trio_asyncio"}

    def test_every_module_imports(self) -> None:
        """Every module of the package imports cleanly."""
        for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="eventcore_trio."):
            importlib.import_module(info.name)


class TestLazyPostgres:
    """The package root imports the PostgreSQL backend only when it is used."""

    @staticmethod
    def _run(code: str) -> str:
        # A fresh interpreter: this one imported the backend long ago.
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    def test_the_memory_store_alone_loads_no_asyncio(self) -> None:
        """`import eventcore_trio` (and the in-memory store) load neither asyncpg, asyncio
        nor trio-asyncio."""
        loaded = self._run(
            "import sys, eventcore_trio; eventcore_trio.open_memory_store; "
            "print(sorted(m for m in ('asyncpg', 'asyncio', 'trio_asyncio') if m in sys.modules))"
        )
        assert loaded == "[]"

    def test_postgres_names_resolve_on_first_use(self) -> None:
        """`open_postgres_store` and the `postgres` subpackage are reachable from the root
        as before (`eventcore_trio.postgres.runtime_grants`, as the docs write it), and
        `dir()` lists them."""
        out = self._run(
            "import eventcore_trio as e; "
            "print(e.open_postgres_store.__module__, callable(e.postgres.runtime_grants), "
            "'open_postgres_store' in dir(e), 'postgres' in dir(e))"
        )
        assert out == "eventcore_trio.postgres True True True"

    def test_an_unknown_name_is_an_attribute_error(self) -> None:
        """The lazy lookup does not swallow typos."""
        with pytest.raises(AttributeError, match="open_memroy_store"):
            eventcore_trio.open_memroy_store  # type: ignore[attr-defined]  # noqa: B018
