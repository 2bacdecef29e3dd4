"""`run_torture`: the run's orchestration. It starts the hosts (`_host_slots`), the writers
(`_writers`) and the independent follower (`_follower`), lets `_faults` inject faults, stops
writing, waits for the catch-up, verifies (`_verify`) and reports (`_report`).
"""

from __future__ import annotations

import functools
import random
import shutil
import tempfile
import uuid
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Final

import attrs
import trio

from .._errors import ConfigurationError, EventCoreError
from .._partitions import Partition, Unit
from .._tools._embedded import EmbeddedPostgres
from ..postgres import PostgresStore, open_postgres_store
from ._faults import WRITERS_APPLICATION, FaultInjector, available_faults, until
from ._follower import Follower
from ._host_slots import HostProcesses
from ._model import (
    PARTITIONED_NAME,
    PARTITIONS,
    PROJECTOR_NAME,
    REACTION_TYPE,
    REACTOR_NAME,
    app_schema_sql,
)
from ._report import FaultKind, TortureReport
from ._verify import verify
from ._writers import WriteLog, write

#: ``torture`` runs this long by default; ``--quick`` runs `QUICK_DURATION`.
DEFAULT_DURATION: Final = 300.0
QUICK_DURATION: Final = 40.0


@attrs.define
class _Torture:
    # One run: its hosts (and where they connect), its writers' record, its faults and its
    # follower.
    seed: int
    writers: int
    hosts: HostProcesses
    injector: FaultInjector
    writes: WriteLog
    follower: Follower = attrs.Factory(Follower)
    stop_writing: trio.Event = attrs.Factory(trio.Event)

    async def play(self, control: PostgresStore, hosts: int) -> tuple[float, bool]:
        """Start the hosts and the writers, inject faults, stop writing, wait for catch-up.

        Returns how long the faults ran and whether the projection caught up afterwards.
        """
        async with (
            open_postgres_store(
                self.hosts.dsn,
                schema=self.hosts.schema,
                migrate=False,
                application_name=WRITERS_APPLICATION,
                max_pool_size=self.writers + 2,
                connect_timeout=5,
            ) as writing,
            trio.open_nursery() as nursery,
        ):
            self.hosts.nursery = nursery
            for _ in range(hosts):
                await self.hosts.add()
            self.hosts.out(
                f"hosts ready (logs in {self.hosts.log_dir}); writing and injecting faults…"
            )
            self.injector.begin = trio.current_time()
            following = trio.CancelScope()
            nursery.start_soon(self.follower.follow, writing, following)
            async with trio.open_nursery() as writers_nursery:
                for index in range(self.writers):
                    writers_nursery.start_soon(
                        functools.partial(
                            write,
                            writing,
                            self.writes,
                            app=self.hosts.app,
                            seed=f"{self.seed}/{index}",
                            stop=self.stop_writing,
                        )
                    )
                await self.injector.inject_faults(control, writing)
                elapsed = self.injector.now()
                # Writers finish what they started: a transaction still open when the
                # catch-up check runs would commit after it, unseen.
                self.stop_writing.set()
            self.hosts.out("faults done; waiting for the projections to catch up…")
            caught_up = await self.caught_up(control)
            following.cancel()
            # Everything is committed and nothing writes any more: the follower reads on to
            # the end of the log.
            await until(functools.partial(self.follower.drain, writing), 0.1)
            self.hosts.expect_exits()
            nursery.cancel_scope.cancel()
        return elapsed, caught_up

    async def caught_up(self, control: PostgresStore) -> bool:
        """Wait until every unit of every projection has applied the whole log."""
        units = {Unit(PROJECTOR_NAME).name, Unit(REACTOR_NAME).name} | {
            Unit(PARTITIONED_NAME, Partition(i, PARTITIONS)).name for i in range(PARTITIONS)
        }

        async def probe() -> bool | None:
            status = [s for s in await control.projection_status() if s.unit in units]
            done = {s.unit for s in status if s.lag_events == 0}
            return True if done == units else None

        return await until(probe, 0.1) is not None


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
    moment, outbox transactions (`PostgresStore.transaction`) that write a row of their
    own before, between or after their appends (and sometimes claim a seat, last), and
    decisions over a query (`PostgresStore.read_query`, then a conditional
    `PostgresStore.append_tagged`) competing for the seat of the current half second; every
    posting carries its account's tag; held and outbox transactions sometimes roll back.
    *hosts* processes host three transactional projections (a ledger, the ledger in
    partitions, and the ledger as a reactor that appends after writing through ``ctx.db``),
    each through its own `NetworkProxy`, and an independent follower pages ``read_events``.
    Faults are injected one at a time on a seeded schedule, each once the previous one has
    been recovered from: SIGKILL and SIGTERM of the leader, ``pg_terminate_backend`` of its
    lock session and of all pooled sessions, a network drop and a stall of the leader's
    connection, hosts joining and leaving, failing notifications after appends and, when the
    run owns the server, a fast restart and a crash (immediate shutdown) of PostgreSQL. Then
    the writers stop, the projections catch up, and the log is checked against the writers'
    record, the read models, the evidence each projection committed with each batch, the
    reactions, the outbox rows, the seat claims (a decision's claim must be the first of its
    seat) and what the follower was given.

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
    processes = HostProcesses(dsn=dsn, schema=schema, app=app, out=out, log_dir=log_dir)
    writes = WriteLog()
    injector = FaultInjector(
        schema=schema,
        server=server,
        seed=seed,
        duration=duration,
        kinds=kinds,
        stall_seconds=stall_seconds,
        out=out,
        hosts=processes,
        writes=writes,
    )
    run = _Torture(seed=seed, writers=writers, hosts=processes, injector=injector, writes=writes)
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
                followed=run.follower.followed,
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
                faults=tuple(injector.faults),
                host_crashes=processes.crashes,
                events_by_path={**run.writes.by_path, "reactor": int(reactions)},
                decisions=dict(run.writes.decisions),
                deadlocks=run.writes.deadlocks,
                **attrs.asdict(findings),
                unrecovered=sum(1 for f in injector.faults if f.recovery_ms is None)
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
