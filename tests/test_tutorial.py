"""The newcomer's path works as written: docs/getting-started.md's and docs/tutorial.md's steps,
run in their order against a real PostgreSQL, command line included (issue 31).

Each Python block whose first line names a file (``# myapp/projections.py``) is written to that
file in a fresh directory; each shell block runs line by line, as typed into one shell there:

- ``export NAME=VALUE`` sets the variable, except ``EVENTCORE_DSN``, whose value in the docs is
  an example: it becomes a database of the test server's own, made for this test;
- ``pip install ...`` is skipped (this environment is the package's);
- ``python ...`` runs with this interpreter and must exit 0; ``$SHELL`` is a script that proves
  it was started with a working ``EVENTCORE_DSN`` (the tutorial's ``server.py`` starts one);
- ``eventcore-trio ... &`` starts a host in the background, and the step ends once every unit
  in the store is led, checkpointed and caught up; ``kill %1`` sends that host SIGTERM and it
  must exit 0 without a warning (a wrong schema would warn);
- any other ``eventcore-trio ...`` must exit 0;
- anything else fails the test: a new kind of step needs a rule here.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from eventcore_trio import ProjectionState, open_postgres_store

from .conftest import oldest_server_param
from .fresh_database import fresh_database

ROOT = Path(__file__).parent.parent
DOCUMENTS = [ROOT / "docs" / "getting-started.md", ROOT / "docs" / "tutorial.md"]
BLOCK = re.compile(r"^```(python|sh)\n(.*?)^```", re.DOTALL | re.MULTILINE)
#: The first line of a Python block that is a file of the application.
FILE_LINE = re.compile(r"# ([\w/]+\.py)\n")
#: How long a host may take to lead and catch up, and a host or a command to finish.
DEADLINE = 30.0

# $SHELL for the programs that start one (server.py): it runs a command on the server it was
# given and leaves the result where the test reads it (server.py's own exit code does not
# say how the shell fared).
SHELL_SCRIPT = """#!/bin/sh
eventcore-trio migrate > shell.out 2>&1
echo "exit $?" >> shell.out
echo "$EVENTCORE_DSN" > shell.dsn
"""


def steps() -> list[tuple[str, str, str]]:
    """Every block of the documents, in order: (where, kind, text)."""
    found = []
    for document in DOCUMENTS:
        for number, match in enumerate(BLOCK.finditer(document.read_text()), start=1):
            found.append((f"{document.relative_to(ROOT)}#{number}", match[1], match[2]))
    return found


def _cli() -> list[str]:
    # The installed console script, as a newcomer types it; else the module.
    script = Path(sys.executable).parent / "eventcore-trio"
    return [str(script)] if script.exists() else [sys.executable, "-m", "eventcore_trio.cli"]


async def _caught_up(dsn: str, schema: str) -> bool:
    async with open_postgres_store(dsn, schema=schema, migrate=False) as store:
        units = await store.projection_status()
    # A version that no longer serves is stopped, not behind: it is not waited for.
    # A new version has caught up once it serves (it switches when it has).
    running = [u for u in units if u.state is not ProjectionState.SUPERSEDED]
    return bool(running) and all(
        u.leader is not None and u.checkpoint is not None and u.lag_events == 0 and u.serving
        for u in running
    )


async def _wait_caught_up(dsn: str, schema: str, host: subprocess.Popen[str]) -> None:
    with trio.move_on_after(DEADLINE) as waited:
        while not await _caught_up(dsn, schema):
            assert host.poll() is None, f"the host exited with {host.returncode}"
            await trio.sleep(0.1)
    assert not waited.cancelled_caught, "the host did not catch up"


async def _loans(dsn: str, schema: str) -> tuple[int | None, dict[str, str], bool]:
    # The serving version, its read model, and whether its rows carry version 2's column.
    async with open_postgres_store(dsn, schema=schema, migrate=False) as store:
        version = await store.serving_version("loans-table")
        read_model = await store.read_model_schema("loans-table")
        rows = await store.admin.fetch(f'SELECT * FROM "{read_model}".loans')
    return (
        version,
        {row["book"]: row["member"] for row in rows},
        all(row.get("since") is not None for row in rows),
    )


class Walkthrough:
    """One shell's worth of state while the documents' steps run."""

    def __init__(self, directory: Path, dsn: str) -> None:
        self.directory = directory
        self.dsn = dsn
        shell = directory / "test-shell.sh"
        shell.write_text(SHELL_SCRIPT)
        shell.chmod(0o755)
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("EVENTCORE_") and key not in ("PYTHONPATH",)
        }
        self.env["SHELL"] = str(shell)
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env['PATH']}"
        self.host: subprocess.Popen[str] | None = None
        self.done: list[list[str]] = []
        self.outputs: list[str] = []

    def write(self, where: str, code: str) -> None:
        name = FILE_LINE.match(code)
        if name is None:
            return  # an example of getting-started's, run by tests/test_docs.py
        path = self.directory / name[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code)

    def run_block(self, where: str, text: str) -> None:
        for line in text.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                self.run_step(f"{where}: {line.strip()}", words)

    def run_step(self, where: str, words: list[str]) -> None:
        if words[:2] == ["pip", "install"]:
            return
        self.done.append(words)
        if words[0] == "export":
            name, _, value = words[1].partition("=")
            # The docs' DSN is an example; ours is a database of the test server's own.
            self.env[name] = self.dsn if name == "EVENTCORE_DSN" else value
        elif words[0] == "python":
            self._command(where, [sys.executable, *words[1:]])
        elif words[0] == "eventcore-trio" and words[-1] == "&":
            self._start_host(where, words[1:-1])
        elif words[0] == "eventcore-trio":
            self._command(where, [*_cli(), *words[1:]])
        elif words == ["kill", "%1"]:
            self.stop_host(where)
        else:
            pytest.fail(f"{where}: tests/test_tutorial.py does not know how to run this step")

    def _command(self, where: str, argv: list[str]) -> None:
        done = subprocess.run(
            argv,
            cwd=self.directory,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
        assert done.returncode == 0, f"{where}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        self.outputs.append(done.stdout)

    def _start_host(self, where: str, arguments: list[str]) -> None:
        assert self.host is None, f"{where}: a host is already running"
        self.host = subprocess.Popen(
            [*_cli(), *arguments],
            cwd=self.directory,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # The store's default schema, like the command's, when the docs set none.
            schema = self.env.get("EVENTCORE_SCHEMA", "eventcore")
            trio.run(_wait_caught_up, self.dsn, schema, self.host)
        except BaseException:
            self.host.kill()
            out, err = self.host.communicate()
            print(f"{where}\n{out}{err}")
            raise

    def stop_host(self, where: str) -> None:
        host, self.host = self.host, None
        assert host is not None, f"{where}: no host runs"
        host.send_signal(signal.SIGTERM)
        try:
            out, err = host.communicate(timeout=DEADLINE)
        finally:
            host.kill()
        assert host.returncode == 0, f"{where}: the host exited with {host.returncode}\n{err}"
        assert "stopping" in out
        # Its INFO lines (leading, ...) only: a wrong schema or a failure would warn.
        assert not [line for line in err.splitlines() if not line.startswith("INFO ")], err


@pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
def test_the_tutorial_as_written(postgres_dsn: str, tmp_path: Path) -> None:
    """Getting-started's and the tutorial's steps succeed in order, as a newcomer runs them."""
    with fresh_database(postgres_dsn, "newcomer") as dsn:
        walk = Walkthrough(tmp_path, dsn)
        try:
            for where, kind, text in steps():
                if kind == "python":
                    walk.write(where, text)
                else:
                    walk.run_block(where, text)
        finally:
            if walk.host is not None:
                walk.host.kill()
                walk.host.communicate()
        assert walk.host is None, "a host was left running: the tutorial should stop it"

        # What the steps did, so that a document that loses a step fails here.
        commands = [w[1] for w in walk.done if w[0] == "eventcore-trio"]
        assert {"migrate", "status", "run", "versions", "retire"} <= set(commands), commands
        assert ["python", "server.py"] in walk.done
        assert (tmp_path / "myapp" / "projections.py").exists()
        # server.py started a server of its own and a shell on it.
        shell_out = (tmp_path / "shell.out").read_text()
        assert shell_out.endswith("exit 0\n"), shell_out
        assert "schema 'tutorial' is at version" in shell_out
        assert (tmp_path / "shell.dsn").read_text().strip() not in ("", dsn)
        # Version 2 rebuilt the read model beside version 1 and serves it.
        schema = walk.env["EVENTCORE_SCHEMA"]
        assert schema == "tutorial"
        assert trio.run(_loans, dsn, schema) == (2, {"dune": "ada"}, True)
        assert any("loans-table" in out for out in walk.outputs)
