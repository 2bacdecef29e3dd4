"""Prometheus's own ``promtool``, for the tests of /metrics and of the shipped alert rules."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

#: The alert rules the repository ships, and their promtool unit test.
RULES_DIR = Path(__file__).parent.parent.parent / "deploy" / "prometheus"


def promtool() -> str:
    """The path of ``promtool``: skips the test without it, fails it on CI (``CI`` set),
    where .ci/run installs it (Debian's ``prometheus`` package)."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(
                "promtool is not installed; .ci/run installs it (apt-get install prometheus)"
            )
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def check_metrics(text: bytes) -> None:
    """Fail unless ``promtool check metrics`` finds *text* well formed and free of lint."""
    result = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, check=False
    )
    report = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, f"promtool check metrics:\n{report}\n{text.decode()}"
