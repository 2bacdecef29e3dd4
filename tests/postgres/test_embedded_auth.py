"""The embedded server is reachable only by its owner (issue 32).

It used to trust every connection on 127.0.0.1 and its socket: any local account was a
superuser, and through ``COPY ... FROM PROGRAM`` a shell as the server's OS user. Now every
connection needs the random password that only `EmbeddedPostgres.dsn` carries, which never
shows on a command line or stays in a file, and the socket sits in a private directory.
"""

from __future__ import annotations

import contextlib
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eventcore_trio import AuthenticationFailed
from eventcore_trio._tools._embedded import bundled_bindir
from eventcore_trio.postgres import _bridge
from eventcore_trio.testing import EmbeddedPostgres

from ..conftest import oldest_server_param

# Version-independent: one server only.
pytestmark = pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)


class _Started:
    """A server started (and a standby backed up from it) while every command line that
    `EmbeddedPostgres` ran was recorded."""

    def __init__(self, server: EmbeddedPostgres, argvs: list[list[str]]) -> None:
        self.server = server
        self.argvs = argvs
        self.password = urllib.parse.unquote(urllib.parse.urlsplit(server.dsn).password or "")


@pytest.fixture(scope="module")
def started(postgres_server: EmbeddedPostgres | str) -> Iterator[_Started]:
    """A fresh server of the version under test, its start and a base backup recorded."""
    bindir = postgres_server.bindir if isinstance(postgres_server, EmbeddedPostgres) else None
    argvs: list[list[str]] = []
    real_run = subprocess.run

    def recording_run(args: list[str], *rest: Any, **options: Any) -> Any:
        # A spy, not a mock: every command still runs; we only keep its argv to inspect.
        argvs.append(list(args))
        return real_run(args, *rest, **options)

    server = EmbeddedPostgres(bindir or bundled_bindir())
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(subprocess, "run", recording_run)
            server.start()
            # pg_basebackup is the one child that must authenticate: its argv counts too.
            EmbeddedPostgres.standby_of(server).cleanup()
        yield _Started(server, argvs)
    finally:
        server.cleanup()


async def _current_user(dsn: str) -> str:
    async with _bridge.asyncio_loop():
        connection = await _bridge.connect(dsn, application_name="auth check", connect_timeout=10)
        try:
            return str(await connection.fetchval("SELECT current_user"))
        finally:
            await connection.close()


def _socket_dsn(server: EmbeddedPostgres, password: str | None) -> str:
    secret = "" if password is None else ":" + urllib.parse.quote(password, safe="")
    return f"postgresql://postgres{secret}@/postgres?host={server.socket_dir}&port={server.port}"


async def test_without_the_password_nobody_connects(started: _Started) -> None:
    """No password or a wrong one, over TCP or over the socket: authentication fails (with
    trust auth each of these was a superuser session), and the error does not echo it."""
    server = started.server
    tcp = f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
    wrong = "not-" + started.password
    attempts = {
        "TCP, no password": tcp,
        "TCP, wrong password": tcp.replace("postgres@", f"postgres:{wrong}@", 1),
        "socket, no password": _socket_dsn(server, None),
        "socket, wrong password": _socket_dsn(server, wrong),
    }
    for how, dsn in attempts.items():
        with pytest.raises(AuthenticationFailed) as refused:
            await _current_user(dsn)
        assert "password authentication failed" in str(refused.value), how
        assert started.password not in str(refused.value), how


async def test_with_the_dsn_it_connects(started: _Started) -> None:
    """The DSN (TCP on 127.0.0.1), and the socket with the password, are the superuser."""
    assert await _current_user(started.server.dsn) == "postgres"
    assert await _current_user(_socket_dsn(started.server, started.password)) == "postgres"


def test_the_socket_directory_is_private(started: _Started) -> None:
    """Mode 0700, owned by the server's OS user: no other account reaches the socket."""
    server = started.server
    status = server.socket_dir.stat()
    assert status.st_mode & 0o777 == 0o700
    pid = server.postmaster_pid
    assert pid is not None
    assert status.st_uid == Path(f"/proc/{pid}").stat().st_uid
    assert any(entry.name.startswith(".s.PGSQL.") for entry in server.socket_dir.iterdir())


def test_the_password_is_on_no_command_line_and_in_no_file(started: _Started) -> None:
    """A random password of at least 32 characters; not in the argv of initdb, pg_ctl,
    postgres or pg_basebackup, nor of any running process; no file the server keeps holds
    it in clear (initdb's pwfile is gone, the log never shows it)."""
    password = started.password.encode()
    assert len(password) >= 32
    assert any("initdb" in argv[0] for argv in started.argvs)
    assert any("pg_basebackup" in argv[0] for argv in started.argvs)
    leaked = [argv[0] for argv in started.argvs if any(password.decode() in a for a in argv)]
    assert leaked == []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            assert password not in cmdline.read_bytes(), cmdline
    root = started.server.socket_dir
    assert not (root / "pwfile").exists()
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and not path.name.startswith(".s.PGSQL."):
            with contextlib.suppress(FileNotFoundError):
                assert password not in path.read_bytes(), path
