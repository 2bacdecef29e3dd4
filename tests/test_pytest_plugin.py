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


# The plugin's fixtures, not the server's version, are under test (a session of its own).
@pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
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


def test_fixtures_outside_trio_say_how_to_enable_it(pytester: pytest.Pytester) -> None:
    """Without trio_mode and without the trio mark, a test using the fixtures gets advice,
    not pytest's opaque AssertionError (nor a message about pytest-trio's internals); a
    marked test runs."""
    pytester.makepyfile(
        test_user="""
import pytest
from eventcore_trio import NewEvent

async def test_store(eventcore_memory_store):
    await eventcore_memory_store.append("a", [NewEvent("E", {})])

async def test_store_and_host(eventcore_memory_store, eventcore_host):
    pass

def test_sync_host(eventcore_host):
    pass

@pytest.mark.trio
async def test_marked(eventcore_memory_store, eventcore_host):
    await eventcore_memory_store.append("a", [NewEvent("E", {})])
"""
    )
    result = pytester.runpytest_subprocess("-p", "trio", "-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=3)
    advice = (
        "enable trio_mode = true in your pytest configuration, or mark the test with "
        "@pytest.mark.trio"
    )
    # Once per error in the errors section (the short summary repeats it, untruncated in CI).
    output = result.stdout.str().split("short test summary info")[0]
    assert output.count(advice) == 3
    assert "test_store_and_host uses Trio fixtures (eventcore_host, eventcore_memory_store)" in (
        output
    )
    assert "AssertionError" not in output


def test_a_skip_in_trio_code_reports_its_reason(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A skip inside a Trio test or async fixture shows its reason and where it was called
    in the summary (tests/conftest.py), not pytest-trio's ``python.py:187: Skipped``."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeconftest("from tests.conftest import pytest_runtest_makereport  # noqa: F401\n")
    pytester.makepyfile(
        test_user="""
import pytest

@pytest.fixture
async def missing_tool():
    pytest.skip("needs a tool that is not installed")

async def test_in_a_fixture(missing_tool):
    pass

async def test_in_the_test():
    pytest.skip("not on this server")
"""
    )
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    result = pytester.runpytest_subprocess(
        "-p", "trio", "-rs", "-p", "no:cacheprovider", "--rootdir", str(pytester.path)
    )
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(
        [
            "SKIPPED [[]1[]] test_user.py:5: needs a tool that is not installed",
            "SKIPPED [[]1[]] test_user.py:11: not on this server",
        ]
    )
    assert "python.py" not in result.stdout.str()
