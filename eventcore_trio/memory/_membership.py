"""The host registry: registered hosts, what each publishes, and which units are led."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from typing import final

import attrs
import trio

from .._status import ClusterView, HostState, LeaderInfo, LiveHost
from ._state import MemoryState, now


@final
class MemoryMembership:
    """A host's registration in a `MemoryStore`; obtained from its ``register_host``.

    .. versionadded:: 0.2
    """

    def __init__(self, state: MemoryState) -> None:
        self._state = state
        self._host_id = uuid.uuid4().hex
        self._registered = True

    @property
    def host_id(self) -> str:
        """This host's id."""
        return self._host_id

    @property
    def is_held(self) -> bool:
        """True while registered."""
        return self._registered

    async def publish(self, leading: frozenset[str], standing_by: frozenset[str]) -> None:
        """Record what this host leads and stands by for (what it runs stays as registered)."""
        await trio.lowlevel.checkpoint()
        if self._registered:
            hosts = self._state.hosts
            hosts[self._host_id] = attrs.evolve(
                hosts[self._host_id], leading=leading, standing_by=standing_by
            )
            self._state.hosts_changed()

    async def view(self, units: Sequence[str]) -> ClusterView:
        """Every registered host, and which of *units* are led."""
        await trio.lowlevel.checkpoint()
        state = self._state
        return ClusterView(
            hosts=dict(state.hosts),
            held=frozenset(unit for unit in units if unit in state.leaders),
        )

    async def wait_changed(self) -> None:
        """Return after the next registration, departure or publication."""
        await self._state.hosts_event.wait()


@asynccontextmanager
async def register(
    state: MemoryState, runs: Collection[str] | None
) -> AsyncIterator[MemoryMembership]:
    """Register a host that runs *runs* (every unit when None) for the block."""
    membership = MemoryMembership(state)
    state.hosts[membership.host_id] = HostState(runs=None if runs is None else frozenset(runs))
    state.hosts_joined[membership.host_id] = now()
    state.hosts_changed()
    try:
        yield membership
    finally:
        membership._registered = False
        del state.hosts[membership.host_id]
        del state.hosts_joined[membership.host_id]
        state.hosts_changed()


def live_hosts(state: MemoryState) -> list[LiveHost]:
    """Every registered host, oldest first (the registry keeps registration order): all of
    them are this process."""
    return [
        LiveHost(
            host_id=host_id,
            process=LeaderInfo(
                pid=os.getpid(),
                host=socket.gethostname(),
                application_name=f"memory host {host_id}",
            ),
            joined_at=state.hosts_joined[host_id],
            state=host,
        )
        for host_id, host in state.hosts.items()
    ]
