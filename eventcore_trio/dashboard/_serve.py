"""Serving the dashboard with hypercorn's Trio worker."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from .._errors import ConfigurationError
from .._protocols import ProjectionAdmin
from ._app import dashboard_app
from ._state import DashboardState, poll_status

logger = logging.getLogger("eventcore_trio.dashboard")


def check_bind(bind: object) -> str:
    """A ``host:port`` to listen on, checked."""
    if not isinstance(bind, str) or ":" not in bind:
        raise ConfigurationError(f"bind must be HOST:PORT, e.g. 127.0.0.1:8000; got {bind!r}")
    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigurationError(f"bind must be HOST:PORT, e.g. 127.0.0.1:8000; got {bind!r}")
    return bind


async def serve_dashboard(
    store: ProjectionAdmin,
    *,
    bind: str = "127.0.0.1:8000",
    allow_actions: bool = False,
    projectors: Sequence[object] = (),
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the dashboard for *store* until cancelled.

    Started with ``await nursery.start(serve_dashboard, store)``, it reports the URLs it
    listens on. It listens on 127.0.0.1 unless *bind* says otherwise (``0.0.0.0:8000``
    shows it to the network: it has no authentication). Read-only unless *allow_actions*;
    dead letters can then be replayed for the *projectors* given.

    .. versionadded:: 0.3
    """
    config = Config()
    config.bind = [check_bind(bind)]
    config.accesslog = None
    config.errorlog = logging.getLogger("eventcore_trio.dashboard.http")
    state = DashboardState(allow_actions=allow_actions)
    async with trio.open_nursery() as nursery:
        await nursery.start(poll_status, store, state)
        # Starlette is an ASGI app; hypercorn's annotations spell ASGI more narrowly.
        app: Any = dashboard_app(store, state, projectors)
        urls: list[str] = await nursery.start(functools.partial(serve, app, config, mode="asgi"))
        logger.info("dashboard at %s", ", ".join(urls))
        task_status.started(urls)
