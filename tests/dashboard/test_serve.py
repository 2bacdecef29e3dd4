"""Starting the dashboard where it cannot listen: a clear error before anything starts
(exit 2 from the command line, never a traceback)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from functools import partial

import pytest
import trio

from eventcore_trio import ConfigurationError
from eventcore_trio.cli import EXIT_USAGE, main
from eventcore_trio.dashboard import serve_dashboard
from eventcore_trio.dashboard._serve import check_listen
from eventcore_trio.memory import open_memory_store

#: A DSN nothing listens on: these errors must come before any connection is tried.
NO_DATABASE = "postgresql://nobody@127.0.0.1:1/none"


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another server listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def unlistenable(port: int) -> list[tuple[str, str]]:
    """Binds that cannot be listened on, with what the error must say."""
    return [
        (f"127.0.0.1:{port}", f"port {port} is in use"),
        # TEST-NET-3 (RFC 5737), for documentation: not an address of this machine.
        ("203.0.113.7:8000", "203.0.113.7 is not an address of this machine"),
        # .invalid never resolves (RFC 6761).
        ("no-such-host.invalid:8000", "the host name 'no-such-host.invalid' does not resolve"),
    ]


async def test_binds_that_cannot_be_listened_on_are_configuration_errors(busy_port: int) -> None:
    """`check_listen` and `serve_dashboard` raise `ConfigurationError` saying why and what to
    do; the port in use stays its owner's, and a free port passes."""
    for bind, why in unlistenable(busy_port):
        with pytest.raises(ConfigurationError, match=why) as info:
            await check_listen(bind)
        assert str(info.value).startswith(f"cannot listen on {bind}: ")
    async with open_memory_store() as store, trio.open_nursery() as nursery:
        for bind, why in unlistenable(busy_port):
            with pytest.raises(ConfigurationError, match=why):
                await nursery.start(partial(serve_dashboard, store, bind=bind))
    await check_listen("127.0.0.1:0")


def test_the_command_exits_2_with_the_reason(
    busy_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """``eventcore-trio dashboard --bind`` on a port in use, an address of another machine
    or an unknown host, or with a malformed ``--allowed-host``: exit 2 and one line saying
    why, no traceback, before connecting to the database."""
    cases = [*unlistenable(busy_port), ("127.0.0.1:0", "without a port")]
    for bind, why in cases:
        argv = ["dashboard", "--dsn", NO_DATABASE, "--bind", bind]
        if bind.endswith(":0"):
            argv += ["--allowed-host", "localhost", "--allowed-host", "dash.example:8000"]
        assert main(argv) == EXIT_USAGE, bind
        err = capsys.readouterr().err
        assert why in err
        assert err.startswith("eventcore-trio: ")
        assert "Traceback" not in err
