"""The dashboard page in a real headless browser (Debian's chromium): it renders the units
of running hosts, shows the failover after the leader is killed, asks for the action token
before a reset, and shows a failed unit's error (escaped), the database and schema it
watches, and times in UTC to the second."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from eventcore_trio import (
    NewEvent,
    ProjectionContext,
    ProjectionFailed,
    RecordedEvent,
    projector,
    run_projection,
)
from eventcore_trio.dashboard import serve_dashboard
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.testing import PostgresHarness, wait_for_leader

from ..conftest import oldest_server_param
from ..helpers import eventually
from .test_dashboard import TOKEN, ledger
from .test_projection import _create_app_schema, _run_host

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    # CI installs it (.ci/run); a developer without it skips, CI must not.
    if os.environ.get("CI"):
        raise RuntimeError("chromium is not installed; .ci/run installs it with apt-get")
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)


async def browse(url: str, *, screenshot: Path | None = None) -> str:
    """The page's DOM after its script ran for a while (or a screenshot of it)."""
    assert CHROMIUM is not None
    what = (
        [f"--screenshot={screenshot}", "--window-size=1280,1000"] if screenshot else ["--dump-dom"]
    )
    result = await trio.run_process(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=4000",
            *what,
            url,
        ],
        capture_stdout=True,
        capture_stderr=True,
    )
    return result.stdout.decode()


class DevTools:
    """One page of a headless chromium, driven over the DevTools protocol on a pipe: what a
    person does (click, type, submit), without a driver library. JavaScript dialogs
    (``confirm``) are accepted, as the person would, and their messages kept."""

    def __init__(self, process: trio.Process) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        self._send_stream = process.stdin
        self._receive_stream = process.stdout
        # One writer at a time on the pipe: the test's calls and the dialog answers.
        self._sending = trio.StrictFIFOLock()
        self._next_id = 0
        # Answers by call id, each with the event its caller waits on.
        self._answers: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self.session: str | None = None
        self.loaded = trio.Event()
        self.dialogs: list[str] = []

    async def _send(
        self,
        method: str,
        params: dict[str, Any],
        session: str | None,
        answer: tuple[trio.Event, list[dict[str, Any]]] | None = None,
    ) -> None:
        # The id is taken and the answer awaited before the first checkpoint.
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        if answer is not None:
            self._answers[self._next_id] = answer
        async with self._sending:
            await self._send_stream.send_all(json.dumps(message).encode() + b"\0")

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Call *method* (in the page's session once attached); its result."""
        done, answer = trio.Event(), list[dict[str, Any]]()
        await self._send(method, params, self.session, (done, answer))
        await done.wait()
        if "error" in answer[0]:
            raise RuntimeError(f"{method}: {answer[0]['error']}")
        result: dict[str, Any] = answer[0]["result"]
        return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript *expression* in the page (awaited if a promise)."""
        result = await self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, condition: str) -> Any:
        """The first truthy value of *condition*, polled by the page itself (bound the wait
        with a cancel scope)."""
        return await self.evaluate(
            "new Promise((resolve) => { const look = () => { const value = "
            f"({condition}); if (value) resolve(value); else setTimeout(look, 50); }}; "
            "look(); })"
        )

    async def open(self, url: str) -> None:
        """A new page at *url*, loaded; later calls go to it."""
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        self.session = attached["sessionId"]
        await self.call("Page.enable")
        await self.call("Page.navigate", url=url)
        await self.loaded.wait()

    async def read(self) -> None:
        """Dispatch what chromium says until it closes the pipe."""
        buffer = b""
        async for chunk in self._receive_stream:
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    # Dialog answers are sent without waiting for theirs.
                    waiting = self._answers.pop(message["id"], None)
                    if waiting is not None:
                        waiting[1].append(message)
                        waiting[0].set()
                elif message.get("method") == "Page.loadEventFired":
                    self.loaded.set()
                elif message.get("method") == "Page.javascriptDialogOpening":
                    self.dialogs.append(message["params"]["message"])
                    await self._send(
                        "Page.handleJavaScriptDialog", {"accept": True}, message.get("sessionId")
                    )


@asynccontextmanager
async def devtools() -> AsyncIterator[DevTools]:
    """A headless chromium for the block, driven by a `DevTools`."""
    assert CHROMIUM is not None
    # With --remote-debugging-pipe chromium reads the protocol from fd 3 and writes to fd 4:
    # the shell moves our pipes (its stdin and stdout) there.
    command = [
        "sh",
        "-c",
        'exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null',
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--remote-debugging-pipe",
        "about:blank",
    ]
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(
                trio.run_process,
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        )
        tools = DevTools(process)
        nursery.start_soon(tools.read)
        yield tools
        # Cancelling run_process ends chromium (SIGTERM, then SIGKILL).
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
async def test_the_page_shows_units_and_a_failover(
    store: PostgresStore, harness: PostgresHarness, tmp_path: Path
) -> None:
    """Two host processes: the page lists the unit as running with its leader, and both
    hosts, the one that leads nothing too; after a kill -9 of the leader it lists the
    failover, to the other host's pid."""
    app = await _create_app_schema(store)
    await store.append("acc-1", [NewEvent("Deposited", {"n": 0})])
    async with trio.open_nursery() as nursery:
        hosts = [await nursery.start(_run_host, harness, app, tmp_path / "hosts.log")]
        hosts.append(await nursery.start(_run_host, harness, app, tmp_path / "hosts.log"))
        [url] = await nursery.start(partial(serve_dashboard, store, bind="127.0.0.1:0"))
        with trio.fail_after(20):
            leader = await wait_for_leader(store, "ledger")
        async with httpx.AsyncClient(base_url=url) as http:

            async def shown_running() -> bool:
                units = (await http.get("/status.json")).json()["units"]
                return any(u["unit"] == "ledger" and u["state"] == "running" for u in units)

            async def both_hosts_shown() -> bool:
                hosts = (await http.get("/status.json")).json()["hosts"]
                return sorted((h["units"], h["standing_by"]) for h in hosts) == [(0, 1), (1, 0)]

            await eventually(shown_running)
            # The host that leads nothing is listed too, standing by.
            await eventually(both_hosts_shown)
            dom = await browse(url)
            assert 'data-unit="ledger"' in dom
            assert 'class="state-running">running<' in dom
            assert f"pid {leader}: leads 1 unit" in dom
            [backup] = [h.pid for h in hosts if h.pid != leader]
            assert f"pid {backup}: leads nothing, stands by for 1 unit" in dom

            victim = next(h for h in hosts if h.pid == leader)
            victim.send_signal(signal.SIGKILL)

            async def failover_seen() -> bool:
                return bool((await http.get("/status.json")).json()["failovers"])

            await eventually(failover_seen, within=30)
            [failover] = (await http.get("/status.json")).json()["failovers"]
            assert failover["from"]["pid"] == leader
            dom = await browse(url)
            assert f"ledger from pid {leader} to pid {failover['to']['pid']}" in dom
            shot = tmp_path / "dashboard.png"
            await browse(url, screenshot=shot)
            assert shot.read_bytes().startswith(b"\x89PNG")
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
async def test_the_page_asks_for_the_token_before_a_reset(store: PostgresStore) -> None:
    """A person resets a projection from the page: it asks for the token, says plainly that
    a wrong one is refused (and the checkpoint stays), and resets with the right one, which
    it keeps in the tab's sessionStorage, never in the URL."""
    await store.append("acc-1", [NewEvent("Deposited", {})])
    await run_projection(store, ledger)
    checkpoint = await store.load_checkpoint("ledger")
    assert checkpoint is not None
    serve = partial(
        serve_dashboard, store, bind="127.0.0.1:0", allow_actions=True, action_token=TOKEN
    )
    form = "document.getElementById('token-form')"
    message = "document.getElementById('action-message')"

    async def submit(token: str) -> None:
        await tools.evaluate(
            f"document.getElementById('token').value = {json.dumps(token)}; {form}.requestSubmit()"
        )

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, devtools() as tools:
            [url] = await nursery.start(serve)
            await tools.open(url)
            await tools.until("document.querySelector('button[data-reset=\"ledger\"]')")
            await tools.evaluate("document.querySelector('button[data-reset=\"ledger\"]').click()")
            assert tools.dialogs == [
                "Reset ledger? Its checkpoint and dead letters are forgotten and it rebuilds "
                "from the start. Its hosts must be stopped."
            ]
            await tools.until(f"!{form}.hidden")
            assert "enter the action token" in await tools.evaluate(f"{message}.textContent")
            assert await store.load_checkpoint("ledger") == checkpoint

            await submit("x" * len(TOKEN))
            shown = await tools.until(
                f"!{form}.hidden && {message}.className === 'refused' && {message}.textContent"
            )
            assert shown.startswith("refused: the action token is wrong")
            assert await tools.evaluate("sessionStorage.length") == 0
            assert await store.load_checkpoint("ledger") == checkpoint

            await submit(TOKEN)
            assert (
                await tools.until(
                    f"{message}.className === '' && {form}.hidden && {message}.textContent"
                )
                == "reset ledger"
            )
            assert await store.load_checkpoint("ledger") is None
            stored = await tools.evaluate("sessionStorage.getItem('eventcore-action-token')")
            assert stored == TOKEN
            assert TOKEN not in await tools.evaluate("location.href")
            nursery.cancel_scope.cancel()


#: An error whose message is markup: the page must show it as text, never run it.
EVIL = '<script>window.injected = 1</script><img src=x onerror="window.injected = 2">'


@pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
async def test_the_page_shows_an_error_escaped_the_database_and_utc_times(
    store: PostgresStore,
) -> None:
    """A unit failed with markup in its error: the page shows the error as text (no element
    from it, no script run), says which database and schema it watches, and gives times as
    ``YYYY-MM-DD HH:MM:SS UTC``."""

    @projector("brittle")
    async def brittle(event: RecordedEvent, ctx: ProjectionContext) -> None:
        raise ValueError(EVIL)

    await store.append("acc-1", [NewEvent("Deposited", {})])
    with pytest.raises(ProjectionFailed):
        await run_projection(store, brittle)
    database = await store.admin.fetchval("SELECT current_database()")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, devtools() as tools:
            [url] = await nursery.start(partial(serve_dashboard, store, bind="127.0.0.1:0"))
            await tools.open(url)
            shown = await tools.until(
                "document.querySelector('tr[data-unit=\"brittle\"] .error')?.textContent"
            )
            assert EVIL in shown
            assert await tools.evaluate("document.querySelectorAll('#units script').length") == 0
            assert await tools.evaluate("document.querySelectorAll('#units img').length") == 0
            assert await tools.evaluate("window.injected === undefined")
            source = await tools.evaluate("document.getElementById('source').textContent")
            assert source.startswith(f"database {database} on ")
            assert source.endswith(f", schema {store.schema}")
            meta = await tools.evaluate("document.getElementById('meta').textContent")
            assert re.match(r"status at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC ", meta), meta
            nursery.cancel_scope.cancel()
