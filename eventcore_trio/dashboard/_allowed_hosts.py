"""The dashboard's Host allow-list: the defence against DNS rebinding.

A page on ``http://attacker.example:8000`` can rebind its own name to 127.0.0.1. The browser
then sends the page's requests to the dashboard and lets the page read the answers (same
origin: the name did not change), so it could read ``/status.json`` and, with actions
allowed, post them. The Host header still says ``attacker.example``, though: answering only
Host names the dashboard knows as its own closes the hole.

A Host that is the IP address the request arrived on is accepted too. It is no rebinding
vector: a browser only sends it to a page whose own origin is that address, and it lets
Prometheus scrape a dashboard bound to 0.0.0.0 by whichever address it has (a pod's IP, say).
Ports are not compared: a rebinding page can use the dashboard's port, so a port proves
nothing, and a proxy or a port mapping may change it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Final

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .._errors import ConfigurationError

#: Always accepted: the loopback names.
LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})

# One DNS label: letters, digits, hyphens inside, underscores (some internal names have them).
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def normal_host(name: str) -> str | None:
    """*name* (a host without a port, IPv6 with or without brackets) in the form compared,
    or None when it is no host name or IP address."""
    name = name.lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    address = _address(name)
    if address is not None:
        return address
    # "localhost." and "localhost" are the same name.
    name = name.removesuffix(".")
    return name if len(name) <= 253 and _NAME.fullmatch(name) else None


def allowed_host_name(name: object) -> str:
    """One name to accept in the Host header, checked and normalised.

    Raises:
        ConfigurationError: *name* is not a host name or an IP address without a port.
    """
    normal = normal_host(name) if isinstance(name, str) else None
    if normal is None:
        raise ConfigurationError(
            "an allowed host must be a host name or an IP address without a port or a "
            f"scheme, e.g. dashboard.example.com or 10.0.0.5; got {name!r}"
        )
    return normal


def allowed_host_names(names: Iterable[object]) -> frozenset[str]:
    """The loopback names and *names* (checked): the Host names a dashboard answers.

    Raises:
        ConfigurationError: one of *names* is not a host name or an IP address.
    """
    if isinstance(names, str):
        raise ConfigurationError(
            f"allowed hosts must be a list of names, not one string; got {names!r}"
        )
    return LOOPBACK_NAMES | {allowed_host_name(name) for name in names}


def host_of(header: str) -> str | None:
    """The host name a Host header names (``"name"``, ``"name:port"``, ``"[::1]:port"``),
    normalised, or None when the header is malformed."""
    if header.startswith("["):
        end = header.find("]")
        name, rest = header[: end + 1], header[end + 1 :]
        if end < 0 or not (rest == "" or rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        name, colon, port = header.partition(":")
        if colon and not port:
            return None
    if port and not port.isdigit():
        return None
    return normal_host(name) if name else None


def host_allowed(header: str | None, allowed: frozenset[str], local: str | None = None) -> bool:
    """Whether a request with Host *header* may be answered.

    Args:
        header: the Host header, or None when the request had none.
        allowed: normalised names (see `allowed_host_names`).
        local: the IP address the request arrived on, if known: a Host naming it is accepted.
    """
    name = None if header is None else host_of(header)
    if name is None:
        return False
    if name in allowed:
        return True
    # Only an address literal: a name the request arrived "on" proves nothing.
    return local is not None and name == _address(local)


def _address(text: str) -> str | None:
    # An IP address in its canonical form; an IPv4 address as such even when a dual-stack
    # socket (bound to ::) reports it IPv4-mapped, as ::ffff:10.0.0.5.
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


class HostCheck:
    """ASGI middleware answering 400, and passing nothing on, to a request whose Host header
    is not one of the dashboard's names."""

    def __init__(self, app: ASGIApp, *, allowed: frozenset[str]) -> None:
        self._app = app
        # Normalised names the Host header may carry (loopback names always among them).
        self._allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self._app(scope, receive, send)
            return
        hosts = [value for key, value in scope["headers"] if key == b"host"]
        header = hosts[0].decode("latin-1") if len(hosts) == 1 else None
        server = scope.get("server")
        local = server[0] if isinstance(server, tuple | list) and server else None
        if host_allowed(header, self._allowed, local if isinstance(local, str) else None):
            await self._app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        response = JSONResponse(
            {
                "error": f"this dashboard does not answer to the host {header!r}; if that "
                "is its name, start it with --allowed-host NAME (allowed_hosts=[NAME])"
            },
            status_code=400,
        )
        await response(scope, receive, send)
