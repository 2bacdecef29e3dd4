"""Tests of the eventcore-trio command and the demo it runs."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import threading
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from eventcore_trio import (
    EventFilter,
    ForeignLock,
    HostState,
    LeaderInfo,
    LiveHost,
    OpenTransaction,
    Position,
    ProjectionState,
    ProjectionStatus,
    RecordedEvent,
    Store,
    VersionRole,
    open_memory_store,
)
from eventcore_trio.cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    main,
)
from eventcore_trio.cli._status import status_lines
from eventcore_trio.demo import run_demo

from .conftest import oldest_server_param
from .fresh_database import fresh_database
from .helpers import LEADER_SCRIPT, dsn_environment, start_interruptible

ROOT = Path(__file__).parent.parent


class TestCommandLine:
    """Commands, exit codes and help."""

    def test_dashboard_bad_input(self, postgres_dsn: str) -> None:
        """A malformed --bind or no DSN: exit 2 with a message, before anything listens."""
        assert main(["dashboard", "--dsn", postgres_dsn, "--bind", "nonsense"]) == EXIT_USAGE
        assert main(["dashboard", "--dsn", postgres_dsn, "--bind", "host:99999"]) == EXIT_USAGE
        assert main(["dashboard", "--dsn", ""]) == EXIT_USAGE

    def test_demo_on_memory(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The in-memory demo verifies and exits 0."""
        assert main(["demo", "--memory", "--transfers", "20"]) == EXIT_OK
        assert "VERIFIED" in capsys.readouterr().out

    @pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
    def test_demo_on_postgres(self, postgres_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
        """The failover demo kills a leader and still verifies, on a PostgreSQL given by --dsn.

        Its host processes get the DSN through the environment: a password never shows in a
        command line that ``ps`` shows every user (the embedded test server's password; an
        external server given without one gets one that it ignores, which only has to stay
        out of sight).
        """
        dsn = postgres_dsn
        password = urllib.parse.urlsplit(dsn).password
        secret = urllib.parse.unquote(password) if password else "s3cret-pw"
        if not password and "postgres@" in dsn:
            dsn = dsn.replace("postgres@", f"postgres:{secret}@", 1)
        seen_hosts: set[int] = set()
        leaked: list[str] = []
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.05):
                for proc in Path("/proc").glob("[0-9]*"):
                    with contextlib.suppress(OSError):
                        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                        if "eventcore_trio.demo._host_process" in cmdline:
                            seen_hosts.add(int(proc.name))
                            if secret in cmdline:
                                leaked.append(cmdline)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            assert main(["demo", "--dsn", dsn, "--duration", "4"]) == EXIT_OK
        finally:
            done.set()
            watcher.join()
        output = capsys.readouterr().out
        assert "VERIFIED" in output
        assert "with SIGKILL; standbys took its units over in" in output
        assert "units per host now: " in output
        assert "dashboard: open http://127.0.0.1:" in output
        assert seen_hosts, "no demo host process was seen"
        assert leaked == []

    @pytest.mark.parametrize(
        "args",
        [
            ["--duration", "-5"],
            ["--duration", "nan"],
            ["--duration", "inf"],
            ["--duration", "0"],
            ["--memory", "--transfers", "-1"],
            ["--memory", "--transfers", "0"],
        ],
    )
    def test_demo_refuses_what_is_no_duration_or_count(
        self, args: list[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A duration that is not a positive number of seconds, or no transfers: exit 2,
        before anything runs (they used to run and say VERIFIED)."""
        with pytest.raises(SystemExit) as exited:
            main(["demo", *args])
        assert exited.value.code == EXIT_USAGE
        captured = capsys.readouterr()
        assert "VERIFIED" not in captured.out
        assert f"argument {args[-2]}: must be" in captured.err

    def test_store_options_are_checked_before_any_io(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A bad --statement-cache-size (or EVENTCORE_STATEMENT_CACHE_SIZE), --session-dsn,
        libpq-only DSN option or pg_ schema: exit 2 naming it, before any connection (the
        server given here is unreachable, which would be exit 3)."""
        unreachable = ["--dsn", "postgresql://postgres@127.0.0.1:1/postgres"]
        for bad in ("-1", "many"):
            with pytest.raises(SystemExit) as exited:
                main(["status", *unreachable, "--statement-cache-size", bad])
            assert exited.value.code == EXIT_USAGE
            assert "--statement-cache-size" in capsys.readouterr().err
        monkeypatch.setenv("EVENTCORE_STATEMENT_CACHE_SIZE", "-1")
        with pytest.raises(SystemExit) as exited:
            main(["run", "tests.cli_projectors:ALL", *unreachable])
        assert exited.value.code == EXIT_USAGE
        assert "EVENTCORE_STATEMENT_CACHE_SIZE" in capsys.readouterr().err
        monkeypatch.delenv("EVENTCORE_STATEMENT_CACHE_SIZE")
        for args, message in [
            (["--session-dsn", "mysql://root@db/app"], "--session-dsn has the scheme 'mysql'"),
            (["--schema", "pg_app"], "reserves for system schemas"),
            (["--dsn", "postgresql://postgres@127.0.0.1:1/db?keepalives=1"], "keepalives="),
            (["--dsn", "host=127.0.0.1 port=1 connect_timeout=5"], "connect_timeout="),
        ]:
            assert main(["status", *unreachable, *args]) == EXIT_USAGE, args
            assert message in capsys.readouterr().err

    def test_a_dsn_setting_the_server_refuses(
        self, postgres_dsn: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A DSN query parameter that PostgreSQL does not know is a configuration error
        (exit 2) naming it, not a database error."""
        dsn = postgres_dsn + ("&" if "?" in postgres_dsn else "?") + "no_such_setting=1"
        for command in (["status"], ["migrate"], ["status", "--statement-cache-size", "0"]):
            assert main([*command, "--dsn", dsn]) == EXIT_USAGE
            err = capsys.readouterr().err
            assert '"no_such_setting"' in err
            assert "fix or remove it" in err

    @pytest.mark.parametrize(
        ("target", "message"),
        [
            ("tests.cli_projectors:NOT_A_PROJECTOR", "'counter' is not a projector"),
            ("tests.cli_projectors:MIXED", "3 is not a projector"),
            (
                "tests.cli_projectors:failing_factory",
                "calling tests.cli_projectors:failing_factory raised RuntimeError: the factory "
                "needs a setting that is missing",
            ),
        ],
    )
    def test_run_with_a_target_that_names_no_projectors(
        self, target: str, message: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A string, a list holding a number, a factory that raises: exit 2 with the reason
        and no traceback, before any connection."""
        code = main(["run", target, "--dsn", "postgresql://postgres@127.0.0.1:1/postgres"])
        assert code == EXIT_USAGE
        err = capsys.readouterr().err
        assert message in err
        assert "Traceback" not in err

    @pytest.mark.parametrize(
        ("source", "message"),
        [
            ("X = 1\nraise RuntimeError('no settings')\n", "importing it raised RuntimeError"),
            ("X = 1\ndef broken(:\n    pass\n", "cannot import"),
            ("import no_such_module_anywhere\n", "No module named 'no_such_module_anywhere'"),
        ],
    )
    def test_run_with_a_target_that_fails_to_import(
        self,
        source: str,
        message: str,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A target module that raises on import or has a syntax error: exit 2 with the
        reason and where, no traceback."""
        name = f"cli_target_{uuid.uuid4().hex[:12]}"
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.chdir(tmp_path)
        code = main(["run", f"{name}:ALL", "--dsn", "postgresql://postgres@127.0.0.1:1/postgres"])
        assert code == EXIT_USAGE
        err = capsys.readouterr().err
        assert message in err
        assert "Traceback" not in err
        if "no_such_module" not in source:
            assert f"{name}.py, line 2" in err

    def test_status_escapes_what_could_steer_the_terminal(self) -> None:
        """Host names, the held-back query and state, and errors come from other processes:
        status prints their control characters and escape sequences escaped, one line each."""
        evil = "\x1b]0;owned\x07\x1b[2J\r\nfake line\u202e"
        host = LeaderInfo(pid=1, host=f"db{evil}", application_name="a")
        record = ProjectionStatus(
            name="p",
            checkpoint=None,
            lag_events=0,
            lag_seconds=0.0,
            leader=host,
            standbys=0,
            state=ProjectionState.RUNNING,
            last_error=f"boom{evil}",
            updated_at=None,
            dead_letters=0,
            held_back_by=OpenTransaction(
                pid=2,
                application_name=f"app{evil}",
                state=f"active{evil}",
                started_at=None,
                query=f"SELECT 1 /* {evil} */",
            ),
            runnable_by=0,
            lacking_hosts=(LeaderInfo(pid=3, host=f"other{evil}", application_name="b"),),
            foreign_locks=(
                ForeignLock(
                    kind="writer",
                    unit=None,
                    exclusive=True,
                    granted=True,
                    pid=4,
                    user=f"nosy{evil}",
                    application_name=f"psql{evil}",
                    client_addr=None,
                    connected_at=None,
                    waiting_since=None,
                ),
            ),
        )
        live = LiveHost(
            host_id="h1",
            process=host,
            joined_at=dt.datetime.now(dt.UTC),
            state=HostState(frozenset({"p"})),
        )
        lines = status_lines([record], hosts=[live])
        assert all(line.isprintable() for line in lines)
        # Header, unit, last error, unrunnable, live hosts, units per host, held back, the
        # foreign lock and what to do about it: no line injected.
        assert len(lines) == 9
        assert (
            lines[4] == "live hosts: 1@db\\x1b]0;owned\\x07\\x1b[2J\\r\\nfake line\\u202e (leads 1)"
        )
        assert lines[1].split()[2] == "1@db\\x1b]0;owned\\x07\\x1b[2J\\r\\nfake"
        assert all("\\x1b[2J\\r\\nfake line\\u202e" in line for line in lines[2:-1])

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

    def test_bench_runs_the_harness(self) -> None:
        """bench passes its arguments to the benchmark harness (here: --help)."""
        result = subprocess.run(
            [sys.executable, "-m", "eventcore_trio.cli", "bench", "--help"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        assert result.returncode == 0
        assert "python -m benchmarks" in result.stdout

    @pytest.mark.parametrize("foreign", [False, True])
    def test_bench_outside_a_clone(self, tmp_path: Path, foreign: bool) -> None:
        """Installed without the repository (even beside another project's benchmarks
        package), bench is not offered, and asked for anyway says where it can run: exit 2,
        no traceback."""
        if foreign:
            (tmp_path / "benchmarks").mkdir()
            (tmp_path / "benchmarks" / "__init__.py").write_text("")
        # The development install puts the clone on sys.path (benchmarks importable from
        # anywhere): the command runs without it, as a wheel's would.
        installed = (
            "import os, sys\n"
            "import eventcore_trio.cli as cli\n"
            f"sys.path[:] = [p for p in sys.path if os.path.abspath(p) != {str(ROOT)!r}]\n"
            "sys.exit(cli.main(sys.argv[1:]))\n"
        )
        # --help: were the harness found after all, it would only print its help.
        for args in (["bench"], ["bench", "--help"]):
            result = subprocess.run(
                [sys.executable, "-c", installed, *args],
                capture_output=True,
                text=True,
                cwd=tmp_path,
            )
            assert result.returncode == EXIT_USAGE, result.stdout
            assert "run it from the root of a clone" in result.stderr
            assert "Traceback" not in result.stderr
        listing = subprocess.run(
            [sys.executable, "-c", installed, "--help"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            check=True,
        )
        assert "bench" not in listing.stdout
        in_clone = subprocess.run(
            [sys.executable, "-m", "eventcore_trio.cli", "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        assert "only in a clone of the repository" in in_clone.stdout

    def test_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--version prints the package's version."""
        import eventcore_trio

        with pytest.raises(SystemExit) as exited:
            main(["--version"])
        assert exited.value.code == EXIT_OK
        assert capsys.readouterr().out == f"eventcore-trio {eventcore_trio.__version__}\n"

    @pytest.mark.parametrize("command", ["demo", "torture"])
    def test_demo_and_torture_take_a_dsn_only_from_the_command_line(
        self, command: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """EVENTCORE_DSN, exported for the other commands, never sends the demo's writes or
        torture's faults to a database: only --dsn does; their help says so."""
        from eventcore_trio.cli._parser import parser

        monkeypatch.setenv("EVENTCORE_DSN", "postgresql://postgres@db.example/production")
        assert parser().parse_args([command]).dsn is None
        given = "postgresql://postgres@127.0.0.1/scratch"
        assert parser().parse_args([command, "--dsn", given]).dsn == given
        assert parser().parse_args(["status"]).dsn.endswith("/production")
        # And it says so, in case the variable was meant for it.
        import io

        from eventcore_trio.cli._programs import _ignored_dsn_note

        said = io.StringIO()
        _ignored_dsn_note(parser().parse_args([command]), command, said)
        assert said.getvalue() == (
            f"note: {command} ignores EVENTCORE_DSN and starts an embedded server; pass --dsn "
            "to run on a database of yours\n"
        )
        said = io.StringIO()
        _ignored_dsn_note(parser().parse_args([command, "--dsn", given]), command, said)
        assert said.getvalue() == ""
        help_text = subprocess.run(
            [sys.executable, "-m", "eventcore_trio.cli", command, "--help"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "embedded PostgreSQL unless --dsn is given" in " ".join(help_text.split())
        assert "EVENTCORE_DSN is ignored" in " ".join(help_text.split())

    def test_log_level(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--log-level (or EVENTCORE_LOG_LEVEL), for run and dashboard: INFO by default for
        run, any case; anything else is exit 2 naming where it came from."""
        from eventcore_trio.cli._parser import parser

        monkeypatch.delenv("EVENTCORE_LOG_LEVEL", raising=False)
        assert parser().parse_args(["run", "m:a"]).log_level == "INFO"
        assert parser().parse_args(["dashboard"]).log_level == "WARNING"
        assert parser().parse_args(["run", "m:a", "--log-level", "debug"]).log_level == "DEBUG"
        monkeypatch.setenv("EVENTCORE_LOG_LEVEL", "error")
        assert parser().parse_args(["run", "m:a"]).log_level == "ERROR"
        assert parser().parse_args(["dashboard"]).log_level == "ERROR"
        for command in (["run", "m:a"], ["dashboard"]):
            monkeypatch.setenv("EVENTCORE_LOG_LEVEL", "loud")
            with pytest.raises(SystemExit) as exited:
                main(command)
            assert exited.value.code == EXIT_USAGE
            assert "EVENTCORE_LOG_LEVEL" in capsys.readouterr().err
            monkeypatch.delenv("EVENTCORE_LOG_LEVEL")
            with pytest.raises(SystemExit) as exited:
                main([*command, "--log-level", "TRACE"])
            assert exited.value.code == EXIT_USAGE
            assert "DEBUG, INFO, WARNING, ERROR" in capsys.readouterr().err

    def test_log_format(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--log-format (or EVENTCORE_LOG_FORMAT), for run and dashboard: text by default,
        any case; anything else is exit 2 naming where it came from."""
        from eventcore_trio.cli._parser import parser

        monkeypatch.delenv("EVENTCORE_LOG_FORMAT", raising=False)
        assert parser().parse_args(["run", "m:a"]).log_format == "text"
        assert parser().parse_args(["dashboard", "--log-format", "JSON"]).log_format == "json"
        monkeypatch.setenv("EVENTCORE_LOG_FORMAT", "json")
        assert parser().parse_args(["run", "m:a"]).log_format == "json"
        assert parser().parse_args(["run", "m:a", "--log-format", "text"]).log_format == "text"
        for command in (["run", "m:a"], ["dashboard"]):
            monkeypatch.setenv("EVENTCORE_LOG_FORMAT", "xml")
            with pytest.raises(SystemExit) as exited:
                main(command)
            assert exited.value.code == EXIT_USAGE
            err = capsys.readouterr().err
            assert "EVENTCORE_LOG_FORMAT" in err
            assert "must be one of text, json" in err
            monkeypatch.delenv("EVENTCORE_LOG_FORMAT")
            with pytest.raises(SystemExit) as exited:
                main([*command, "--log-format", "logfmt"])
            assert exited.value.code == EXIT_USAGE
            assert "'logfmt'" in capsys.readouterr().err

    def test_json_log_lines(self) -> None:
        """A JSON log line is one line whatever the message holds, with the time in UTC and
        the traceback's text when there is one."""
        from eventcore_trio.cli._options import JsonLogFormatter

        formatter = JsonLogFormatter()
        record = logging.LogRecord(
            "eventcore_trio.x", logging.INFO, __file__, 1, "a\nb %s", ("c",), None
        )
        line = formatter.format(record)
        assert "\n" not in line
        parsed = json.loads(line)
        assert parsed == {
            "time": parsed["time"],
            "level": "INFO",
            "logger": "eventcore_trio.x",
            "message": "a\nb c",
        }
        assert dt.datetime.fromisoformat(parsed["time"]).utcoffset() == dt.timedelta(0)
        try:
            raise ValueError("boom")
        except ValueError:
            failed = logging.LogRecord(
                "eventcore_trio.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
            )
        parsed = json.loads(formatter.format(failed))
        assert parsed["level"] == "ERROR"
        assert parsed["exception"].startswith("Traceback (most recent call last):")
        assert parsed["exception"].endswith("ValueError: boom")

    @pytest.mark.parametrize(
        ("dsn", "shown"),
        [
            (
                "postgresql://app:s3cret@db.internal:6432/shop",
                "database 'shop' at db.internal:6432",
            ),
            ("postgresql://app:s3cret@db.internal/shop", "database 'shop' at db.internal:5432"),
            ("postgresql://app:s3cret@[::1]:5433/shop", "database 'shop' at [::1]:5433"),
            (
                "postgresql://app@/shop?host=/run/postgresql",
                "database 'shop' at /run/postgresql:5432",
            ),
            (
                "host=db port=5433 dbname=shop user=app password=s3cret",
                "database 'shop' at db:5433",
            ),
            ("postgresql://app:s3cret@db", "database 'app' at db:5432"),
        ],
    )
    def test_which_database(self, dsn: str, shown: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """What run and status say about the database: host, port, name; no password."""
        from eventcore_trio.cli._options import describe_database
        from eventcore_trio.postgres import normalize_dsn

        for variable in ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER"):
            monkeypatch.delenv(variable, raising=False)
        described = describe_database(normalize_dsn(dsn))
        assert described == shown
        assert "s3cret" not in described

    def test_help_runs_as_a_program(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The entry point answers --help as a program, and so does every command."""
        result = subprocess.run(
            [sys.executable, "-m", "eventcore_trio.cli", "--help"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "usage: eventcore-trio" in result.stdout
        # parser() builds every command's parser (importing what they need) whichever is
        # asked for, so the program above has built them all, as a fresh process: here in
        # this one each command answers as it would there, without a process of its own.
        for args in (
            ["demo"],
            ["migrate"],
            ["status"],
            ["reset"],
            ["run"],
            ["dead-letters"],
            ["dead-letters", "list"],
            ["dead-letters", "replay"],
            ["torture"],
            ["dashboard"],
        ):
            with pytest.raises(SystemExit) as exited:
                main([*args, "--help"])
            assert exited.value.code == EXIT_OK
            assert f"usage: eventcore-trio {' '.join(args)}" in capsys.readouterr().out


class TestOperatorCommands:
    """status, reset, run and dead-letters against a real PostgreSQL."""

    @staticmethod
    def _fresh(dsn: str) -> list[str]:
        # ["--dsn", DSN, "--schema", SCHEMA]; a child process gets where[2:] and the DSN,
        # which holds the test server's password, through its environment (dsn_environment).
        schema = f"t_{uuid.uuid4().hex[:12]}"
        assert main(["migrate", "--dsn", dsn, "--schema", schema]) == EXIT_OK
        return ["--dsn", dsn, "--schema", schema]

    def test_status_groups_partitions_and_counts_units_per_host(
        self, postgres_dsn: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A partitioned projection shows one line, its partitions under it, units per host."""
        import trio

        from eventcore_trio import NewEvent, open_postgres_store
        from eventcore_trio.projection import run_projection, run_projections

        from . import cli_projectors

        where = self._fresh(postgres_dsn)
        child = where[2:]  # without the DSN: children get it in their environment
        shown: dict[str, str] = {}

        async def run_and_show() -> None:
            async with open_postgres_store(postgres_dsn, schema=where[-1]) as store:
                for i in range(12):
                    await store.append(f"s-{i}", [NewEvent("E", {})])
                await run_projection(store, cli_projectors.spread)
                async with trio.open_nursery() as nursery:
                    await nursery.start(run_projections, store, [cli_projectors.spread])
                    for key, extra in (("table", []), ("json", ["--json"])):
                        done = await trio.run_process(
                            [sys.executable, "-m", "eventcore_trio.cli", "status", *extra, *child],
                            capture_stdout=True,
                            env=dsn_environment(postgres_dsn),
                        )
                        shown[key] = done.stdout.decode()
                    nursery.cancel_scope.cancel()

        trio.run(run_and_show)
        lines = shown["table"].splitlines()
        summary = next(line for line in lines if line.startswith("spread"))
        assert "3/3 led" in summary
        assert [line.split()[0] for line in lines if line.startswith("  [")] == [
            "[0/3]",
            "[1/3]",
            "[2/3]",
        ]
        assert f"live hosts: {os.getpid()}@" in shown["table"]
        assert f"units led per host: {os.getpid()}@" in shown["table"]
        assert shown["table"].rstrip().endswith(" 3")
        records = json.loads(shown["json"])
        assert [(r["name"], r["partition"], r["partitions"]) for r in records] == [
            ("spread", i, 3) for i in range(3)
        ]
        assert all(r["state"] == "running" for r in records)

    def test_status_shows_the_units_of_a_new_partition_count_awaiting_the_split(
        self, postgres_dsn: str
    ) -> None:
        """During a change of count, each count has its summary line, and the new count's
        units say that they await the split."""
        import trio

        from eventcore_trio import NewEvent, open_postgres_store
        from eventcore_trio.projection import ProjectionContext, projector, run_projection

        @projector("split", partitions=2)
        async def split(event: RecordedEvent, ctx: ProjectionContext) -> None:
            pass

        where = self._fresh(postgres_dsn)
        child = where[2:]  # without the DSN: children get it in their environment
        shown: dict[str, str] = {}

        async def run_and_show() -> None:
            async with open_postgres_store(postgres_dsn, schema=where[-1]) as store:
                await store.append("s-1", [NewEvent("E", {})])
                await run_projection(store, split)
                # A live host with the new count (its units would wait for the split).
                async with store.register_host(runs=[f"split[{i}/4]" for i in range(4)]):
                    for key, extra in (("table", []), ("json", ["--json"])):
                        done = await trio.run_process(
                            [sys.executable, "-m", "eventcore_trio.cli", "status", *extra, *child],
                            capture_stdout=True,
                            env=dsn_environment(postgres_dsn),
                        )
                        shown[key] = done.stdout.decode()

        trio.run(run_and_show)
        lines = shown["table"].splitlines()
        summaries = [line for line in lines if line.startswith("split")]
        assert [s.split()[1] for s in summaries] == ["0/2", "0/4"]
        assert shown["table"].count("awaiting-split") == 4
        assert shown["table"].count("runs once no unit of split's recorded partition count") == 4
        records = json.loads(shown["json"])
        assert [(r["partitions"], r["state"]) for r in records] == [(2, "stopped")] * 2 + [
            (4, "awaiting-split")
        ] * 4

    def test_status_reset_and_dead_letters(
        self, postgres_dsn: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A run shows in status; dead letters list and replay; reset needs confirmation."""
        import trio

        from eventcore_trio import NewEvent, open_postgres_store
        from eventcore_trio.projection import run_projection

        from . import cli_projectors

        where = self._fresh(postgres_dsn)
        schema = where[-1]

        async def prepare() -> None:
            async with open_postgres_store(postgres_dsn, schema=schema) as store:
                await store.append("s", [NewEvent("E", {}), NewEvent("E", {"bad": True})])
                await run_projection(store, cli_projectors.picky)

        trio.run(prepare)
        capsys.readouterr()
        assert main(["status", *where]) == EXIT_OK
        table = capsys.readouterr().out
        assert "picky" in table
        assert "stopped" in table
        assert main(["status", "--json", *where]) == EXIT_OK
        (record,) = json.loads(capsys.readouterr().out)
        assert (record["name"], record["dead_letters"], record["lag_events"]) == ("picky", 1, 0)

        assert main(["dead-letters", "list", "picky", *where]) == EXIT_OK
        assert "bad event" in capsys.readouterr().out
        cli_projectors.ACCEPT_ALL["value"] = True
        try:
            code = main(
                [
                    "dead-letters",
                    "replay",
                    "picky",
                    "--projectors",
                    "tests.cli_projectors:ALL",
                    *where,
                ]
            )
        finally:
            cli_projectors.ACCEPT_ALL["value"] = False
        assert code == EXIT_OK
        assert "replayed 1, failed again 0" in capsys.readouterr().out

        assert main(["reset", "picky", *where]) == EXIT_USAGE  # stdin is not a terminal
        assert "--yes" in capsys.readouterr().err
        assert main(["reset", "picky", "--yes", *where]) == EXIT_OK
        assert main(["reset", "nobody", "--yes", *where]) == EXIT_FAILED
        assert "rebuilds it from the beginning" in capsys.readouterr().out
        assert main(["status", "--json", *where]) == EXIT_OK
        (record,) = json.loads(capsys.readouterr().out)
        assert record["checkpoint"] is None

    @pytest.mark.parametrize(("sig", "code"), [("SIGTERM", EXIT_OK), ("SIGINT", 130)])
    def test_run_hosts_until_a_signal(self, postgres_dsn: str, sig: str, code: int) -> None:
        """run MODULE:ATTR hosts the projectors and stops cleanly: SIGTERM exits 0, SIGINT 130.

        Its first line, into a pipe too, says what it hosts on which database and schema
        (never the password); the schema comes from EVENTCORE_SCHEMA here; at the default
        level, INFO, it logs its leadership."""
        import queue
        import signal

        where = self._fresh(postgres_dsn)
        schema = where[-1]
        environment = {**dsn_environment(postgres_dsn), "EVENTCORE_SCHEMA": schema}
        environment.pop("EVENTCORE_LOG_LEVEL", None)
        process = start_interruptible(
            [sys.executable, "-m", "eventcore_trio.cli", "run", "tests.cli_projectors:ALL"],
            cwd=Path(__file__).parent.parent,
            env=environment,
        )
        logged: queue.Queue[str] = queue.Queue()

        def read_log() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                logged.put(line)

        reader = threading.Thread(target=read_log, daemon=True)
        reader.start()
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            host = urllib.parse.urlsplit(postgres_dsn).hostname
            assert line.startswith("hosting counter, picky on database "), line
            assert f" at {host}:" in line
            assert line.endswith(f", schema {schema!r}; SIGINT or SIGTERM stops\n"), line
            password = urllib.parse.urlsplit(postgres_dsn).password
            assert not password or password not in line
            assert process.stdout.readline().startswith("ready")
            while "projector counter: leading" not in logged.get(timeout=30):
                pass
            process.send_signal(getattr(signal, sig))
            assert process.wait(timeout=30) == code
            assert "stopping" in process.stdout.read()
        finally:
            process.kill()
            process.wait()
            reader.join(timeout=10)
            assert process.stdout is not None
            assert process.stderr is not None
            process.stdout.close()
            process.stderr.close()

    @pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
    def test_run_logs_json_lines(self, postgres_dsn: str) -> None:
        """run --log-format json: every line on stderr is one JSON object with time, level,
        logger and message; a failure's traceback is in its line's "exception"."""
        import queue
        import signal

        import trio

        from eventcore_trio import NewEvent, open_postgres_store

        where = self._fresh(postgres_dsn)

        async def append() -> None:
            async with open_postgres_store(postgres_dsn, schema=where[-1]) as store:
                await store.append("s-1", [NewEvent("E", {})])

        trio.run(append)
        environment = {**dsn_environment(postgres_dsn), "EVENTCORE_SCHEMA": where[-1]}
        for variable in ("EVENTCORE_LOG_LEVEL", "EVENTCORE_LOG_FORMAT"):
            environment.pop(variable, None)
        process = start_interruptible(
            [
                *[sys.executable, "-m", "eventcore_trio.cli", "run"],
                *["tests.cli_projectors:WITH_A_FAILURE", "--log-format", "json"],
            ],
            cwd=ROOT,
            env=environment,
        )
        logged: queue.Queue[str] = queue.Queue()

        def read_log() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                logged.put(line)

        reader = threading.Thread(target=read_log, daemon=True)
        reader.start()
        lines: list[dict[str, Any]] = []
        try:

            def seen(level: str, message: str) -> dict[str, Any] | None:
                return next(
                    (x for x in lines if x["level"] == level and message in x["message"]), None
                )

            # The two units start together: their lines come in either order.
            while not (
                seen("INFO", "projector counter: leading")
                and seen("ERROR", "unit brittle stopped: FATAL failure")
            ):
                lines.append(json.loads(logged.get(timeout=30)))
            leading = seen("INFO", "projector counter: leading")
            stopped = seen("ERROR", "unit brittle stopped: FATAL failure")
            assert leading is not None
            assert stopped is not None
            assert leading["logger"].startswith("eventcore_trio.")
            assert "RuntimeError: brittle cannot apply anything" in stopped["exception"]
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == EXIT_OK
        finally:
            process.kill()
            process.wait()
            reader.join(timeout=10)
            assert process.stdout is not None
            assert process.stderr is not None
            process.stdout.close()
            process.stderr.close()
        # Every line, those after the ones waited for too.
        lines.extend(json.loads(line) for line in logged.queue)
        for line in lines:
            assert {"time", "level", "logger", "message"} <= line.keys()
            assert dt.datetime.fromisoformat(line["time"]).utcoffset() == dt.timedelta(0)

    @pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
    def test_run_on_a_schema_without_events_warns(self, postgres_dsn: str) -> None:
        """run on a schema that does not exist yet creates it (hosts may start before the
        first event), but says in one WARNING line that there are no events there, and
        names the schema of the same database that has some: "did you mean --schema X?"."""
        import queue
        import signal

        import trio

        from eventcore_trio import NewEvent, open_postgres_store

        async def write_elsewhere(dsn: str) -> None:
            async with open_postgres_store(dsn, schema="library") as store:
                await store.append("book-dune", [NewEvent("Lent", {"member": "ada"})])

        with fresh_database(postgres_dsn, "cli") as dsn:
            trio.run(write_elsewhere, dsn)
            environment = dsn_environment(dsn)
            environment.pop("EVENTCORE_SCHEMA", None)
            environment.pop("EVENTCORE_LOG_LEVEL", None)
            process = start_interruptible(
                [sys.executable, "-m", "eventcore_trio.cli", "run", "tests.cli_projectors:ALL"],
                cwd=ROOT,
                env=environment,
            )
            logged: queue.Queue[str] = queue.Queue()

            def read_log() -> None:
                assert process.stderr is not None
                for line in process.stderr:
                    logged.put(line)

            reader = threading.Thread(target=read_log, daemon=True)
            reader.start()
            try:
                line = logged.get(timeout=30)
                while not line.startswith("WARNING"):
                    line = logged.get(timeout=30)
                assert "no events in database 'cli_" in line
                assert ", schema 'eventcore': the projectors have nothing to apply" in line
                assert "did you mean --schema library (or EVENTCORE_SCHEMA=library)?" in line
                # It still hosts: a deployment may start its hosts before any event.
                while "projector counter: leading" not in line:
                    line = logged.get(timeout=30)
                process.send_signal(signal.SIGTERM)
                assert process.wait(timeout=30) == EXIT_OK
            finally:
                process.kill()
                process.wait()
                reader.join(timeout=10)
                assert process.stdout is not None
                assert process.stderr is not None
                process.stdout.close()
                process.stderr.close()
            # Once, however many lines followed.
            assert not [w for w in logged.queue if w.startswith("WARNING")]

    @pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
    def test_the_warning_about_no_events_only_where_there_are_none(
        self, postgres_dsn: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """No warning on a schema with events; on one without, and no other store with
        events in the database, the warning has no hint."""
        import trio

        from eventcore_trio import NewEvent
        from eventcore_trio.cli._admin import warn_if_no_events
        from eventcore_trio.cli._options import StoreOptions

        async def look(dsn: str, schema: str, append: bool) -> None:
            options = StoreOptions(
                dsn=dsn, session_dsn=None, statement_cache_size=None, schema=schema
            )
            async with options.open(migrate=True) as store:
                if append:
                    await store.append("s", [NewEvent("E", {})])
                await warn_if_no_events(store, options)

        with fresh_database(postgres_dsn, "cli") as dsn:
            trio.run(look, dsn, "empty", False)
            (record,) = caplog.records
            assert record.levelname == "WARNING"
            assert "schema 'empty': the projectors have nothing" in record.getMessage()
            assert "did you mean" not in record.getMessage()
            caplog.clear()
            trio.run(look, dsn, "full", True)
            assert not caplog.records

    def test_status_says_which_database_and_schema(
        self,
        postgres_dsn: str,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """--schema defaults to EVENTCORE_SCHEMA; status says first, once, which database
        and schema it reads (on stderr with --json), and never the password."""
        schema = f"t_{uuid.uuid4().hex[:12]}"
        monkeypatch.setenv("EVENTCORE_SCHEMA", schema)
        assert main(["migrate", "--dsn", postgres_dsn]) == EXIT_OK
        assert f"schema {schema!r} is at version" in capsys.readouterr().out
        assert main(["status", "--dsn", postgres_dsn]) == EXIT_OK
        out = capsys.readouterr().out
        first, *rest = out.splitlines()
        host = urllib.parse.urlsplit(postgres_dsn).hostname
        assert first.startswith("database ")
        assert f" at {host}:" in first
        assert first.endswith(f", schema {schema!r}")
        assert "(no projection has run against this store)" in rest
        assert out.count(schema) == 1
        password = urllib.parse.urlsplit(postgres_dsn).password
        assert not password or password not in out
        assert main(["status", "--json", "--dsn", postgres_dsn]) == EXIT_OK
        captured = capsys.readouterr()
        assert json.loads(captured.out) == []
        assert captured.err.strip() == first
        # The option still wins over the variable.
        assert main(["status", "--dsn", postgres_dsn, "--schema", "eventcore_nothing"]) == (
            EXIT_USAGE
        )
        assert "'eventcore_nothing'" in capsys.readouterr().err

    def test_replay_that_fails_again_and_commands_on_a_running_projection(
        self, postgres_dsn: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Replay with failures exits 1; reset and replay of a running projection both exit 1
        with advice in terms of the command line."""
        import trio

        from eventcore_trio import NewEvent, open_postgres_store
        from eventcore_trio.projection import run_projection

        from . import cli_projectors

        where = self._fresh(postgres_dsn)
        schema = where[-1]
        replay = ["dead-letters", "replay", "picky", "--projectors", "tests.cli_projectors:ALL"]

        async def prepare() -> None:
            async with open_postgres_store(postgres_dsn, schema=schema) as store:
                await store.append("s", [NewEvent("E", {"bad": True}) for _ in range(3)])
                await run_projection(store, cli_projectors.picky)

        trio.run(prepare)
        capsys.readouterr()
        assert main([*replay, *where]) == EXIT_FAILED
        captured = capsys.readouterr()
        assert "replayed 0, failed again 3" in captured.out
        assert "failed again and were kept" in captured.err

        leader = subprocess.Popen(
            [sys.executable, str(LEADER_SCRIPT), schema, "picky"],
            stdout=subprocess.PIPE,
            text=True,
            env=dsn_environment(postgres_dsn),
        )
        try:
            assert leader.stdout is not None
            assert leader.stdout.readline().startswith("acquired")
            for command in (["reset", "picky", "--yes"], replay):
                assert main([*command, *where]) == EXIT_FAILED, command
                err = capsys.readouterr().err
                assert "stop the hosts that run it" in err
                assert "wait=True" not in err
                assert "ProjectionConfig" not in err
        finally:
            leader.kill()
            leader.wait()
            assert leader.stdout is not None
            leader.stdout.close()

    def test_replay_with_projectors_of_another_partition_count_is_refused(
        self, postgres_dsn: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """dead-letters list shows every partition's letters; replay with --projectors whose
        projector has another partition count exits 2, says so in command-line terms, and
        replays nothing."""
        import trio

        from eventcore_trio import NewEvent, open_postgres_store
        from eventcore_trio.projection import (
            FailureStrategy,
            ProjectionContext,
            projector,
            run_projection,
        )

        from . import cli_projectors

        where = self._fresh(postgres_dsn)

        @projector("picky", partitions=2, on_error=lambda failure: FailureStrategy.SKIP)
        async def split_picky(event: RecordedEvent, ctx: ProjectionContext) -> None:
            raise ValueError("bad event")

        async def prepare() -> None:
            async with open_postgres_store(postgres_dsn, schema=where[-1]) as store:
                await store.append("s", [NewEvent("E", {"bad": True})])
                await run_projection(store, cli_projectors.picky)
                await store.append("t", [NewEvent("E", {"bad": True})])
                await run_projection(store, split_picky)

        async def letters() -> int:
            async with open_postgres_store(postgres_dsn, schema=where[-1]) as store:
                return len(await store.dead_letters("picky"))

        trio.run(prepare)
        capsys.readouterr()
        assert main(["dead-letters", "list", "picky", *where]) == EXIT_OK
        assert "2 dead letter(s) for 'picky'" in capsys.readouterr().out
        cli_projectors.ACCEPT_ALL["value"] = True
        try:
            replay = ["dead-letters", "replay", "picky", "--projectors", "tests.cli_projectors:ALL"]
            code = main([*replay, *where])
        finally:
            cli_projectors.ACCEPT_ALL["value"] = False
        assert code == EXIT_USAGE
        err = capsys.readouterr().err
        assert "partitions=1" in err
        assert "runs as 2 partition(s)" in err
        assert "--projectors" in err
        assert trio.run(letters) == 2

    def test_versions_serve_and_retire(
        self, postgres_dsn: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Version 1 serves, version 2 builds: status shows both (progress of the building
        one), `versions` the changelog; retire refuses the serving version (exit 1, the
        library's words) and asks for confirmation; serve switches by hand and says what it
        withdraws; a retired version is gone (exit 1 the second time)."""
        import trio

        from eventcore_trio import NewEvent, open_postgres_store
        from eventcore_trio.projection import ProjectionContext, projector, run_projection

        @projector("ledger")
        async def ledger(event: RecordedEvent, ctx: ProjectionContext) -> None:
            pass

        where = self._fresh(postgres_dsn)

        async def prepare() -> None:
            async with open_postgres_store(postgres_dsn, schema=where[-1]) as store:
                for i in range(40):
                    await store.append(f"s-{i}", [NewEvent("E", {})])
                await run_projection(store, ledger)
                # Version 2 has applied the first 10 events: it builds.
                tenth = (await store.read_events(None, limit=10))[-1].position
                assert await store.version_role("ledger", 2) is VersionRole.BUILDING
                async with (
                    store.try_acquire("ledger@v2") as leadership,
                    leadership.open_batch() as batch,
                ):
                    await batch.save_checkpoint(None, tenth)

        trio.run(prepare)
        capsys.readouterr()
        assert main(["status", *where]) == EXIT_OK
        table = capsys.readouterr().out
        assert "version 1 of ledger: SERVING" in table
        building = next(line for line in table.splitlines() if "version 2 of ledger" in line)
        assert "building, 25.0% of the event log applied (30 events to go)" in building
        assert any(line.startswith("ledger@v2 ") for line in table.splitlines())
        assert main(["versions", "ledger", "--json", *where]) == EXIT_OK
        shown = json.loads(capsys.readouterr().out)
        assert shown["serving"] == 1
        assert [(v["version"], v["role"]) for v in shown["versions"]] == [
            (1, "serving"),
            (2, "building"),
        ]
        assert shown["versions"][1]["progress"] == pytest.approx(0.25)
        assert [(s["from_version"], s["to_version"], s["reason"]) for s in shown["switches"]] == [
            (None, 1, "first")
        ]
        # The names status prints work where a projection is named.
        assert main(["versions", "ledger@v2", "--json", *where]) == EXIT_OK
        assert json.loads(capsys.readouterr().out)["serving"] == 1
        assert main(["dead-letters", "list", "ledger@v2", *where]) == EXIT_OK
        capsys.readouterr()

        assert main(["retire", "ledger", "1", *where]) == EXIT_USAGE  # no terminal, no --yes
        assert "--yes" in capsys.readouterr().err
        assert main(["retire", "ledger", "1", "--yes", *where]) == EXIT_FAILED
        assert "serves reads; switch to another version first" in capsys.readouterr().err
        with pytest.raises(SystemExit) as exited:  # argparse: versions count up from 1
            main(["retire", "ledger", "0", "--yes", *where])
        assert exited.value.code == EXIT_USAGE
        capsys.readouterr()

        assert main(["serve", "ledger", "2", "--yes", *where]) == EXIT_OK
        said = capsys.readouterr().out
        assert "version 2 of 'ledger' serves now (before: 1)" in said
        assert "superseded: version(s) 1" in said
        assert main(["serve", "ledger", "1", "--yes", *where]) == EXIT_OK
        assert "withdrawn: version(s) 2" in capsys.readouterr().out
        assert main(["serve", "ledger", "7", "--yes", *where]) == EXIT_FAILED
        assert "version 7" in capsys.readouterr().err
        assert main(["versions", "ledger", *where]) == EXIT_OK
        listing = capsys.readouterr().out
        assert "ledger: version 1 serves" in listing
        assert "version 2 of ledger: withdrawn" in listing
        assert "v1 -> v2" in listing
        assert "v2 -> v1" in listing
        assert "switched by an operator" in listing

        assert main(["retire", "ledger", "2", "--yes", *where]) == EXIT_OK
        assert "version 2 of 'ledger' retired" in capsys.readouterr().out
        assert main(["retire", "ledger", "2", "--yes", *where]) == EXIT_FAILED
        assert "has not run" in capsys.readouterr().err
        assert main(["status", "--json", *where]) == EXIT_OK
        assert [(r["version"], r["serving"]) for r in json.loads(capsys.readouterr().out)] == [
            (1, True)
        ]
        assert main(["versions", "nobody", *where]) == EXIT_FAILED

    def test_reset_wait_follows_the_rebuild(self, postgres_dsn: str) -> None:
        """reset --wait stays until hosts have rebuilt the projection, then exits 0."""
        import trio

        from eventcore_trio import NewEvent, open_postgres_store
        from eventcore_trio.projection import run_projection

        from . import cli_projectors

        where = self._fresh(postgres_dsn)

        async def prepare() -> None:
            async with open_postgres_store(postgres_dsn, schema=where[-1]) as store:
                await store.append("s", [NewEvent("E", {}) for _ in range(50)])
                await run_projection(store, cli_projectors.picky)

        trio.run(prepare)
        root = Path(__file__).parent.parent
        reset = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "eventcore_trio.cli",
                "reset",
                "picky",
                "--yes",
                "--wait",
                *where[2:],
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=root,
            env=dsn_environment(postgres_dsn),
        )
        host = None
        try:
            assert reset.stdout is not None
            assert "reset" in reset.stdout.readline()
            # Only now start a host, which rebuilds the projection from the beginning.
            host = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "eventcore_trio.cli",
                    "run",
                    "tests.cli_projectors:ALL",
                    *where[2:],
                ],
                stdout=subprocess.DEVNULL,
                cwd=root,
                env=dsn_environment(postgres_dsn),
            )
            assert reset.wait(timeout=60) == EXIT_OK
            assert "rebuilt: 50 events applied" in reset.stdout.read()
        finally:
            for process in (reset, host):
                if process is not None:
                    process.kill()
                    process.wait()
            assert reset.stdout is not None
            reset.stdout.close()

    def test_run_with_a_bad_target(
        self, postgres_dsn: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A target that cannot be imported exits 2 with the reason."""
        assert main(["run", "no_such_module:ALL", "--dsn", postgres_dsn]) == EXIT_USAGE
        assert "cannot import" in capsys.readouterr().err

    def test_a_projection_that_never_ran(
        self, postgres_dsn: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """dead-letters list of a name that never ran exits 1 and says so, as reset does
        (it used to list nothing and exit 0, so a typo looked like a clean record)."""
        where = self._fresh(postgres_dsn)
        capsys.readouterr()
        for command in (
            ["dead-letters", "list", "nope"],
            ["dead-letters", "list", "nope", "--json"],
            ["reset", "nope", "--yes"],
        ):
            assert main([*command, *where]) == EXIT_FAILED, command
            captured = capsys.readouterr()
            assert "no projection named 'nope' has run against this store" in captured.err
            assert captured.out == ""


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

    async def test_the_failover_demo_verification_can_fail(self, postgres_dsn: str) -> None:
        """The PostgreSQL demo's check passes a correct read model and fails a damaged one."""
        from eventcore_trio import open_postgres_store
        from eventcore_trio.demo._failover import ACCOUNTS, _open_accounts, _Stats, _verify
        from eventcore_trio.demo._host_process import make_projectors
        from eventcore_trio.projection import run_projection

        schema = f"t_{uuid.uuid4().hex[:12]}"
        app = f"{schema}_app"
        accounts = [f"account-{n:03d}" for n in range(ACCOUNTS)]
        async with open_postgres_store(postgres_dsn, schema=schema) as store:
            try:
                await _open_accounts(store, app, accounts)
                for projector in make_projectors(app):
                    await run_projection(store, projector)
                lines: list[str] = []
                assert await _verify(store, app, accounts, _Stats(), lines.append)
                assert lines[-1].startswith("VERIFIED")

                await store.admin.execute(
                    f'INSERT INTO "{app}".applied SELECT * FROM "{app}".applied LIMIT 1'
                )
                await store.admin.execute(
                    f'UPDATE "{app}".balances SET balance = balance + 1 WHERE account = $1',
                    accounts[0],
                )
                lines.clear()
                assert not await _verify(store, app, accounts, _Stats(), lines.append)
                assert "FAILED: projected balances differ from the streams' fold" in lines
                assert "FAILED: 1 events were applied twice" in lines
                assert not any(line.startswith("VERIFIED") for line in lines)
            finally:
                await store.admin.execute(
                    f'DROP SCHEMA "{app}" CASCADE; DROP SCHEMA "{schema}" CASCADE'
                )
