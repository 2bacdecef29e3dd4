"""A TCP proxy in front of PostgreSQL that can cut the network: drop or stall connections.

The torture run puts one in front of each projector host, so a fault can cut one host off
without touching the others. It forwards bytes and nothing else: it does not parse the
protocol, so what a client sees is what a real network failure looks like from its side.
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import urllib.parse
from typing import final

import attrs
import trio

from .._errors import ConfigurationError


@attrs.frozen
class ServerAddress:
    """Where PostgreSQL listens: a TCP host and port, or a Unix socket directory and port."""

    host: str
    port: int

    @property
    def is_unix(self) -> bool:
        """True when *host* is a socket directory (libpq's convention: it starts with /)."""
        return self.host.startswith("/")


_KEYWORD = re.compile(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S*)")


def server_address(dsn: str) -> ServerAddress:
    """The server address in *dsn* (URL or ``key=value`` form; defaults as libpq's).

    Raises:
        ConfigurationError: *dsn* names several hosts, which a proxy cannot stand in for.
    """
    if "://" in dsn:
        url = urllib.parse.urlsplit(dsn)
        query = urllib.parse.parse_qs(url.query)
        host = url.hostname or query.get("host", [""])[0]
        port_text = str(url.port) if url.port else query.get("port", ["5432"])[0]
    else:
        fields = {key: value.strip("'") for key, value in _KEYWORD.findall(dsn)}
        host = fields.get("host", "")
        port_text = fields.get("port", "5432")
    if "," in host or "," in port_text:
        raise ConfigurationError(
            f"the DSN names several hosts ({host!r}); give the proxy a single-server DSN"
        )
    return ServerAddress(host or "/var/run/postgresql", int(port_text))


def rewrite_dsn(dsn: str, port: int) -> str:
    """*dsn* with its server replaced by ``127.0.0.1:port`` (the proxy), all else kept."""
    if "://" in dsn:
        url = urllib.parse.urlsplit(dsn)
        query = [
            (key, value)
            for key, value in urllib.parse.parse_qsl(url.query)
            if key not in ("host", "port")
        ]
        userinfo, _, _ = url.netloc.rpartition("@")
        netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
        return urllib.parse.urlunsplit(
            (url.scheme, netloc, url.path, urllib.parse.urlencode(query), url.fragment)
        )
    kept = [m.group(0) for m in _KEYWORD.finditer(dsn) if m.group(1) not in ("host", "port")]
    return " ".join([*kept, "host=127.0.0.1", f"port={port}"])


@final
class NetworkProxy:
    """Forward TCP connections to a PostgreSQL server, and cut them on demand.

    Start it with ``port = await nursery.start(proxy.serve)``, then point clients at
    `dsn` (or ``rewrite_dsn(dsn, port)``). `drop` resets every connection at once, as a
    crashed router would; `stall` stops all traffic, new connections included, until `resume`,
    as a partition would. Cancel the nursery to stop it; every connection is closed.

    .. versionadded:: 0.1
    """

    def __init__(self, dsn: str) -> None:
        self._target = server_address(dsn)
        self._dsn = dsn
        self._port: int | None = None
        # One cancel scope per forwarded connection; cancelling it resets both sides.
        self._connections: set[trio.CancelScope] = set()
        self._flowing = trio.Event()
        self._flowing.set()

    @property
    def port(self) -> int:
        """The loopback port the proxy listens on (once started)."""
        if self._port is None:
            raise RuntimeError("the proxy is not serving yet; start it with nursery.start")
        return self._port

    @property
    def dsn(self) -> str:
        """The target DSN rewritten to connect through this proxy."""
        return rewrite_dsn(self._dsn, self.port)

    @property
    def connections(self) -> int:
        """How many connections are being forwarded now."""
        return len(self._connections)

    @property
    def stalled(self) -> bool:
        """True between `stall` and `resume`."""
        return not self._flowing.is_set()

    def drop(self) -> int:
        """Reset every forwarded connection, both sides; return how many there were."""
        dropped = len(self._connections)
        for scope in list(self._connections):
            scope.cancel()
        return dropped

    def stall(self) -> None:
        """Stop forwarding bytes, and hold new connections unanswered, until `resume`."""
        if self._flowing.is_set():
            self._flowing = trio.Event()

    def resume(self) -> None:
        """Forward again; bytes held back by `stall` go through, in order."""
        self._flowing.set()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and forward connections until cancelled; ``nursery.start`` gives the port."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self._port = int(listeners[0].socket.getsockname()[1])
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._forward, listeners)
            task_status.started(self._port)

    async def _open_target(self) -> trio.abc.Stream:
        if self._target.is_unix:
            path = f"{self._target.host}/.s.PGSQL.{self._target.port}"
            return await trio.open_unix_socket(path)
        return await trio.open_tcp_stream(self._target.host, self._target.port)

    async def _forward(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._connections.add(scope)
            try:
                # A stalled network answers nothing, not even the start of a connection.
                await self._flowing.wait()
                try:
                    server = await self._open_target()
                except OSError:
                    return  # the client is reset below, as a refused connection would be
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                        nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
                finally:
                    _reset(server)
            finally:
                self._connections.discard(scope)
                _reset(client)

    async def _pump(
        self, source: trio.abc.Stream, sink: trio.abc.Stream, done: trio.CancelScope
    ) -> None:
        try:
            while True:
                data = await source.receive_some(65536)
                await self._flowing.wait()
                if not data:
                    break
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        # One side closed: close both, as a TCP proxy does.
        done.cancel()


def _reset(stream: trio.abc.Stream) -> None:
    # Close with SO_LINGER 0, so the peer gets a reset (as from a failed network) rather than
    # an orderly end of stream.
    if isinstance(stream, trio.SocketStream):
        with contextlib.suppress(OSError):
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()
