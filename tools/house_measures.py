"""Print the house measures of issue 30 (docs/architecture.md, "Measures"); never fails.

    uv run python tools/house_measures.py

- private modules at the package root (files ``_*.py`` and private packages ``_*/``);
- package modules over 500 lines (``.py`` only: SQL lives in ``.sql`` files);
- cross-module private reach-ins: ``x._name`` where ``x`` is not ``self``/``cls``, and imports
  of another subpackage's private module;
- ``duplicates`` pairs in the package (when the ``duplicates`` tool is on the PATH);
- the import time of ``import eventcore_trio`` for an in-memory user, and whether it pulled in
  asyncpg, asyncio or trio-asyncio.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "eventcore_trio"

# Private names of the standard library and of attrs that are meant to be used.
ALLOWED_ATTRIBUTES = {"_replace", "_asdict", "_fields", "_exit", "_getframe", "_value_"}
# Private names of other libraries that the bridge uses on purpose, each said where used:
# asyncio's record of a loop's current task, which a crossing joins while it steps its
# coroutine (postgres/_bridge.py, `_Crossing`).
THIRD_PARTY_ALLOWED = {("asyncio.tasks", "_enter_task"), ("asyncio.tasks", "_leave_task")}


def root_private_modules() -> list[str]:
    return sorted(
        path.name
        for path in PACKAGE.iterdir()
        if path.name.startswith("_")
        and not path.name.startswith("__")
        and (path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists()))
    )


def long_modules(limit: int = 500) -> list[tuple[str, int]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        if lines > limit:
            found.append((str(path.relative_to(ROOT)), lines))
    return found


def _absolute(path: Path, level: int, module: str) -> list[str]:
    """The package-relative parts of a relative import's target."""
    here = list(path.relative_to(PACKAGE).with_suffix("").parts)
    base = here[: len(here) - level]
    return base + module.split(".")


def _crosses_into_private(path: Path, target: list[str]) -> bool:
    """An import of another public subpackage's private module (the root's core and the
    private kit packages, ``_tools`` and ``_backend``, are shared by design)."""
    parts = path.relative_to(PACKAGE).parts
    here = parts[0] if len(parts) > 1 else ""
    if len(target) < 2 or target[0].startswith("_") or target[0] == here:
        return False
    return any(part.startswith("_") for part in target[1:])


def _private_names_defined(tree: ast.AST) -> set[str]:
    """The private attribute names a class (or module) defines: methods, class attributes,
    ``self._x``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {name for name in names if name.startswith("_")}


def _accesses(tree: ast.AST) -> list[tuple[ast.Attribute, set[str]]]:
    """Each attribute access with the private names it may use: a class its own (on other
    instances of itself too), a module-level function those of the module's classes."""
    found: list[tuple[ast.Attribute, set[str]]] = []

    def visit(node: ast.AST, own: set[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, own | _private_names_defined(child))
                continue
            if isinstance(child, ast.Attribute):
                found.append((child, own))
            visit(child, own)

    # Module-level functions are the module's own: they may use its classes' privates
    # (`position_parts` beside `Position`); methods only their own class's.
    module_classes: set[str] = set()
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.ClassDef):
            module_classes |= _private_names_defined(child)
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.ClassDef):
            visit(child, _private_names_defined(child))
        elif isinstance(child, ast.Attribute):
            found.append((child, module_classes))
        else:
            visit(child, module_classes)
    return found


def reach_ins() -> list[str]:
    """Uses of a private attribute outside the class that defines it, and imports of another
    subpackage's private module."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        where = str(path.relative_to(ROOT))
        for node, own in _accesses(tree):
            attr = node.attr
            if not attr.startswith("_") or attr.startswith("__") or attr in ALLOWED_ATTRIBUTES:
                continue
            if attr in own:
                continue
            value = node.value
            if (ast.unparse(value), attr) in THIRD_PARTY_ALLOWED:
                continue
            if isinstance(value, ast.Name) and value.id in {"self", "cls"}:
                continue
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "super":
                continue
            found.append(f"{where}:{node.lineno}: .{attr} on {ast.unparse(value)}")
        for statement in ast.walk(tree):
            if isinstance(statement, ast.ImportFrom) and statement.level and statement.module:
                target = _absolute(path, statement.level, statement.module)
                if _crosses_into_private(path, target):
                    found.append(f"{where}:{statement.lineno}: imports {'.'.join(target)}")
                    continue
                for alias in statement.names:
                    # `from ..postgres import _bridge`: a private module by another door.
                    if alias.name.startswith("_") and _crosses_into_private(
                        path, [*target, alias.name]
                    ):
                        source = ".".join(target)
                        found.append(
                            f"{where}:{statement.lineno}: imports {alias.name} from {source}"
                        )
    return found


def duplicate_pairs() -> str:
    """Pairs of repeated code in the package's Python; the SQL migrations restate earlier
    migrations' function bodies on purpose (history is never edited), so they do not count."""
    tool = shutil.which("duplicates")
    if tool is None:
        return "n/a (the duplicates tool is not installed here)"
    out = subprocess.run(
        [tool, "--repo", str(PACKAGE), "--most", "200", "--seconds", "120"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    rows = [line for line in out.splitlines() if line[:1] == "D" and " ~ " in line]
    if not rows:
        return f"n/a ({out.splitlines()[0] if out else 'no output'})"
    python = [row for row in rows if ".sql:" not in row]
    return f"{len(python)} (and {len(rows) - len(python)} between SQL migrations)"


def import_time() -> str:
    code = (
        "import sys, time; t = time.perf_counter(); import eventcore_trio; "
        "ms = (time.perf_counter() - t) * 1000; "
        "heavy = [m for m in ('asyncpg', 'asyncio', 'trio_asyncio') if m in sys.modules]; "
        "print(f'{ms:.0f} ms, loads: ' + (', '.join(heavy) or 'none of them'))"
    )
    best = None
    for _ in range(3):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=False
        )
        line = out.stdout.strip() or out.stderr.strip().splitlines()[-1]
        if best is None or line < best:
            best = line
    return best or "n/a"


def main() -> None:
    modules = root_private_modules()
    print(f"private modules at the package root: {len(modules)} ({', '.join(modules)})")
    long = long_modules()
    print(f"package modules over 500 lines: {len(long)}")
    for where, lines in long:
        print(f"  {where}: {lines}")
    found = reach_ins()
    print(f"private reach-ins (outside the defining class or subpackage): {len(found)}")
    for line in found:
        print(f"  {line}")
    print(f"duplicates pairs in the package: {duplicate_pairs()}")
    print(f"import eventcore_trio: {import_time()}")


if __name__ == "__main__":
    main()
