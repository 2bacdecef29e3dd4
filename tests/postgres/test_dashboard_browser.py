"""The dashboard page in a real headless browser (Debian's chromium): it renders the units
of running hosts, and shows the failover after the leader is killed."""

from __future__ import annotations

import os
import shutil
import signal
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from eventcore_trio import NewEvent
from eventcore_trio.dashboard import serve_dashboard
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.testing import PostgresHarness, wait_for_leader

from ..helpers import eventually
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


async def test_the_page_shows_units_and_a_failover(
    store: PostgresStore, harness: PostgresHarness, tmp_path: Path
) -> None:
    """Two host processes: the page lists the unit as running with its leader; after a
    kill -9 of the leader it lists the failover, to the other host's pid."""
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

            await eventually(shown_running)
            dom = await browse(url)
            assert 'data-unit="ledger"' in dom
            assert 'class="state-running">running<' in dom
            assert f"pid {leader}" in dom

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
