"""The Host allow-list: a page that rebinds its own name to the dashboard's address (DNS
rebinding) reads nothing and changes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from eventcore_trio import (
    ConfigurationError,
    NewEvent,
    ProjectionContext,
    RecordedEvent,
    projector,
    run_projection,
)
from eventcore_trio.dashboard import DashboardState, dashboard_app
from eventcore_trio.dashboard._allowed_hosts import (
    LOOPBACK_NAMES,
    allowed_host_name,
    allowed_host_names,
    host_allowed,
    host_of,
)
from eventcore_trio.memory import MemoryStore, open_memory_store


@projector("ledger")
async def ledger(event: RecordedEvent, ctx: ProjectionContext) -> None:
    pass


class TestHostHeader:
    """Which Host headers name the dashboard."""

    @pytest.mark.parametrize(
        ("header", "name"),
        [
            ("localhost", "localhost"),
            ("LocalHost:8000", "localhost"),
            ("localhost.:8000", "localhost"),
            ("127.0.0.1:0", "127.0.0.1"),
            ("[::1]:8000", "::1"),
            ("[::1]", "::1"),
            ("[0:0::1]", "::1"),
            ("dashboard.example.com:443", "dashboard.example.com"),
        ],
    )
    def test_the_name_a_host_header_gives(self, header: str, name: str) -> None:
        """Ports, case, brackets and a final dot do not change the name compared."""
        assert host_of(header) == name

    @pytest.mark.parametrize(
        "header",
        ["", ":8000", "localhost:", "localhost:80a", "::1", "[::1", "[::1]x", "a b", "x@localhost"],
    )
    def test_malformed_host_headers_name_nothing(self, header: str) -> None:
        """A header that is no host (and optional port) names nothing, so is refused."""
        assert host_of(header) is None
        assert not host_allowed(header, LOOPBACK_NAMES)

    def test_only_own_names_and_the_local_address_are_accepted(self) -> None:
        """Loopback names and listed names pass; a rebinding page's name, a missing header,
        and a name that merely equals the server's non-address name do not."""
        allowed = allowed_host_names(["dashboard.internal"])
        for header in ("localhost:8000", "127.0.0.1", "[::1]:1", "Dashboard.Internal:80"):
            assert host_allowed(header, allowed)
        for header in ("attacker.example:8000", "localhost.attacker.example", "127.0.0.2"):
            assert not host_allowed(header, allowed)
        assert not host_allowed(None, allowed)
        # The address a request arrived on (bound to 0.0.0.0, scraped by its pod IP).
        assert host_allowed("10.1.2.3:8000", allowed, local="10.1.2.3")
        assert not host_allowed("10.1.2.4:8000", allowed, local="10.1.2.3")
        assert not host_allowed("dashboard:80", allowed, local="dashboard")
        # Bound to :: (dual stack), an IPv4 client's request arrives on a mapped address.
        assert host_allowed("10.1.2.3:8000", allowed, local="::ffff:10.1.2.3")

    @pytest.mark.parametrize(
        "name", ["", "http://x.example", "x.example:8000", "x.example/", "*", "a b", 7, "-x"]
    )
    def test_bad_allowed_hosts_are_refused(self, name: object) -> None:
        """An allowed host must be a host name or an address, with no port or scheme."""
        with pytest.raises(ConfigurationError, match="without a port"):
            allowed_host_name(name)

    def test_allowed_hosts_as_one_string_are_refused(self) -> None:
        """``allowed_hosts="name"`` would allow each letter: refused, naming the mistake."""
        with pytest.raises(ConfigurationError, match="list of names"):
            allowed_host_names("dashboard.internal")
        assert allowed_host_name("[::1]") == "::1"
        assert allowed_host_name("Dash.Example.") == "dash.example"


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    """A memory store where ``ledger`` has applied an event (it has a checkpoint)."""
    async with open_memory_store() as store:
        await store.append("acc-1", [NewEvent("Deposited", {})])
        await run_projection(store, ledger)
        yield store


async def test_a_foreign_host_reads_nothing_and_changes_nothing(store: MemoryStore) -> None:
    """Every endpoint answers 400 to a Host that is not the dashboard's, even a valid
    action: the projection is not reset. The same requests with its own names work."""
    state = DashboardState(allow_actions=True)
    state.update(await store.projection_status())
    token = "test-token-0123456789abcdef"
    app = dashboard_app(store, state, allowed_hosts=["dashboard.internal"], action_token=token)
    action = {"x-eventcore-action": "1", "authorization": f"Bearer {token}"}
    body = {"projection": "ledger", "confirm": "ledger"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://attacker.example") as http:
        for path in ("/", "/status.json", "/metrics"):
            response = await http.get(path)
            assert response.status_code == 400, path
            assert "ledger" not in response.text
            assert "--allowed-host" in response.json()["error"]
        response = await http.post("/actions/reset", json=body, headers=action)
        assert response.status_code == 400
        # A second Host header cannot smuggle a good name in either.
        response = await http.get("/status.json", headers=[("host", "localhost")] * 2)
        assert response.status_code == 400
    assert await store.load_checkpoint("ledger") is not None
    for base in ("http://localhost:8000", "http://dashboard.internal"):
        async with httpx.AsyncClient(transport=transport, base_url=base) as http:
            assert (await http.get("/status.json")).json()["units"][0]["unit"] == "ledger"
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        assert (await http.post("/actions/reset", json=body, headers=action)).status_code == 200
    assert await store.load_checkpoint("ledger") is None
