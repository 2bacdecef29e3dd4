"""The pytest plugin: fixtures for testing your projectors and commands against real stores.

Installed with the package (entry point ``pytest11``); its fixtures need pytest-trio (the
``testing`` extra) and are all named ``eventcore_*``:

- ``eventcore_memory_store``: a fresh in-memory store per test.
- ``eventcore_postgres_store``: a fresh store per test in a schema of its own (dropped
  afterwards) on ``EVENTCORE_TEST_DSN``, else on a throwaway embedded server started once
  per session (needs the ``embedded`` extra or a local PostgreSQL installation), which only
  this session can reach: ``eventcore_postgres_dsn`` carries its random password.
- ``eventcore_store``: both, one after the other: each test that uses it runs twice.
- ``eventcore_host``: ``await eventcore_host(store, [projectors])`` starts a host
  (`run_projections`) in the test's nursery; it stops when the test ends.

With `wait_caught_up` (``eventcore_trio.testing``) a projector's test is three lines::

    async def test_balances(eventcore_store, eventcore_host):
        await eventcore_host(eventcore_store, [balances])
        await eventcore_store.append("acc-1", [NewEvent("Deposited", {"amount": 5})])
        await wait_caught_up(eventcore_store, [balances])

.. versionadded:: 0.3
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager

import pytest
import trio

from ._protocols import Store
from ._tools._embedded import FAST_SETTINGS, EmbeddedPostgres
from .memory import open_memory_store
from .postgres import open_postgres_store
from .projection import ProjectionConfig, run_projections

#: The environment variable naming an existing server for the PostgreSQL fixtures.
TEST_DSN_VARIABLE = "EVENTCORE_TEST_DSN"

#: The fixtures that only a Trio test can use: pytest-trio runs them in the test's run.
_TRIO_FIXTURES = frozenset(
    {"eventcore_memory_store", "eventcore_postgres_store", "eventcore_store", "eventcore_host"}
)

_TRIO_ADVICE = (
    "enable trio_mode = true in your pytest configuration, or mark the test with @pytest.mark.trio"
)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail a test that uses Trio fixtures but is no Trio test with advice, before pytest's
    own errors for it (an opaque ``AssertionError``, or a message that names pytest-trio's
    internals) can."""
    used = sorted(_TRIO_FIXTURES.intersection(getattr(item, "fixturenames", ())))
    if not used or item.get_closest_marker("trio") is not None:
        return
    if not item.config.pluginmanager.hasplugin("trio"):
        advice = "install pytest-trio (the testing extra: eventcore-trio[testing]), then " + (
            _TRIO_ADVICE
        )
    else:
        advice = _TRIO_ADVICE
    pytest.fail(
        f"{item.name} uses Trio fixtures ({', '.join(used)}), so it must be an `async def` "
        f"test that pytest-trio runs: {advice}",
        pytrace=False,
    )


Host = Callable[..., Awaitable[None]]


class _Server:
    """The session's server: ``EVENTCORE_TEST_DSN``, or an embedded one started on first use
    (so tests of the memory store alone never start one)."""

    def __init__(self) -> None:
        self._embedded: EmbeddedPostgres | None = None

    @property
    def dsn(self) -> str:
        given = os.environ.get(TEST_DSN_VARIABLE)
        if given:
            return given
        if self._embedded is None:
            self._embedded = EmbeddedPostgres(settings=FAST_SETTINGS)
            self._embedded.start()
        return self._embedded.dsn

    def cleanup(self) -> None:
        if self._embedded is not None:
            self._embedded.cleanup()


@pytest.fixture(scope="session")
def _eventcore_server() -> Iterator[_Server]:
    server = _Server()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def eventcore_postgres_dsn(_eventcore_server: _Server) -> str:
    """The DSN the PostgreSQL fixtures use: ``EVENTCORE_TEST_DSN``, else a throwaway
    embedded server, started once per session (the DSN holds its password: give it to a
    child process through the environment, not the command line)."""
    return _eventcore_server.dsn


@asynccontextmanager
async def _postgres_store(dsn: str) -> AsyncIterator[Store]:
    schema = f"test_{uuid.uuid4().hex[:12]}"
    async with open_postgres_store(dsn, schema=schema) as store:
        try:
            yield store
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await store.admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
async def eventcore_memory_store() -> AsyncIterator[Store]:
    """A fresh in-memory store for the test."""
    async with open_memory_store() as store:
        yield store


@pytest.fixture
async def eventcore_postgres_store(eventcore_postgres_dsn: str) -> AsyncIterator[Store]:
    """A fresh PostgreSQL store for the test, in a schema of its own, dropped afterwards."""
    async with _postgres_store(eventcore_postgres_dsn) as store:
        yield store


@pytest.fixture(params=["memory", "postgres"])
async def eventcore_store(
    request: pytest.FixtureRequest, _eventcore_server: _Server
) -> AsyncIterator[Store]:
    """A fresh store per test on each backend in turn (the test runs twice)."""
    if request.param == "memory":
        async with open_memory_store() as store:
            yield store
    else:
        async with _postgres_store(_eventcore_server.dsn) as store:
            yield store


@pytest.fixture
def eventcore_host(nursery: trio.Nursery) -> Host:
    """Start a host for projectors in the test's nursery: ``await eventcore_host(store,
    [projectors], config=None)`` returns once they run; the test's end stops it."""

    async def start(
        store: Store, projectors: Iterable[object], config: ProjectionConfig | None = None
    ) -> None:
        settings = config or ProjectionConfig(poll_interval=0.05)
        await nursery.start(run_projections, store, list(projectors), settings)

    return start
