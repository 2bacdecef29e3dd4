"""A throwaway PgBouncer in front of a test server, configured from docs/operations.md.

The ``[pgbouncer]`` settings and the two pools (``app``: transaction pooling, ``app_sessions``:
session pooling) come from the ``pgbouncer.ini`` block of the operations guide, so the
configuration users copy is the one the tests run; only hosts, ports, authentication and files
are filled in here. PgBouncer authenticates its clients with SCRAM against an ``auth_file``
holding the server's user and password (as the embedded server does: no local account may pass
through it as the superuser), and logs in to the server with the same password. PgBouncer
refuses to run as root, so as root it runs as the ``postgres`` user, as the embedded servers
do.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).parent.parent
GUIDE: Final = ROOT / "docs" / "operations.md"
_INI_BLOCK: Final = re.compile(r"^```ini\n(; pgbouncer\.ini.*?)^```", re.DOTALL | re.MULTILINE)


def binary() -> str | None:
    """The pgbouncer executable, if installed."""
    return shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
    )


def documented_config() -> configparser.ConfigParser:
    """The pgbouncer.ini block of docs/operations.md, parsed."""
    match = _INI_BLOCK.search(GUIDE.read_text())
    assert match is not None, "docs/operations.md lost its pgbouncer.ini block"
    config = configparser.ConfigParser(interpolation=None)
    config.read_string(match[1])
    return config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgBouncer:
    """PgBouncer in front of the server at *server_dsn*, with the documented pools.

    *settings* replace documented ``[pgbouncer]`` settings, for a test that makes PgBouncer
    misbehave on purpose (a server reset that waits, a smaller pool).
    """

    def __init__(self, server_dsn: str, *, settings: Mapping[str, str] | None = None) -> None:
        self._server = urllib.parse.urlsplit(server_dsn)
        self._overrides = dict(settings or {})
        self.port = _free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="eventcore-pgbouncer-"))
        self._process: subprocess.Popen[bytes] | None = None
        self._user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None

    def dsn(self, pool: str) -> str:
        """A DSN for one of the documented pools (``app`` or ``app_sessions``), with the
        server's password (PgBouncer checks it)."""
        password = "" if self._server.password is None else f":{self._server.password}"
        user = self._server.username or "postgres"
        return f"postgresql://{user}{password}@127.0.0.1:{self.port}/{pool}"

    def _write_auth_file(self) -> Path:
        # userlist.txt format: "user" "password", the password in clear so that PgBouncer can
        # both check a client's SCRAM exchange and log in to the server; mode 0600,
        # in a 0700 directory of the user PgBouncer runs as.
        user = self._server.username or "postgres"
        password = urllib.parse.unquote(self._server.password or "")
        path = self._dir / "userlist.txt"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(f'"{user}" "{password.replace(chr(34), chr(34) * 2)}"\n')
        return path

    def _write_config(self) -> Path:
        config = documented_config()
        server = self._server
        target = [
            f"host={server.hostname}",
            f"port={server.port or 5432}",
            f"dbname={server.path.lstrip('/') or 'postgres'}",
            f"user={server.username or 'postgres'}",
        ]
        if server.password:
            target.append(f"password={urllib.parse.unquote(server.password)}")
        for pool, entry in list(config["databases"].items()):
            # Keep the documented pool mode; point the pool at the test server.
            modes = [part for part in entry.split() if part.startswith("pool_mode=")]
            config["databases"][pool] = " ".join([*target, *modes])
        settings = config["pgbouncer"]
        settings.update(self._overrides)
        settings.update(
            {
                "listen_addr": "127.0.0.1",
                "listen_port": str(self.port),
                "unix_socket_dir": "",
                "logfile": str(self._dir / "pgbouncer.log"),
                "pidfile": "",
            }
        )
        if server.password:
            settings.update(
                {"auth_type": "scram-sha-256", "auth_file": str(self._write_auth_file())}
            )
        else:
            # An external test server given without a password trusts local connections:
            # there is nothing for PgBouncer to check either.
            settings["auth_type"] = "any"
        path = self._dir / "pgbouncer.ini"
        with path.open("w") as file:
            config.write(file)
        return path

    def start(self) -> None:
        """Start PgBouncer and wait until it accepts connections."""
        executable = binary()
        assert executable is not None, "pgbouncer is not installed (apt-get install pgbouncer)"
        path = self._write_config()
        if self._user is not None:
            for entry in (self._dir, *self._dir.iterdir()):
                os.chown(entry, self._user.pw_uid, self._user.pw_gid)
        self._process = subprocess.Popen(
            [executable, str(path)],
            user=None if self._user is None else self._user.pw_uid,
            group=None if self._user is None else self._user.pw_gid,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self._process.poll() is None, self.log()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        raise AssertionError(f"PgBouncer did not start:\n{self.log()}")

    def log(self) -> str:
        """PgBouncer's log so far."""
        path = self._dir / "pgbouncer.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        """Stop PgBouncer and delete its directory."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
