"""Serving the dashboard with hypercorn's Trio worker."""

from __future__ import annotations

import errno
import functools
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from .._errors import ConfigurationError
from .._protocols import ProjectionAdmin
from ._allowed_hosts import allowed_host_names, normal_host
from ._app import dashboard_app
from ._state import DashboardState, poll_status
from ._token import action_token, check_action_token

logger = logging.getLogger("eventcore_trio.dashboard")


def check_bind(bind: object) -> str:
    """A ``host:port`` to listen on, checked."""
    if not isinstance(bind, str) or ":" not in bind:
        raise ConfigurationError(f"bind must be HOST:PORT, e.g. 127.0.0.1:8000; got {bind!r}")
    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigurationError(f"bind must be HOST:PORT, e.g. 127.0.0.1:8000; got {bind!r}")
    return bind


def _bind_host(bind: str) -> str:
    return bind.rpartition(":")[0].removeprefix("[").removesuffix("]")


def _bind_error(bind: str, exc: OSError) -> ConfigurationError:
    """What to tell an operator whose *bind* the system refused with *exc*."""
    host, port = _bind_host(bind), bind.rpartition(":")[2]
    if isinstance(exc, socket.gaierror):
        why = (
            f"the host name {host!r} does not resolve ({exc.strerror}); give an IP address "
            "of this machine, or a name that resolves to one"
        )
    elif exc.errno == errno.EADDRINUSE:
        why = (
            f"port {port} is in use on {host} (another dashboard?); choose another port, or "
            "port 0 for any free one"
        )
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = (
            f"{host} is not an address of this machine; give one of its addresses, "
            "127.0.0.1, or 0.0.0.0 for all of them"
        )
    elif exc.errno == errno.EACCES:
        why = f"port {port} needs privileges this process lacks; choose a port from 1024 up"
    else:
        why = exc.strerror or str(exc)
    return ConfigurationError(f"cannot listen on {bind}: {why}")


def _try_bind(bind: str) -> None:
    # What hypercorn's Config.create_sockets does for HOST:PORT (the family from the host's
    # form, SO_REUSEADDR, bind; the name resolved by bind), undone at once. Not that method
    # itself: it leaves the socket open when bind fails.
    host, _, port = bind.replace("[", "").replace("]", "").rpartition(":")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))


async def check_listen(bind: str) -> None:
    """Check that *bind* (``HOST:PORT``, checked by `check_bind`) can be listened on, by
    binding it and letting go: an unknown host name, an address of another machine or a
    port in use is a `ConfigurationError` before anything starts.

    A checkpoint (name resolution runs in a thread). Another process may still take the
    port before the dashboard does; hypercorn's own error then ends `serve_dashboard`.
    """
    try:
        await trio.to_thread.run_sync(_try_bind, check_bind(bind))
    except OSError as exc:
        raise _bind_error(bind, exc) from exc


async def serve_dashboard(
    store: ProjectionAdmin,
    *,
    bind: str = "127.0.0.1:8000",
    allow_actions: bool = False,
    projectors: Sequence[object] = (),
    allowed_hosts: Iterable[str] = (),
    action_token: str | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the dashboard for *store* until cancelled.

    Started with ``await nursery.start(serve_dashboard, store)``, it reports the URLs it
    listens on. It listens on 127.0.0.1 unless *bind* says otherwise (``0.0.0.0:8000``
    shows it to the network: reading needs no authentication). Read-only unless
    *allow_actions*, which needs *action_token*: the secret each reset or replay must carry
    (``Authorization: Bearer``; the page asks for it). Dead letters can then be replayed for
    the *projectors* given.

    It answers only requests whose Host header names it: localhost, 127.0.0.1, ::1, the
    host of *bind*, the address a request arrived on, and *allowed_hosts* (names or
    addresses without a port, such as the name your proxy forwards); others get 400 (see
    `dashboard_app`).

    Raises:
        ConfigurationError: *bind* is malformed, names an unknown host or an address of
            another machine, or its port is in use; an allowed host is malformed;
            *allow_actions* without an *action_token*, or one shorter than 16 characters.
            Raised before anything is served.

    .. versionadded:: 0.3
    """
    config = Config()
    config.bind = [check_bind(bind)]
    names = allowed_host_names(allowed_hosts)
    if allow_actions and action_token is None:
        raise ConfigurationError(
            "allow_actions needs action_token, the secret each action must carry (e.g. "
            "secrets.token_urlsafe(32)): without it any local process could reset projections"
        )
    token = None if action_token is None else check_action_token(action_token)
    await check_listen(bind)
    # The name or address it was told to listen on is one of its names too.
    bound = normal_host(_bind_host(bind))
    if bound is not None:
        names |= {bound}
    config.accesslog = None
    config.errorlog = logging.getLogger("eventcore_trio.dashboard.http")
    state = DashboardState(allow_actions=allow_actions)
    async with trio.open_nursery() as nursery:
        await nursery.start(poll_status, store, state)
        # Starlette is an ASGI app; hypercorn's annotations spell ASGI more narrowly.
        app: Any = dashboard_app(store, state, projectors, allowed_hosts=names, action_token=token)
        urls: list[str] = await nursery.start(functools.partial(serve, app, config, mode="asgi"))
        logger.info("dashboard at %s", ", ".join(urls))
        task_status.started(urls)


async def run_dashboard(
    open_store: Callable[[], AbstractAsyncContextManager[ProjectionAdmin]],
    *,
    bind: str,
    allow_actions: bool,
    projectors: Sequence[object],
    allowed_hosts: Iterable[str],
    action_token_file: str | None,
    on_ready: Callable[[list[str]], None],
) -> None:
    """What ``eventcore-trio dashboard`` runs: check the options, open the store with
    *open_store*, serve the dashboard until cancelled, and call *on_ready* with its URLs.

    The action token comes from *action_token_file*, else the ``EVENTCORE_DASHBOARD_TOKEN``
    environment variable (only with *allow_actions*); the rest is as `serve_dashboard`.

    Raises:
        ConfigurationError: as `serve_dashboard`, or the token is missing or not valid; raised
            before the store is opened, so that bad options are told apart from a database
            that cannot be reached (and not wrapped in an exception group by the nursery).
    """
    check_bind(bind)
    allowed_hosts = list(allowed_hosts)
    allowed_host_names(allowed_hosts)
    token = action_token(allow_actions, action_token_file)
    await check_listen(bind)
    async with open_store() as store, trio.open_nursery() as nursery:
        urls = await nursery.start(
            functools.partial(
                serve_dashboard,
                store,
                bind=bind,
                allow_actions=allow_actions,
                projectors=projectors,
                allowed_hosts=allowed_hosts,
                action_token=token,
            )
        )
        on_ready(urls)
