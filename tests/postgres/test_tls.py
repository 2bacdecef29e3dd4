"""TLS as docs/operations.md ("TLS") promises it: ``sslmode=verify-full`` in the DSN reaches
the driver and is enforced, and a certificate that does not name the host, or that another
authority signed, fails at connect as `StoreConnectionError`, never as a silent downgrade.

A real server with a certificate made for the test by ``openssl``; no mock of the driver.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventcore_trio import NewEvent, StoreConnectionError
from eventcore_trio._tools._embedded import bundled_bindir
from eventcore_trio.postgres import open_postgres_store
from eventcore_trio.testing import EmbeddedPostgres

from ..conftest import oldest_server_param

# The driver's TLS, not the server version's: one server.
pytestmark = pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have openssl to make the TLS test's certificates")
        pytest.skip("needs openssl to make certificates")
    subprocess.run([openssl, *args], cwd=cwd, check=True, capture_output=True)


def _authority(directory: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
        cwd=directory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tls_server(postgres_server: EmbeddedPostgres | str) -> Iterator[tuple[EmbeddedPostgres, Path]]:
    """A server whose certificate names ``localhost`` only, and the directory holding the
    authority that signed it (``ca.crt``) and an unrelated one (``other.crt``)."""
    bindir = postgres_server.bindir if isinstance(postgres_server, EmbeddedPostgres) else None
    directory = Path(tempfile.mkdtemp(prefix="eventcore-tls-"))
    try:
        _authority(directory, "ca")
        _authority(directory, "other")
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", "server.key", "-out", "server.csr", cwd=directory,
        )  # fmt: skip
        (directory / "san.ext").write_text("subjectAltName=DNS:localhost\n")
        _openssl(
            "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt",
            cwd=directory,
        )  # fmt: skip
        server = EmbeddedPostgres(
            bindir or bundled_bindir(),
            settings={
                "ssl": "on",
                "ssl_cert_file": str(directory / "server.crt"),
                "ssl_key_file": str(directory / "server.key"),
            },
        )
        # The server's OS user (postgres, when we are root) must read its key, and no one else.
        directory.chmod(0o755)
        (directory / "server.key").chmod(0o600)
        owner = server.server_user
        if owner is not None:
            os.chown(directory / "server.key", owner.pw_uid, owner.pw_gid)
            os.chown(directory / "server.crt", owner.pw_uid, owner.pw_gid)
        server.start()
        try:
            yield server, directory
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _dsn(server: EmbeddedPostgres, host: str, query: str) -> str:
    parts = urllib.parse.urlsplit(server.dsn)
    netloc = f"{parts.username}:{parts.password}@{host}:{server.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


async def test_verify_full_connects_to_the_named_host_and_refuses_the_rest(
    tls_server: tuple[EmbeddedPostgres, Path],
) -> None:
    server, directory = tls_server
    ca, other = directory / "ca.crt", directory / "other.crt"

    good = _dsn(server, "localhost", f"sslmode=verify-full&sslrootcert={ca}")
    async with open_postgres_store(good, schema="tls_ok", connect_timeout=5) as store:
        await store.append("s", [NewEvent("E", {})])
        assert await store.admin.fetchval(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )

    refused = {
        # The certificate names localhost, not the address.
        "another name": _dsn(server, "127.0.0.1", f"sslmode=verify-full&sslrootcert={ca}"),
        # Signed by an authority the client does not trust.
        "another authority": _dsn(server, "localhost", f"sslmode=verify-full&sslrootcert={other}"),
        "verify-ca, another authority": _dsn(
            server, "localhost", f"sslmode=verify-ca&sslrootcert={other}"
        ),
    }
    for case, dsn in refused.items():
        with pytest.raises(StoreConnectionError):
            async with open_postgres_store(dsn, schema="tls_no", connect_timeout=5):
                pytest.fail(f"connected despite {case}")


async def test_a_server_without_tls_is_no_silent_downgrade(postgres_dsn: str) -> None:
    # The suite's server has ssl off: require and verify-full refuse it.
    for mode in ("require", "verify-full"):
        with pytest.raises(StoreConnectionError):
            async with open_postgres_store(f"{postgres_dsn}?sslmode={mode}", connect_timeout=5):
                pytest.fail(f"sslmode={mode} connected without TLS")
