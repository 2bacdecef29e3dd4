"""`run_torture`: writers, projector hosts and scheduled faults, then a verification.

One orchestrator (about 550 lines): the fault schedule, the host slots and the recovery checks
share the run's state; the writers, the proxy, the model and the verification live in modules
of their own.
"""

from __future__ import annotations

import functools
import logging
import random
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Final, TypeVar

import attrs
import trio

from .._errors import ConfigurationError, EventCoreError, StoreConnectionError
from .._events import NewEvent
from .._partitions import Partition, Unit
from .._positions import Position
from .._tools._embedded import EmbeddedPostgres
from .._tools._processes import run_ready_process
from ..postgres import (
    DSN_ENVIRONMENT_VARIABLE,
    PostgresStore,
    open_postgres_store,
    projector_lock_key,
)
from ._model import (
    EVENT_TYPE,
    PARTITIONED_NAME,
    PARTITIONS,
    PROJECTOR_NAME,
    REACTION_TYPE,
    REACTOR_NAME,
    STREAM_PREFIX,
    app_schema_sql,
)
from ._proxy import NetworkProxy
from ._report import DB_FAULTS, LEADER_FAULTS, FaultKind, FaultRecord, TortureReport
from ._verify import verify
from ._writers import WriteLog, write

logger = logging.getLogger("eventcore_trio.torture")

#: ``torture`` runs this long by default; ``--quick`` runs `QUICK_DURATION`.
DEFAULT_DURATION: Final = 300.0
QUICK_DURATION: Final = 40.0
# How long the run waits for a failover, a recovery or the final catch-up before it counts a
# fault as unrecovered: far beyond any bound the library documents, so only a real hang hits it.
RECOVERY_LIMIT: Final = 60.0
HOST_APPLICATION: Final = "torture-host"
WRITERS_APPLICATION: Final = "torture-writers"

T = TypeVar("T")


@attrs.define
class _Slot:
    # One host process position: its proxy, and the process now running in it.
    name: str
    proxy: NetworkProxy
    process: trio.Process | None = None
    expect_exit: bool = False
    # Stopped for good by a host-leave fault: its process is not restarted.
    retired: bool = False


@attrs.frozen
class _Holder:
    backend_pid: int
    slot: int | None


@attrs.define
class _Torture:
    dsn: str
    server: EmbeddedPostgres | None
    schema: str
    app: str
    seed: int
    duration: float
    writers: int
    kinds: tuple[FaultKind, ...]
    stall_seconds: float
    out: Callable[[str], None]
    log_dir: Path
    rng: random.Random = attrs.field(init=False)
    slots: list[_Slot] = attrs.Factory(list)
    writes: WriteLog = attrs.Factory(WriteLog)
    host_crashes: int = 0
    faults: list[FaultRecord] = attrs.Factory(list)
    stop_writing: trio.Event = attrs.Factory(trio.Event)
    begin: float = 0.0
    # Where host slots run (host-join starts one more there).
    nursery: trio.Nursery | None = None
    # The writers' store (the notify-failure fault breaks its notifications).
    writing: PostgresStore | None = None
    follower_cursor: Position | None = None
    # Every event id the independent follower was given, in order.
    followed: list[uuid.UUID] = attrs.Factory(list)

    def __attrs_post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    async def play(self, control: PostgresStore, hosts: int) -> tuple[float, bool]:
        """Start the hosts and the writers, inject faults, stop writing, wait for catch-up.

        Returns how long the faults ran and whether the projection caught up afterwards.
        """
        async with (
            open_postgres_store(
                self.dsn,
                schema=self.schema,
                migrate=False,
                application_name=WRITERS_APPLICATION,
                max_pool_size=self.writers + 2,
                connect_timeout=5,
            ) as writing,
            trio.open_nursery() as nursery,
        ):
            self.nursery = nursery
            self.writing = writing
            for _ in range(hosts):
                await self.add_host()
            self.out(f"hosts ready (logs in {self.log_dir}); writing and injecting faults…")
            self.begin = trio.current_time()
            following = trio.CancelScope()
            nursery.start_soon(self.follow, writing, following)
            async with trio.open_nursery() as writers_nursery:
                for index in range(self.writers):
                    writers_nursery.start_soon(
                        functools.partial(
                            write,
                            writing,
                            self.writes,
                            app=self.app,
                            seed=f"{self.seed}/{index}",
                            stop=self.stop_writing,
                        )
                    )
                await self.inject_faults(control)
                elapsed = self.now()
                # Writers finish what they started: a transaction still open when the
                # catch-up check runs would commit after it, unseen.
                self.stop_writing.set()
            self.out("faults done; waiting for the projections to catch up…")
            caught_up = await self.caught_up(control)
            following.cancel()
            # Everything is committed and nothing writes any more: the follower reads on to
            # the end of the log.
            await self.until(control, functools.partial(self.drain, writing), 0.1)
            for slot in self.slots:
                slot.expect_exit = True
            nursery.cancel_scope.cancel()
        return elapsed, caught_up

    # -- the independent follower ---------------------------------------------------------

    async def follow(self, store: PostgresStore, scope: trio.CancelScope) -> None:
        """Page ``read_events`` from a cursor of its own, as an application's subscriber
        would, woken by notifications and polling every 100 ms, through every fault."""
        with scope:
            while True:
                try:
                    if not await self.read_on(store):
                        with trio.move_on_after(0.1):
                            await store.wait_for_events()
                except StoreConnectionError:
                    await trio.sleep(0.1)

    async def read_on(self, store: PostgresStore) -> bool:
        """Read every page available after the follower's cursor; whether it got events."""
        got = False
        while page := await store.read_events(self.follower_cursor, limit=500):
            got = True
            self.followed.extend(event.event_id for event in page)
            self.follower_cursor = page[-1].position
        return got

    async def drain(self, store: PostgresStore) -> bool:
        """The follower reads to the end of the log (for `until`, which retries errors)."""
        await self.read_on(store)
        return True

    # -- processes ----------------------------------------------------------------------

    async def add_host(self) -> _Slot:
        """Start one more host process, behind a network proxy of its own."""
        assert self.nursery is not None
        proxy = NetworkProxy(self.dsn)
        await self.nursery.start(proxy.serve)
        slot = _Slot(f"{HOST_APPLICATION}-{len(self.slots)}", proxy)
        self.slots.append(slot)
        await self.nursery.start(self.host_slot, slot)
        return slot

    async def host_slot(
        self, slot: _Slot, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
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
                    self.host_crashes += 1
                    self.out(f"  !! {slot.name} exited unexpectedly (see {log.name})")
                await trio.sleep(0.1)

    # -- observation --------------------------------------------------------------------

    def now(self) -> float:
        return trio.current_time() - self.begin

    async def holder(self, control: PostgresStore) -> _Holder | None:
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
                for i, s in enumerate(self.slots)
                if row["application_name"].startswith(s.name + " ")
            ),
            None,
        )
        return _Holder(row["pid"], slot)

    async def until(
        self, control: PostgresStore, probe: Callable[[], Awaitable[T | None]], interval: float
    ) -> T | None:
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

    async def leader(self, control: PostgresStore) -> _Holder | None:
        """Wait for a leader hosted in a slot whose process is known (so it can be hit)."""

        async def probe() -> _Holder | None:
            found = await self.holder(control)
            if found is None or found.slot is None or self.slots[found.slot].process is None:
                return None
            return found

        return await self.until(control, probe, 0.01)

    async def new_leader_at(self, control: PostgresStore, old: int) -> float | None:
        """When a session other than *old* holds the lock (Trio clock), or None."""

        async def probe() -> float | None:
            found = await self.holder(control)
            if found is None or found.backend_pid == old:
                return None
            return trio.current_time()

        return await self.until(control, probe, 0.005)

    async def resumed_at(self, control: PostgresStore) -> float | None:
        """When the projection has applied an event appended now (Trio clock), or None."""
        marker = uuid.uuid4()

        async def append() -> Position | None:
            result = await control.append(
                f"{STREAM_PREFIX}marker", [NewEvent(EVENT_TYPE, {"amount": 0}, event_id=marker)]
            )
            self.writes.acknowledged.add(marker)
            self.writes.by_path["marker"] += 1
            return result.position

        position = await self.until(control, append, 0.05)
        if position is None:
            return None

        async def probe() -> float | None:
            checkpoint = await control.load_checkpoint(PROJECTOR_NAME)
            if checkpoint is None or checkpoint < position:
                return None
            return trio.current_time()

        return await self.until(control, probe, 0.01)

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

    async def inject_faults(self, control: PostgresStore) -> None:
        """Inject faults one at a time, each after the last one has been recovered from."""
        next_kind = self.schedule()
        while True:
            await trio.sleep(self.rng.uniform(0.5, 2.0))
            if self.now() > self.duration:
                return
            record = await self.inject(control, next_kind())
            self.faults.append(record)
            self.out(_describe(record))

    async def inject(self, control: PostgresStore, kind: FaultKind) -> FaultRecord:
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
            slot = self.slots[holder.slot]
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
            live = [s for s in self.slots if not s.retired and s.process is not None]
            if len(live) > 2:
                slot = self.rng.choice(live)
                slot.retired = slot.expect_exit = True
                assert slot.process is not None
                target = f"{slot.name} (pid {slot.process.pid}) leaves"
                slot.process.send_signal(signal.SIGTERM)
            else:
                kind = FaultKind.HOST_JOIN  # keep two hosts at least: grow instead
        if kind is FaultKind.HOST_JOIN:
            slot = await self.add_host()
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
            assert self.writing is not None
            with self.writing.admin.failing_notifications():
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

    async def caught_up(self, control: PostgresStore) -> bool:
        """Wait until every unit of every projection has applied the whole log."""
        units = {Unit(PROJECTOR_NAME).name, Unit(REACTOR_NAME).name} | {
            Unit(PARTITIONED_NAME, Partition(i, PARTITIONS)).name for i in range(PARTITIONS)
        }

        async def probe() -> bool | None:
            status = [s for s in await control.projection_status() if s.unit in units]
            done = {s.unit for s in status if s.lag_events == 0}
            return True if done == units else None

        return await self.until(control, probe, 0.1) is not None


def _describe(record: FaultRecord) -> str:
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


def available_faults(owns_server: bool) -> tuple[FaultKind, ...]:
    """Every fault kind, without server restarts unless the run owns the server."""
    return tuple(k for k in FaultKind if owns_server or k not in DB_FAULTS)


def _check(duration: float, hosts: int, writers: int, stall_seconds: float) -> None:
    if not isinstance(duration, int | float) or not duration > 0:
        raise ConfigurationError(f"duration must be a positive number of seconds, got {duration!r}")
    if not isinstance(hosts, int) or hosts < 2:
        raise ConfigurationError(
            f"hosts must be an int of at least 2 (one leads, one stands by), got {hosts!r}"
        )
    if not isinstance(writers, int) or writers < 1:
        raise ConfigurationError(f"writers must be a positive int, got {writers!r}")
    if not isinstance(stall_seconds, int | float) or not stall_seconds > 0:
        raise ConfigurationError(f"stall_seconds must be positive, got {stall_seconds!r}")


async def run_torture(
    dsn: str | None = None,
    *,
    duration: float = DEFAULT_DURATION,
    seed: int | None = None,
    hosts: int = 3,
    writers: int = 4,
    faults: Collection[FaultKind] | None = None,
    stall_seconds: float = 4.0,
    server: EmbeddedPostgres | None = None,
    out: Callable[[str], None] = print,
) -> TortureReport:
    """Run writers and projector hosts under injected faults, then verify; see docs/reliability.

    Writers in this process append concurrently through every public write path: single
    and multi-stream appends (shared by group commit), transactions held open for a random
    moment, and outbox transactions (`PostgresStore.transaction`) that write a row of their
    own before, between or after their appends; held and outbox transactions sometimes roll
    back. *hosts* processes host three transactional projections (a ledger, the ledger in
    partitions, and the ledger as a reactor that appends after writing through ``ctx.db``),
    each through its own `NetworkProxy`, and an independent follower pages ``read_events``.
    Faults are injected one at a time on a seeded schedule, each once the previous one has
    been recovered from: SIGKILL and SIGTERM of the leader, ``pg_terminate_backend`` of its
    lock session and of all pooled sessions, a network drop and a stall of the leader's
    connection, hosts joining and leaving, failing notifications after appends and, when the
    run owns the server, a fast restart and a crash (immediate shutdown) of PostgreSQL. Then
    the writers stop, the projections catch up, and the log is checked against the writers'
    record, the read models, the evidence each projection committed with each batch, the
    reactions, the outbox rows and what the follower was given.

    Args:
        dsn: the server to use; None starts a throwaway `EmbeddedPostgres` (durable settings),
            which also enables the server restart faults. Runs in a fresh schema, dropped at
            the end unless the verification failed.
        duration: seconds of fault injection (writing goes on throughout).
        seed: makes the writers' choices and the fault schedule repeatable; random if None.
        hosts: host processes competing for the projection (at least 2).
        writers: concurrent writer tasks.
        faults: the kinds to inject; default every kind available.
        stall_seconds: how long a network stall lasts before the connections are reset.
        server: an `EmbeddedPostgres` this run may restart (instead of *dsn*).
        out: where progress lines go.

    Raises:
        ConfigurationError: an invalid option, or server faults asked for on a server the run
            does not own.
        StoreConnectionError: the server cannot be reached at the start.

    .. versionadded:: 0.1
    """
    _check(duration, hosts, writers, stall_seconds)
    seed = random.randrange(2**32) if seed is None else seed
    owned: EmbeddedPostgres | None = None
    if server is None and dsn is None:
        owned = server = EmbeddedPostgres()
        await trio.to_thread.run_sync(owned.start)
    try:
        if server is not None:
            dsn = server.dsn
        assert dsn is not None
        kinds = available_faults(server is not None)
        if faults is not None:
            wanted = tuple(FaultKind(k) for k in faults)
            refused = [k.value for k in wanted if k not in kinds]
            if refused:
                raise ConfigurationError(
                    f"faults {refused} need a server this run owns: omit the DSN to use an "
                    "embedded one, or leave them out"
                )
            kinds = wanted
        if not kinds:
            raise ConfigurationError("faults is empty; give at least one FaultKind")
        return await _run(
            dsn,
            server,
            seed=seed,
            duration=float(duration),
            hosts=hosts,
            writers=writers,
            kinds=kinds,
            stall_seconds=float(stall_seconds),
            out=out,
        )
    finally:
        if owned is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(owned.cleanup)


async def _run(
    dsn: str,
    server: EmbeddedPostgres | None,
    *,
    seed: int,
    duration: float,
    hosts: int,
    writers: int,
    kinds: tuple[FaultKind, ...],
    stall_seconds: float,
    out: Callable[[str], None],
) -> TortureReport:
    schema = f"torture_{uuid.uuid4().hex[:8]}"
    app = f"{schema}_app"
    log_dir = Path(tempfile.mkdtemp(prefix="eventcore-torture-"))
    run = _Torture(
        dsn=dsn,
        server=server,
        schema=schema,
        app=app,
        seed=seed,
        duration=duration,
        writers=writers,
        kinds=kinds,
        stall_seconds=stall_seconds,
        out=out,
        log_dir=log_dir,
    )
    keep = False
    async with open_postgres_store(
        dsn, schema=schema, application_name="torture-control", connect_timeout=5
    ) as control:
        try:
            await control.admin.execute(app_schema_sql(schema, app))
            version = await control.admin.fetchval("SELECT current_setting('server_version')")
            out(
                f"torture: seed {seed}, {hosts} hosts, {writers} writers, {duration:.0f}s of "
                f"faults ({', '.join(k.value for k in kinds)}) on PostgreSQL {version}"
            )
            elapsed, caught_up = await run.play(control, hosts)
            findings = await verify(
                control,
                app,
                acknowledged=run.writes.acknowledged,
                rolled_back=run.writes.rolled_back,
                outbox=run.writes.outbox,
                followed=run.followed,
            )
            reactions = await control.admin.fetchval(
                f'SELECT count(*) FROM "{schema}".events WHERE type = $1', REACTION_TYPE
            )
            report = TortureReport(
                seed=seed,
                duration_s=elapsed,
                server=f"PostgreSQL {version}",
                appended=len(run.writes.acknowledged),
                rolled_back=len(run.writes.rolled_back),
                unknown_outcome=run.writes.unknown_outcome,
                faults=tuple(run.faults),
                host_crashes=run.host_crashes,
                events_by_path={**run.writes.by_path, "reactor": int(reactions)},
                **attrs.asdict(findings),
                unrecovered=sum(1 for f in run.faults if f.recovery_ms is None)
                + (0 if caught_up else 1),
            )
            keep = not report.ok
            if keep:
                out(f"kept schemas {schema} and {app}, and the host logs in {log_dir}")
            else:
                shutil.rmtree(log_dir, ignore_errors=True)
            return report
        finally:
            if not keep:
                with trio.CancelScope(shield=True), trio.move_on_after(30):
                    try:
                        await control.admin.execute(
                            f'DROP SCHEMA IF EXISTS "{app}" CASCADE; '
                            f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'
                        )
                    except EventCoreError as exc:
                        out(f"could not drop the run's schemas: {exc}")
