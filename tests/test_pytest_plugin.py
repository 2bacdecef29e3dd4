"""The pytest plugin, used by a test project of its own (pytester), on both backends."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import oldest_server_param

pytest_plugins = ["pytester"]

ROOT = Path(__file__).parent.parent
#: The example in docs/testing.md is the user's test file.
USER_TESTS = next(
    block
    for block in re.findall(
        r"^```python\n(.*?)^```", (ROOT / "docs" / "testing.md").read_text(), re.M | re.S
    )
    if block.startswith("# Run by tests/test_pytest_plugin.py")
)


def run(pytester: pytest.Pytester) -> pytest.RunResult:
    pytester.makepyfile(test_user=USER_TESTS)
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    # A process of its own: the plugin starts and stops an embedded server for its session.
    return pytester.runpytest_subprocess("-p", "trio", "-q")


def test_fixtures_on_both_backends(
    pytester: pytest.Pytester, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On EVENTCORE_TEST_DSN: the parametrised store runs each test on both backends."""
    monkeypatch.setenv("EVENTCORE_TEST_DSN", postgres_dsn)
    result = run(pytester)
    result.assert_outcomes(passed=6)


def test_an_embedded_server_when_no_dsn_is_given(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without EVENTCORE_TEST_DSN the plugin starts (and cleans up) a server of its own."""
    monkeypatch.delenv("EVENTCORE_TEST_DSN", raising=False)
    result = run(pytester)
    result.assert_outcomes(passed=6)


@pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
def test_the_example_thirty_times(
    pytester: pytest.Pytester, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example, thirty times over in one session (its teardown order once raced the
    store's asyncio loop: 3 failures in 30 runs), passes every time."""
    monkeypatch.setenv("EVENTCORE_TEST_DSN", postgres_dsn)
    pytester.makepyfile(**{f"test_user_{n}": USER_TESTS for n in range(30)})
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    result = pytester.runpytest_subprocess("-p", "trio", "-q")
    result.assert_outcomes(passed=6 * 30)
