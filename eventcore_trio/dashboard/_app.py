"""The dashboard's ASGI application (Starlette): the page, ``/status.json``, ``/metrics``,
and, only when allowed and with the action token, ``POST /actions/reset`` and
``POST /actions/replay``."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .._errors import (
    ConfigurationError,
    DeadLetterNotFound,
    InvalidArgument,
    LeadershipUnavailable,
    PartitionsMismatch,
    ProjectionNotFound,
    ProjectionRunning,
)
from .._protocols import ProjectionAdmin, Store
from ..projection import check_projector, replay_dead_letters
from ._allowed_hosts import HostCheck, allowed_host_names
from ._page import PAGE
from ._prometheus import prometheus_text
from ._state import DashboardState
from ._token import TOKEN_VARIABLE, check_action_token, token_matches

logger = logging.getLogger("eventcore_trio.dashboard")

#: Actions need this header: a cross-site form cannot send it without a CORS preflight.
ACTION_HEADER = "x-eventcore-action"

#: How to start a dashboard whose actions work, for the messages that refuse them.
TOKEN_ADVICE = (
    "start the dashboard with --allow-actions and --action-token-file PATH (or the "
    f"{TOKEN_VARIABLE} environment variable)"
)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _unauthorized(request: Request, message: str) -> JSONResponse:
    # 401 for a missing and for a wrong token alike (RFC 6750): the page then asks again.
    client = request.client.host if request.client else "?"
    logger.warning(
        "dashboard: refused %s %s from %s: %s", request.method, request.url.path, client, message
    )
    return _error(
        401,
        f"{message}: send the token the dashboard was started with as "
        "'Authorization: Bearer TOKEN'",
        {"www-authenticate": 'Bearer realm="eventcore-trio dashboard"'},
    )


def dashboard_app(
    store: ProjectionAdmin,
    state: DashboardState,
    projectors: Sequence[object] = (),
    *,
    allowed_hosts: Iterable[str] = (),
    action_token: str | None = None,
) -> Starlette:
    """The dashboard as an ASGI app over *state* (kept fresh by `poll_status`).

    Read-only unless *state* allows actions; then ``POST /actions/reset`` with
    ``{"projection": name, "confirm": name}``, the ``X-Eventcore-Action: 1`` header,
    ``Authorization: Bearer`` *action_token* and a JSON body resets a projection that no
    host runs, and ``POST /actions/replay`` replays the dead letters of one of *projectors*
    (replaying needs the projector's code). An action without the token, or with another,
    gets 401 and changes nothing; while actions are off, 403.

    It answers only requests whose Host header names it (any port): localhost, 127.0.0.1,
    ::1, the IP address the request arrived on, and *allowed_hosts*; any other gets 400 and
    reaches no endpoint. A page that rebinds its own name to the dashboard's address (DNS
    rebinding) so cannot read the status or post actions.

    Args:
        allowed_hosts: further host names or IP addresses (without a port) to answer to:
            the names users and Prometheus reach the dashboard by, through a proxy too.
        action_token: the secret every action must carry (at least 16 visible ASCII
            characters, e.g. ``secrets.token_urlsafe(32)``); compared in constant time.

    Raises:
        ConfigurationError: an allowed host is not a host name or an IP address; *state*
            allows actions but no *action_token* is given, or it is too short.

    .. versionadded:: 0.3
    """
    names = allowed_host_names(allowed_hosts)
    token = None if action_token is None else check_action_token(action_token)
    if state.allow_actions and token is None:
        raise ConfigurationError(
            "actions need a secret, so that not every local process can reset projections: "
            "pass action_token (e.g. secrets.token_urlsafe(32))"
        )
    by_name = {check_projector(p): p for p in projectors}
    state.replayable = sorted(by_name)

    async def action(request: Request) -> str | JSONResponse:
        # The projection an action names, or the response that refuses it.
        if not state.allow_actions or token is None:
            return _error(403, f"actions are off; {TOKEN_ADVICE}")
        # The token before anything else: without it, a request learns nothing more.
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if not given:
            return _unauthorized(request, "this action needs the dashboard's action token")
        if scheme.lower() != "bearer" or not token_matches(given.strip(), token):
            return _unauthorized(request, "the action token is wrong")
        if request.headers.get(ACTION_HEADER) != "1":
            return _error(400, f"an action needs the header {ACTION_HEADER}: 1")
        try:
            body: Any = json.loads(await request.body())
        except ValueError:
            return _error(400, 'the body must be JSON: {"projection": ..., "confirm": ...}')
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        name, confirm = body.get("projection"), body.get("confirm")
        if not isinstance(name, str) or not name:
            return _error(400, '"projection" must be a projection\'s name')
        if confirm != name:
            return _error(400, '"confirm" must repeat the projection\'s name')
        return name

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE)

    async def status(request: Request) -> JSONResponse:
        return JSONResponse(state.snapshot(), headers={"cache-control": "no-store"})

    async def metrics(request: Request) -> Response:
        versions = state.versions
        etas = {
            (v.name, v.version): eta
            for v in versions
            if (eta := state.rebuild_eta(v.name, v.version)) is not None
        }
        text = prometheus_text(
            state.statuses,
            store_up=state.store_up,
            status_age=state.status_age(),
            versions=versions,
            etas=etas,
        )
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def reset(request: Request) -> JSONResponse:
        name = await action(request)
        if not isinstance(name, str):
            return name
        try:
            await store.reset_projection(name)
        except ProjectionNotFound:
            return _error(404, f"no projection named {name!r} has run here")
        except ProjectionRunning:
            return _error(409, f"{name!r} is running; stop its hosts first")
        except InvalidArgument as exc:
            return _error(400, str(exc))
        return JSONResponse({"reset": name})

    async def replay(request: Request) -> JSONResponse:
        name = await action(request)
        if not isinstance(name, str):
            return name
        projector = by_name.get(name)
        if projector is None:
            return _error(
                404,
                f"{name!r} is not among the projectors the dashboard was given "
                "(--projectors MODULE:ATTR)",
            )
        if not isinstance(store, Store):
            return _error(400, "this store cannot replay dead letters")
        try:
            result = await replay_dead_letters(store, projector)
        except LeadershipUnavailable:
            return _error(409, f"{name!r} is running; stop its hosts first")
        except PartitionsMismatch as exc:
            # Replaying with other code than the hosts run is refused; nothing was replayed.
            return _error(
                409,
                f"{name!r} runs as {exc.recorded} partition(s), but the dashboard's projector "
                f"has partitions={exc.given}, so nothing was replayed: start the dashboard "
                "with the projectors its hosts run (--projectors)",
            )
        except DeadLetterNotFound as exc:
            return _error(409, str(exc))
        return JSONResponse({"replayed": result.replayed, "failed": result.failed})

    return Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/status.json", status, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/actions/reset", reset, methods=["POST"]),
            Route("/actions/replay", replay, methods=["POST"]),
        ],
        middleware=[Middleware(HostCheck, allowed=names)],
    )
