"""A throwaway PostgreSQL server for the demo, the test suite and the benchmarks.

It runs the binaries bundled by the ``pgserver`` package (PostgreSQL 16, the ``embedded``
extra) or a system installation (for example Debian's ``/usr/lib/postgresql/15/bin``) in a
temporary data directory, listening on a free loopback port. PostgreSQL refuses to run as root,
so when this process is root the server runs as the ``postgres`` user if it exists, else as an
``eventcore`` system user created for the purpose.

Only its owner can reach it: every connection, over TCP or the Unix socket, replication included,
authenticates with SCRAM and a random password made for this server alone, which only `dsn`
carries; the socket sits in a directory only the server's OS user can enter. (A trust-auth
superuser on 127.0.0.1 would give every local account a shell as the server's OS user through
``COPY ... FROM PROGRAM``.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Final, final

from .._errors import ConfigurationError

# Throwaway servers trade durability for speed: nothing here outlives the process.
FAST_SETTINGS: Final[Mapping[str, str]] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
_DEFAULT_SETTINGS: Final[Mapping[str, str]] = {
    "max_connections": "200",
    "shared_buffers": "128MB",
    "log_min_messages": "warning",
    # Two-phase commit, so that prepared transactions that append can be tested.
    "max_prepared_transactions": "8",
}


def bundled_bindir() -> Path | None:
    """The bin directory of the ``pgserver`` package's PostgreSQL, if it is installed."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return path if (path / "postgres").exists() else None


def system_bindirs() -> dict[int, Path]:
    """System PostgreSQL installations by major version (Debian/Ubuntu layout)."""
    found: dict[int, Path] = {}
    for candidate in Path("/usr/lib/postgresql").glob("*/bin"):
        if candidate.parent.name.isdigit() and (candidate / "postgres").exists():
            found[int(candidate.parent.name)] = candidate
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "eventcore"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "eventcore"],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam("eventcore")


def _make_traversable(path: Path) -> None:
    # When root runs the server as another user, that user must reach the binaries; a venv
    # inside a 0700 home directory would hide them.
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o005 != 0o005:
            parent.chmod(mode | 0o005)


@final
class EmbeddedPostgres:
    """A PostgreSQL server in a temporary directory; start, stop, restart, kill, clean up.

    Args:
        bindir: the PostgreSQL bin directory; default: pgserver's bundled server, else the
            newest system installation.
        settings: extra server settings (``-c name=value``).

    Use it as a context manager, or call `start` and `cleanup`. Connect with `dsn`: every
    connection needs the server's random password, which the DSN carries (keep it out of
    logs and command lines); the Unix socket in `socket_dir` is for its OS user (and root).

    .. versionadded:: 0.1
    """

    def __init__(
        self, bindir: Path | None = None, *, settings: Mapping[str, str] | None = None
    ) -> None:
        if bindir is None:
            bindir = bundled_bindir()
        if bindir is None:
            system = system_bindirs()
            bindir = system[max(system)] if system else None
        if bindir is None:
            raise ConfigurationError(
                "no PostgreSQL server binaries found: install the 'embedded' extra "
                "(pip install 'eventcore-trio[embedded]') or a system PostgreSQL, or pass a DSN"
            )
        self.bindir = bindir
        self.settings = {**_DEFAULT_SETTINGS, **(settings or {})}
        self.port = _free_port()
        self._user = _server_user()
        # Per server, never on a command line: initdb reads it from a file only the server's
        # user can read, clients from `dsn`, child processes (pg_basebackup) from their
        # environment, which only the same user (and root) can read.
        self._password = secrets.token_urlsafe(32)
        # mkdtemp makes it 0700: the data, the log and the socket stay the server user's.
        self._root = Path(tempfile.mkdtemp(prefix="eventcore-pg-"))
        self.data_dir = self._root / "data"
        self._log = self._root / "server.log"
        self._initialised = False
        if self._user is not None:
            _make_traversable(self.bindir)
            # Only the parents: the server's user must reach its directory, nobody else
            # may enter it (root, the only other user that connects over the socket, can).
            _make_traversable(self._root.parent)
            os.chown(self._root, self._user.pw_uid, self._user.pw_gid)

    @classmethod
    def standby_of(cls, primary: EmbeddedPostgres) -> EmbeddedPostgres:
        """A streaming hot standby of *primary*, made from a base backup of it (not started:
        call `start`). *primary* must be running.

        .. versionadded:: 0.3
        """
        standby = cls(primary.bindir, settings=primary.settings)
        # The backup copies the primary's roles, so the standby has the primary's password.
        standby._password = primary._password
        # The password goes through the environment (never argv, which every user can read),
        # and pg_basebackup writes it into the standby's primary_conninfo, in its private
        # data directory, so that the standby can stream from the primary.
        standby._run(
            str(standby.bindir / "pg_basebackup"),
            "-D",
            str(standby.data_dir),
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "--write-recovery-conf",
            "--wal-method=stream",
            env={"PGPASSWORD": primary._password},
        )
        standby._initialised = True
        return standby

    @property
    def server_user(self) -> pwd.struct_passwd | None:
        """The OS user the server runs as when this process is root (PostgreSQL refuses to
        run as root), or None: then it runs as this process's user. Files the server must
        read, such as a TLS key, must belong to it."""
        return self._user

    @property
    def socket_dir(self) -> Path:
        """The directory of the server's Unix socket (``host=`` in a DSN; the password is
        needed there too). Mode 0700, owned by the server's OS user: only that user and root
        can reach the socket; other clients use `dsn` (TCP on 127.0.0.1)."""
        return self._root

    @property
    def dsn(self) -> str:
        """A DSN for the ``postgres`` database as the ``postgres`` superuser, with this
        server's password: treat it as a secret (pass it to child processes through their
        environment, never their command line, and do not log it)."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        """A DSN for *database* on this server, with its password (see `dsn`)."""
        password = urllib.parse.quote(self._password, safe="")
        return f"postgresql://postgres:{password}@127.0.0.1:{self.port}/{database}"

    def _run(
        self, *args: str, check: bool = True, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args),
            check=check,
            capture_output=True,
            text=True,
            env=None if env is None else {**os.environ, **env},
            user=None if self._user is None else self._user.pw_uid,
            group=None if self._user is None else self._user.pw_gid,
            cwd=self._root,
        )

    @property
    def version(self) -> int:
        """The server's major version."""
        out = self._run(str(self.bindir / "postgres"), "--version").stdout
        match = re.search(r"(\d+)(?:\.\d+)?", out)
        assert match is not None, out
        return int(match[1])

    def start(self) -> None:
        """Initialise the data directory if needed and start the server; waits until ready."""
        if not self._initialised:
            self._initdb()
            self._initialised = True
        options = [f"-p {self.port}", "-c listen_addresses=127.0.0.1", f"-k {self._root}"]
        options += [f"-c {name}={value}" for name, value in self.settings.items()]
        try:
            self._run(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self._log),
                "-o",
                " ".join(options),
                "-w",
                "-t",
                "60",
                "start",
            )
        except subprocess.CalledProcessError as exc:
            log = self._log.read_text() if self._log.exists() else ""
            raise RuntimeError(f"PostgreSQL failed to start: {exc.stderr}\n{log}") from exc

    def _initdb(self) -> None:
        # SCRAM for every connection, local and host, replication included (--auth sets
        # all of initdb's pg_hba.conf lines); initdb reads the password from a file that only
        # the server's user can read, removed as soon as initdb is done.
        pwfile = self._root / "pwfile"
        descriptor = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(descriptor, "w") as file:
                if self._user is not None:
                    os.fchown(file.fileno(), self._user.pw_uid, self._user.pw_gid)
                file.write(self._password + "\n")
            self._run(
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--no-sync",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``pg_ctl stop -m mode``) and wait for it."""
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-m",
            mode,
            "-w",
            "stop",
            check=False,
        )

    def restart(self) -> None:
        """Stop and start again on the same port and data directory."""
        self.stop()
        self.start()

    @property
    def postmaster_pid(self) -> int | None:
        """The server's process id, or None when it is not running."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
        except (FileNotFoundError, IndexError):
            return None
        return int(first)

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would, and wait for its children to go."""
        pid = self.postmaster_pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)

    def cleanup(self) -> None:
        """Stop the server (immediately) and delete its directory."""
        self.stop("immediate")
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()
