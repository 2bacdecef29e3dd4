"""Hosts that run different projectors, on the in-memory store: every unit some host has is
led by a host that has it, the hosts say what they lack, and status shows units nobody has.

The same across real processes on PostgreSQL: tests/postgres/test_mixed_sets.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import trio

from eventcore_trio import NewEvent, ProjectionStatus, RecordedEvent
from eventcore_trio.memory import MemoryStore, open_memory_store
from eventcore_trio.projection import (
    ProjectionConfig,
    ProjectionContext,
    projector,
    run_projection,
    run_projections,
)

CONFIG = ProjectionConfig(balance_interval=0.05)


class _Applied:
    """What each projector applied, and an event replaced after every application."""

    def __init__(self) -> None:
        self.events: dict[str, set[tuple[str, int]]] = {}
        self.changed = trio.Event()

    def record(self, name: str, event: RecordedEvent) -> None:
        self.events.setdefault(name, set()).add((event.stream_id, event.stream_version))
        self.changed.set()
        self.changed = trio.Event()


def _projectors(applied: _Applied, *names: str) -> list[object]:
    def make(name: str) -> object:
        @projector(name)
        async def apply(event: RecordedEvent, ctx: ProjectionContext) -> None:
            applied.record(name, event)

        return apply

    return [make(name) for name in names]


def _leaders(store: MemoryStore) -> dict[str, str]:
    """Unit -> the id of the host that publishes it leads it."""
    return {unit: host for host, state in store.admin.state.hosts.items() for unit in state.leading}


async def _until(store: MemoryStore, predicate: Callable[[MemoryStore], bool]) -> None:
    with trio.fail_after(10):
        while not predicate(store):
            await store.admin.state.hosts_event.wait()


async def _host(
    store: MemoryStore,
    projectors: list[object],
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await run_projections(store, projectors, CONFIG, task_status=task_status)


async def test_hosts_with_different_sets_lead_every_unit_one_of_them_has() -> None:
    """A host with six projectors starts first, one with two others joins, a third adds
    one more: every unit is led by a host that has it, and every projection applies all."""
    applied = _Applied()
    big = [f"a{i}" for i in range(6)]
    async with open_memory_store() as store, trio.open_nursery() as nursery:
        await nursery.start(_host, store, _projectors(applied, *big), trio.CancelScope())
        await nursery.start(
            _host, store, _projectors(applied, "audit", "billing"), trio.CancelScope()
        )
        await nursery.start(_host, store, _projectors(applied, *big, "search"), trio.CancelScope())
        everything = {*big, "audit", "billing", "search"}

        def led_by_hosts_that_have_them(store: MemoryStore) -> bool:
            leaders = _leaders(store)
            return set(leaders) == everything and all(
                unit in (store.admin.state.hosts[host].runs or ()) for unit, host in leaders.items()
            )

        await _until(store, led_by_hosts_that_have_them)
        for n in range(10):
            await store.append(f"s-{n % 3}", [NewEvent("E", {"n": n})])
        with trio.fail_after(10):
            while not all(len(applied.events.get(name, ())) == 10 for name in everything):
                await applied.changed.wait()
        nursery.cancel_scope.cancel()


async def test_a_host_logs_once_what_the_others_run_and_it_does_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The host without "audit" warns once, naming it, however many rounds pass."""
    caplog.set_level(logging.INFO, logger="eventcore_trio.host")
    applied = _Applied()
    async with open_memory_store() as store, trio.open_nursery() as nursery:
        lacking = trio.CancelScope()
        await nursery.start(_host, store, _projectors(applied, "orders"), lacking)
        await nursery.start(
            _host, store, _projectors(applied, "orders", "audit"), trio.CancelScope()
        )
        await _until(store, lambda s: set(_leaders(s)) == {"orders", "audit"})
        # Ten more balancing rounds: nothing new to say.
        await trio.sleep(10 * CONFIG.balance_interval)
        warnings = [
            r for r in caplog.records if r.levelno == logging.WARNING and "audit" in r.message
        ]
        assert len(warnings) == 1, [r.message for r in warnings]
        assert "does not have" in warnings[0].message
        nursery.cancel_scope.cancel()


def _by_unit(status: list[ProjectionStatus]) -> dict[str, ProjectionStatus]:
    return {s.unit: s for s in status}


async def test_status_shows_a_unit_no_live_host_can_run() -> None:
    """A projection that ran here once and that no live host has any more: listed, with 0
    hosts that can run it and the live ones named; a unit a host has that has not run yet is
    listed too; with no live host nothing is claimed."""
    applied = _Applied()
    async with open_memory_store() as store:
        await store.append("s-1", [NewEvent("E", {})])
        (audit,) = _projectors(applied, "audit")
        await run_projection(store, audit)  # catch-up: it ran here, then stopped
        before = _by_unit(await store.projection_status())
        assert before["audit"].runnable_by is None, "no balancing host is live"
        assert not before["audit"].unrunnable

        async with (
            store.register_host(runs=["orders", "search[0/2]", "search[1/2]"]),
            store.register_host(runs=["orders"]),
        ):
            status = _by_unit(await store.projection_status())
        assert set(status) == {"audit", "orders", "search[0/2]", "search[1/2]"}
        assert status["audit"].unrunnable
        assert status["audit"].runnable_by == 0
        assert len(status["audit"].lacking_hosts) == 2
        assert status["audit"].checkpoint is not None
        # Listed before it first ran: no checkpoint, every event its lag.
        assert status["orders"].runnable_by == 2
        assert status["orders"].lacking_hosts == ()
        assert status["orders"].checkpoint is None
        assert status["orders"].lag_events == 1
        assert status["search[1/2]"].runnable_by == 1
        assert len(status["search[1/2]"].lacking_hosts) == 1
        assert not status["search[1/2]"].unrunnable
        # Gone with the hosts: only what ran here is left.
        assert set(_by_unit(await store.projection_status())) == {"audit"}
