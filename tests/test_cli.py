"""Tests of the eventcore-trio command and the demo it runs."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from eventcore_trio import EventFilter, Position, RecordedEvent, Store, open_memory_store
from eventcore_trio._demo import run_demo
from eventcore_trio.cli import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, main


class TestCommandLine:
    """Commands, exit codes and help."""

    def test_demo_on_memory(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The in-memory demo verifies and exits 0."""
        assert main(["demo", "--memory", "--transfers", "20"]) == EXIT_OK
        assert "VERIFIED" in capsys.readouterr().out

    def test_demo_on_postgres(self, postgres_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
        """The demo verifies against a real PostgreSQL given by --dsn."""
        assert main(["demo", "--dsn", postgres_dsn, "--transfers", "20"]) == EXIT_OK
        assert "VERIFIED" in capsys.readouterr().out

    def test_migrate(self, postgres_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
        """migrate creates the schema and says which version it is at."""
        schema = f"t_{uuid.uuid4().hex[:12]}"
        assert main(["migrate", "--dsn", postgres_dsn, "--schema", schema]) == EXIT_OK
        assert main(["migrate", "--dsn", postgres_dsn, "--schema", schema]) == EXIT_OK
        assert f"schema '{schema}' is at version" in capsys.readouterr().out

    def test_migrate_without_dsn(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without a DSN the command exits 2 and says how to give one."""
        monkeypatch.delenv("EVENTCORE_DSN", raising=False)
        assert main(["migrate"]) == EXIT_USAGE
        assert "EVENTCORE_DSN" in capsys.readouterr().err

    def test_unreachable_database(self, capsys: pytest.CaptureFixture[str]) -> None:
        """An unreachable server exits 3 with a message, not a traceback."""
        code = main(["migrate", "--dsn", "postgresql://postgres@127.0.0.1:1/postgres"])
        assert code == EXIT_UNREACHABLE
        assert "Traceback" not in capsys.readouterr().err

    def test_help_runs_as_a_program(self) -> None:
        """The installed entry point answers --help for every command."""
        for args in ([], ["demo"], ["migrate"]):
            result = subprocess.run(
                [sys.executable, "-m", "eventcore_trio.cli", *args, "--help"],
                capture_output=True,
                text=True,
                check=True,
            )
            assert "usage: eventcore-trio" in result.stdout


class _DroppingStore:
    """A store that loses one event in read_events, to prove the demo's check can fail."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self._dropped = False
        self._returned = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def read_events(
        self,
        after: Position | None,
        *,
        limit: int,
        filter: EventFilter | None = None,
        undecodable: Any = "raise",
    ) -> Any:
        page: list[RecordedEvent] = await self._inner.read_events(
            after, limit=limit, filter=filter, undecodable=undecodable
        )
        # Drop the 25th event the reader is given, whatever the page sizes turn out to be.
        if not self._dropped and self._returned + len(page) >= 25:
            self._dropped = True
            index = 24 - self._returned
            page = page[:index] + page[index + 1 :]
        self._returned += len(page)
        return page


class TestDemoVerification:
    """The demo's verification is not a formality."""

    async def test_a_lost_event_fails_the_demo(self) -> None:
        """If the projection misses an event, the demo reports failure."""

        @asynccontextmanager
        async def open_faulty() -> AsyncIterator[Store]:
            async with open_memory_store() as store:
                yield _DroppingStore(store)

        lines: list[str] = []
        report = await run_demo(open_faulty, transfers_per_writer=10, out=lines.append)
        assert "projected balances differ from the streams' fold" in report.problems
        assert "the projection saw a different number of events" in report.problems
        assert any(line.startswith("FAILED") for line in lines)
        assert not any("VERIFIED" in line for line in lines)
