"""The contract of the host registry as operators see it (`ProjectionAdmin.live_hosts`):
every registered host is listed, idle or not, with what it published, until its
registration ends however it ends."""

from __future__ import annotations

import datetime as dt
import os

import trio

from ..._protocols import Store
from ..._status import HostState
from .._harness import BackendHarness


class HostContract:
    """Live hosts: idle ones listed, what they publish shown, departed ones gone."""

    async def test_no_host_no_live_hosts(self, store: Store) -> None:
        """A store no host has registered with lists none."""
        assert await store.live_hosts() == []

    async def test_an_idle_host_is_listed(self, store: Store) -> None:
        """A registered host that leads nothing is listed, with its process, the moment it
        joined and the units it runs."""
        before = dt.datetime.now(dt.UTC)
        async with store.register_host(runs=["orders", "search[0/2]"]) as membership:
            [host] = await store.live_hosts()
        assert host.host_id == membership.host_id
        assert host.state == HostState(runs=frozenset({"orders", "search[0/2]"}))
        assert host.process.pid == os.getpid()
        assert host.process.host
        # Allow for a server clock a little behind this one.
        assert host.joined_at.tzinfo is not None
        assert host.joined_at > before - dt.timedelta(minutes=1)

    async def test_live_hosts_show_what_they_published(self, harness: BackendHarness) -> None:
        """Hosts of two stores on one database are all listed, oldest first, each with what
        it last published; a host that only stands by is listed too."""
        async with (
            harness.open_store() as first,
            harness.open_store() as second,
            first.register_host(runs=["a", "b"]) as leader,
            second.register_host() as backup,
        ):
            await leader.publish(frozenset({"a", "b"}), frozenset())
            await backup.publish(frozenset(), frozenset({"a"}))
            for store in (first, second):
                hosts = await store.live_hosts()
                assert [h.host_id for h in hosts] == [leader.host_id, backup.host_id]
                assert hosts[0].joined_at <= hosts[1].joined_at
                assert [h.state for h in hosts] == [
                    HostState(frozenset({"a", "b"}), frozenset(), frozenset({"a", "b"})),
                    HostState(frozenset(), frozenset({"a"}), None),
                ]

    async def test_a_departed_host_is_not_listed(self, store: Store) -> None:
        """A host whose registration ended (its block left, or its task cancelled) drops
        out at once, and the others stay."""
        async with store.register_host() as staying:
            async with store.register_host():
                assert len(await store.live_hosts()) == 2
            assert [h.host_id for h in await store.live_hosts()] == [staying.host_id]
            registered = trio.Event()

            async def host() -> None:
                async with store.register_host():
                    registered.set()
                    await trio.sleep_forever()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(host)
                await registered.wait()
                assert len(await store.live_hosts()) == 2
                nursery.cancel_scope.cancel()
            assert [h.host_id for h in await store.live_hosts()] == [staying.host_id]
        assert await store.live_hosts() == []
