"""Every program in examples/ runs to completion, on the memory store and on PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
@pytest.mark.parametrize("backend", ["memory", "postgres"])
def test_example_runs(example: Path, backend: str, postgres_dsn: str) -> None:
    """The example exits 0 (its own assertions hold)."""
    env = {k: v for k, v in os.environ.items() if k != "EVENTCORE_DSN"}
    if backend == "postgres":
        env["EVENTCORE_DSN"] = postgres_dsn
    result = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_there_are_examples() -> None:
    """The examples folder holds the bank account and the chained projectors."""
    assert {p.name for p in EXAMPLES} >= {"bank_account.py", "chained_projectors.py"}
