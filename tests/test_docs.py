"""Every Python example in the README and docs/ runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _examples() -> list[tuple[str, str]]:
    found = []
    for document in DOCUMENTS:
        for number, match in enumerate(BLOCK.finditer(document.read_text()), start=1):
            found.append((f"{document.relative_to(ROOT)}#{number}", match[1]))
    return found


@pytest.mark.parametrize(("where", "code"), _examples(), ids=[w for w, _ in _examples()])
def test_example_runs(
    where: str, code: str, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example executes without error (PostgreSQL examples use the test server)."""
    monkeypatch.setenv("EVENTCORE_DSN", postgres_dsn)
    exec(compile(code, where, "exec"), {"__name__": "__docs__"})


def test_examples_were_found() -> None:
    """The README and the PostgreSQL guide each contribute at least one example."""
    places = {where.split("#")[0] for where, _ in _examples()}
    assert {"README.md", "docs/postgres.md"} <= places
