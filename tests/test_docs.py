"""Every Python example in the README and docs/ runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import oldest_server_param

ROOT = Path(__file__).parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
#: Examples that need more than a PostgreSQL server start with this and are run by the test
#: named in their first line instead (for example through a real PgBouncer).
ELSEWHERE = "# Run by tests/"
#: A file of a package the tutorial builds (``# myapp/deploy.py``): it imports its siblings,
#: so tests/test_tutorial.py writes it into that package and runs it there.
PACKAGE_FILE = re.compile(r"# \w+/[\w/]+\.py\n")


def _examples() -> list[tuple[str, str]]:
    found = []
    for document in DOCUMENTS:
        for number, match in enumerate(BLOCK.finditer(document.read_text()), start=1):
            if not match[1].startswith(ELSEWHERE) and not PACKAGE_FILE.match(match[1]):
                found.append((f"{document.relative_to(ROOT)}#{number}", match[1]))
    return found


def _torture(code: str) -> bool:
    # A torture run's faults are processes, sessions and networks, alike on every server
    # version (tests/postgres/test_torture.py), and it takes seconds: on one server.
    return "run_torture(" in code


EVERYWHERE = [(where, code) for where, code in _examples() if not _torture(code)]
ON_ONE_SERVER = [(where, code) for where, code in _examples() if _torture(code)]


@pytest.mark.parametrize(("where", "code"), EVERYWHERE, ids=[w for w, _ in EVERYWHERE])
def test_example_runs(
    where: str, code: str, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example executes without error (PostgreSQL examples use the test server)."""
    monkeypatch.setenv("EVENTCORE_DSN", postgres_dsn)
    exec(compile(code, where, "exec"), {"__name__": "__docs__"})


@pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
@pytest.mark.parametrize(("where", "code"), ON_ONE_SERVER, ids=[w for w, _ in ON_ONE_SERVER])
def test_torture_example_runs(
    where: str, code: str, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example executes without error, on the oldest server under test."""
    test_example_runs(where, code, postgres_dsn, monkeypatch)


def test_examples_were_found() -> None:
    """The README and the PostgreSQL guide each contribute at least one example."""
    places = {where.split("#")[0] for where, _ in _examples()}
    assert {"README.md", "docs/postgres.md"} <= places


def examples_run_by(test_file: str) -> list[str]:
    """The examples whose first line says *test_file* runs them."""
    return [
        match[1]
        for document in DOCUMENTS
        for match in BLOCK.finditer(document.read_text())
        if match[1].startswith(f"{ELSEWHERE}{test_file.removeprefix('tests/')}")
    ]
