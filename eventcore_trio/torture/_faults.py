"""The faults of a torture run: which kinds a run can inject, a seeded schedule of them, doing
each one, and measuring how long failover and recovery took."""

from __future__ import annotations

import random
import signal
import uuid
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import attrs
import trio

from .._errors import StoreConnectionError
from .._events import NewEvent
from .._positions import Position
from .._tools._embedded import EmbeddedPostgres
from ..postgres import PostgresStore, projector_lock_key
from ._host_slots import HOST_APPLICATION, HostProcesses
from ._model import EVENT_TYPE, PROJECTOR_NAME, STREAM_PREFIX, account_tag
from ._report import DB_FAULTS, LEADER_FAULTS, FaultKind, FaultRecord
from ._writers import WriteLog

# How long the run waits for a failover, a recovery or the final catch-up before it counts a
# fault as unrecovered: far beyond any bound the library documents, so only a real hang hits it.
RECOVERY_LIMIT: Final = 60.0
WRITERS_APPLICATION: Final = "torture-writers"

T = TypeVar("T")


def available_faults(owns_server: bool) -> tuple[FaultKind, ...]:
    """Every fault kind, without server restarts unless the run owns the server."""
    return tuple(k for k in FaultKind if owns_server or k not in DB_FAULTS)


async def until(probe: Callable[[], Awaitable[T | None]], interval: float) -> T | None:
    """Poll *probe* until it gives a value (None after `RECOVERY_LIMIT`); errors retry."""
    with trio.move_on_after(RECOVERY_LIMIT):
        while True:
            try:
                value = await probe()
            except StoreConnectionError:
                value = None
            if value is not None:
                return value
            await trio.sleep(interval)
    return None


@attrs.frozen
class Holder:
    """The session holding the projection's lock, and the slot of its host (if known)."""

    backend_pid: int
    slot: int | None


def describe(record: FaultRecord) -> str:
    """The progress line of one fault."""
    parts = [f"{record.at:6.1f}s  {record.kind.value:24} {record.target}"]
    if record.outage_ms >= 100:
        parts.append(f"lasted {record.outage_ms:.0f} ms")
    if record.failover_ms is not None:
        parts.append(f"new leader after {record.failover_ms:.0f} ms")
    parts.append(
        "NOT RECOVERED"
        if record.recovery_ms is None
        else f"applying again {record.recovery_ms:.0f} ms after"
    )
    return "; ".join(parts)


@attrs.define
class FaultInjector:
    """Injects faults one at a time on a seeded schedule, and records each one."""

    schema: str
    server: EmbeddedPostgres | None
    seed: int
    duration: float
    kinds: tuple[FaultKind, ...]
    stall_seconds: float
    out: Callable[[str], None]
    hosts: HostProcesses
    writes: WriteLog
    rng: random.Random = attrs.field(init=False)
    faults: list[FaultRecord] = attrs.Factory(list)
    # When the faults began (Trio clock); set by the run once its hosts are ready.
    begin: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def now(self) -> float:
        """Seconds since the faults began."""
        return trio.current_time() - self.begin

    # -- observation --------------------------------------------------------------------

    async def holder(self, control: PostgresStore) -> Holder | None:
        """The session holding the projection's lock now, and the slot of its host."""
        row = await control.admin.fetchrow(
            "SELECT l.pid, a.application_name FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            "AND ((l.classid::bigint << 32) | l.objid::bigint) = $1",
            projector_lock_key(self.schema, PROJECTOR_NAME),
        )
        if row is None:
            return None
        slot = next(
            (
                i
                for i, s in enumerate(self.hosts.slots)
                if row["application_name"].startswith(s.name + " ")
            ),
            None,
        )
        return Holder(row["pid"], slot)

    async def leader(self, control: PostgresStore) -> Holder | None:
        """Wait for a leader hosted in a slot whose process is known (so it can be hit)."""

        async def probe() -> Holder | None:
            found = await self.holder(control)
            if found is None or found.slot is None or self.hosts.slots[found.slot].process is None:
                return None
            return found

        return await until(probe, 0.01)

    async def new_leader_at(self, control: PostgresStore, old: int) -> float | None:
        """When a session other than *old* holds the lock (Trio clock), or None."""

        async def probe() -> float | None:
            found = await self.holder(control)
            if found is None or found.backend_pid == old:
                return None
            return trio.current_time()

        return await until(probe, 0.005)

    async def resumed_at(self, control: PostgresStore) -> float | None:
        """When the projection has applied an event appended now (Trio clock), or None."""
        marker = uuid.uuid4()

        async def append() -> Position | None:
            stream = f"{STREAM_PREFIX}marker"
            result = await control.append(
                stream,
                [NewEvent(EVENT_TYPE, {"amount": 0}, event_id=marker, tags=[account_tag(stream)])],
            )
            self.writes.acknowledged.add(marker)
            self.writes.by_path["marker"] += 1
            return result.position

        position = await until(append, 0.05)
        if position is None:
            return None

        async def probe() -> float | None:
            checkpoint = await control.load_checkpoint(PROJECTOR_NAME)
            if checkpoint is None or checkpoint < position:
                return None
            return trio.current_time()

        return await until(probe, 0.01)

    # -- faults -------------------------------------------------------------------------

    def schedule(self) -> Callable[[], FaultKind]:
        """Faults in shuffled rounds: every kind once per round, so short runs see them all."""
        pending: list[FaultKind] = []

        def next_kind() -> FaultKind:
            if not pending:
                pending.extend(self.kinds)
                self.rng.shuffle(pending)
            return pending.pop()

        return next_kind

    async def inject_faults(self, control: PostgresStore, writing: PostgresStore) -> None:
        """Inject faults one at a time, each after the last one has been recovered from.

        *writing* is the writers' store (the notify-failure fault breaks its notifications).
        """
        next_kind = self.schedule()
        while True:
            await trio.sleep(self.rng.uniform(0.5, 2.0))
            if self.now() > self.duration:
                return
            record = await self.inject(control, writing, next_kind())
            self.faults.append(record)
            self.out(describe(record))

    async def inject(
        self, control: PostgresStore, writing: PostgresStore, kind: FaultKind
    ) -> FaultRecord:
        """Do *kind* once; measure failover and recovery."""
        holder = (
            await self.leader(control)
            if kind not in DB_FAULTS and kind is not FaultKind.NOTIFY_FAILURE
            else None
        )
        at = self.now()
        started = trio.current_time()
        target = "the server"
        if holder is not None and holder.slot is not None:
            slot = self.hosts.slots[holder.slot]
            process = slot.process
            target = f"{slot.name} (lock session {holder.backend_pid})"
            match kind:
                case FaultKind.SIGKILL_LEADER | FaultKind.SIGTERM_LEADER if process is not None:
                    slot.expect_exit = True
                    target = f"{slot.name} (pid {process.pid})"
                    process.send_signal(
                        signal.SIGKILL if kind is FaultKind.SIGKILL_LEADER else signal.SIGTERM
                    )
                case FaultKind.TERMINATE_LOCK_SESSION:
                    await control.admin.execute(
                        "SELECT pg_terminate_backend($1)", holder.backend_pid
                    )
                case FaultKind.NETWORK_DROP:
                    slot.proxy.drop()
                case FaultKind.NETWORK_STALL:
                    slot.proxy.stall()
                    await trio.sleep(self.stall_seconds)
                    # A partition that outlasts keepalives ends with both sides giving up.
                    slot.proxy.drop()
                    slot.proxy.resume()
        if kind is FaultKind.HOST_LEAVE:
            live = [s for s in self.hosts.slots if not s.retired and s.process is not None]
            if len(live) > 2:
                slot = self.rng.choice(live)
                slot.retired = slot.expect_exit = True
                assert slot.process is not None
                target = f"{slot.name} (pid {slot.process.pid}) leaves"
                slot.process.send_signal(signal.SIGTERM)
            else:
                kind = FaultKind.HOST_JOIN  # keep two hosts at least: grow instead
        if kind is FaultKind.HOST_JOIN:
            slot = await self.hosts.add()
            target = f"{slot.name} joins"
        elif kind is FaultKind.TERMINATE_POOL_SESSIONS:
            count = await control.admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE (application_name LIKE $1 OR application_name LIKE $2) "
                "AND application_name NOT LIKE '% leader %'",
                f"{HOST_APPLICATION}-%",
                f"{WRITERS_APPLICATION}%",
            )
            target = f"{count} pooled and listening sessions"
        elif kind is FaultKind.NOTIFY_FAILURE:
            with writing.admin.failing_notifications():
                await trio.sleep(self.stall_seconds / 2)
            target = "the writers' notifications"
        elif kind in DB_FAULTS:
            assert self.server is not None
            mode = "fast" if kind is FaultKind.DB_RESTART else "immediate"
            await trio.to_thread.run_sync(self.server.stop, mode)
            await trio.to_thread.run_sync(self.server.start)
            target = f"the server ({mode} shutdown)"
        ended = trio.current_time()
        failover_ms = None
        if holder is not None and (kind in LEADER_FAULTS or kind is FaultKind.NETWORK_STALL):
            took_over = await self.new_leader_at(control, holder.backend_pid)
            failover_ms = None if took_over is None else (took_over - started) * 1000
        resumed = await self.resumed_at(control)
        return FaultRecord(
            kind=kind,
            at=at,
            target=target,
            outage_ms=(ended - started) * 1000,
            failover_ms=failover_ms,
            recovery_ms=None if resumed is None else (resumed - ended) * 1000,
        )
