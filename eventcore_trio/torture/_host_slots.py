"""The host processes of a torture run: each in a slot behind a network proxy of its own,
restarted when it exits, its unexpected exits counted."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final

import attrs
import trio

from .._tools._processes import run_ready_process
from ..postgres import DSN_ENVIRONMENT_VARIABLE
from ._proxy import NetworkProxy

logger = logging.getLogger("eventcore_trio.torture")

HOST_APPLICATION: Final = "torture-host"


@attrs.define
class HostSlot:
    """One host process position: its proxy, and the process now running in it."""

    name: str
    proxy: NetworkProxy
    process: trio.Process | None = None
    expect_exit: bool = False
    # Stopped for good by a host-leave fault: its process is not restarted.
    retired: bool = False


@attrs.define
class HostProcesses:
    """The run's host slots, started in `nursery` (set by the run before the first host)."""

    dsn: str
    schema: str
    app: str
    out: Callable[[str], None]
    log_dir: Path
    slots: list[HostSlot] = attrs.Factory(list)
    crashes: int = 0
    # Where host slots run (host-join starts one more there).
    nursery: trio.Nursery | None = None

    async def add(self) -> HostSlot:
        """Start one more host process, behind a network proxy of its own."""
        assert self.nursery is not None
        proxy = NetworkProxy(self.dsn)
        await self.nursery.start(proxy.serve)
        slot = HostSlot(f"{HOST_APPLICATION}-{len(self.slots)}", proxy)
        self.slots.append(slot)
        await self.nursery.start(self.keep_running, slot)
        return slot

    async def keep_running(
        self, slot: HostSlot, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep a host process running in *slot*; count the exits nobody asked for."""
        # The DSN (which may hold a password) goes through the environment, not argv.
        argv = [
            sys.executable,
            "-m",
            "eventcore_trio.torture._host_process",
            self.schema,
            self.app,
            slot.name,
        ]
        env = {DSN_ENVIRONMENT_VARIABLE: slot.proxy.dsn}
        started = False
        with (self.log_dir / f"{slot.name}.log").open("ab") as log:
            while True:
                slot.expect_exit = False
                try:
                    async with trio.open_nursery() as nursery:
                        slot.process = await nursery.start(
                            functools.partial(
                                run_ready_process, argv, stop_grace=10, stderr=log, env=env
                            )
                        )
                        if not started:
                            started = True
                            task_status.started()
                except (RuntimeError, trio.TooSlowError) as exc:
                    logger.warning("%s did not start: %s", slot.name, exc)
                slot.process = None
                if slot.retired:
                    return
                if not slot.expect_exit:
                    self.crashes += 1
                    self.out(f"  !! {slot.name} exited unexpectedly (see {log.name})")
                await trio.sleep(0.1)

    def expect_exits(self) -> None:
        """The run is ending: no exit from now on is a crash."""
        for slot in self.slots:
            slot.expect_exit = True
