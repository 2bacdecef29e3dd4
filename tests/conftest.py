"""Shared fixtures: the PostgreSQL servers the suite runs against.

With ``EVENTCORE_TEST_DSN`` set, every PostgreSQL test runs against that server. Otherwise the
suite starts its own throwaway servers: the one bundled by pgserver (PostgreSQL 16) and every
system installation it finds (Debian's PostgreSQL 15 on CI), so each test of the backend runs
once per server version.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Generator, Iterator
from contextlib import ExitStack
from pathlib import Path

import _pytest
import pytest

from eventcore_trio._tools._embedded import bundled_bindir, system_bindirs
from eventcore_trio.testing import FAST_SETTINGS, EmbeddedPostgres


def server_params() -> list[str]:
    """The servers under test: ``external``, or ``bundled`` and ``system-N`` (ascending)."""
    if os.environ.get("EVENTCORE_TEST_DSN"):
        return ["external"]
    params = ["bundled"] if bundled_bindir() is not None else []
    params += [f"system-{version}" for version in sorted(system_bindirs())]
    if not params:
        raise RuntimeError(
            "no PostgreSQL to test against: install the dev dependencies (pgserver), a system "
            "PostgreSQL, or set EVENTCORE_TEST_DSN"
        )
    return params


def oldest_server_param() -> str:
    """The one server that long explorations run on: the oldest system PostgreSQL if there
    is one (15 on CI), else the bundled one, or the external DSN."""
    params = server_params()
    systems = [param for param in params if param.startswith("system-")]
    return systems[0] if systems else params[0]


@pytest.fixture(scope="session")
def started_servers() -> Iterator[dict[str, EmbeddedPostgres]]:
    """The servers this process has started, by `server_params` name: each started on first
    use and kept until the session ends."""
    servers: dict[str, EmbeddedPostgres] = {}
    try:
        yield servers
    finally:
        with ExitStack() as stack:
            for server in servers.values():
                stack.callback(server.cleanup)


@pytest.fixture(scope="module", params=server_params())
def postgres_server(
    request: pytest.FixtureRequest, started_servers: dict[str, EmbeddedPostgres]
) -> EmbeddedPostgres | str:
    """A running PostgreSQL: an EmbeddedPostgres the suite owns, or an external DSN.

    Module-scoped over servers that live for the session: a session-scoped parametrized
    fixture is torn down whenever the next test wants the other version, and a worker of
    the suite switched between versions some forty times (a server stopped and another
    initialised and started each time)."""
    name: str = request.param
    if name == "external":
        return os.environ["EVENTCORE_TEST_DSN"]
    server = started_servers.get(name)
    if server is None:
        bindir: Path | None
        if name == "bundled":
            bindir = bundled_bindir()
        else:
            bindir = system_bindirs()[int(name.removeprefix("system-"))]
        server = EmbeddedPostgres(bindir, settings=FAST_SETTINGS)
        server.start()
        started_servers[name] = server
    return server


@pytest.fixture
def postgres_dsn(postgres_server: EmbeddedPostgres | str) -> str:
    """The DSN of the PostgreSQL server under test."""
    return postgres_server if isinstance(postgres_server, str) else postgres_server.dsn


#: The modules that keep a worker busiest (from half a minute to four minutes each), longest
#: first. They start first and the many short modules even out the end, so that both workers
#: finish together; pytest-xdist's own order (the most tests first, pyproject.toml turns it
#: off) started a two-minute module of 14 tests among the last.
LONGEST_MODULES = (
    "postgres/test_pgbouncer.py",
    "postgres/test_interleavings.py",
    "test_cli.py",
    "postgres/test_contract.py",
    "postgres/test_network.py",
    "postgres/test_store.py",
    "postgres/test_torture.py",
    "postgres/test_runtime_role.py",
    "postgres/test_interleavings_dcb.py",
    "postgres/test_versions_processes.py",
    "test_pytest_plugin.py",
)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The `LONGEST_MODULES` first, in that order; every other test keeps its place."""
    here = Path(__file__).parent
    rank = {here / name: n for n, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path, len(rank)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A skip in a Trio test or fixture reports its reason and where it was called.

    pytest-trio (0.8) turns a group holding one skip into a bare ``pytest.skip()`` of its own,
    so the summary said ``_pytest/python.py:187: Skipped``; the original is that skip's
    context."""
    report = yield
    skipped = call.excinfo.value if call.excinfo is not None else None
    group = skipped.__context__ if isinstance(skipped, pytest.skip.Exception) else None
    if report.skipped and isinstance(group, BaseExceptionGroup):
        leaves = _leaves(group)
        if len(leaves) == 1 and isinstance(leaves[0], pytest.skip.Exception):
            # The innermost frame outside pytest: where the test or fixture called skip().
            inside = os.path.dirname(_pytest.__file__)
            frames = [
                frame
                for frame in traceback.extract_tb(leaves[0].__traceback__)
                if not frame.filename.startswith(inside)
            ]
            if frames:
                report.longrepr = (frames[-1].filename, frames[-1].lineno or 0, str(leaves[0]))
    return report


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    return [
        leaf
        for exc in group.exceptions
        for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]
