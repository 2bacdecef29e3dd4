"""Attacks on the faster failover (commit 17881c5): a stopping leader ends its lock session
first, the standby's granted statement resets lock_timeout, and the new leader reads its
checkpoint while it reports RUNNING (the fourth, connections that know built-in arrays up
front, is tested with the pool in test_pool.py).

Run as a program (``python -m tests.postgres.test_failover_attack host SCHEMA APP``, the DSN in
EVENTCORE_DSN) it is the host these tests stop: `run_host` with one transactional projector
that records every Deposited event it applies in APP.applied through ctx.db.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import signal
import statistics
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Final

import pytest
import trio
import trio.testing

from eventcore_trio import (
    EventFilter,
    NewEvent,
    Position,
    RecordedEvent,
    open_postgres_store,
)
from eventcore_trio.postgres import (
    DSN_ENVIRONMENT_VARIABLE,
    PostgresLeadership,
    PostgresStore,
    _bridge,
    _leadership,
    projector_lock_key,
)
from eventcore_trio.postgres._lock_session import wait_for_lock
from eventcore_trio.projection import (
    ProjectionConfig,
    ProjectionContext,
    projector,
    run_host,
    run_projection,
    run_projections,
)
from eventcore_trio.testing import (
    EmbeddedPostgres,
    PostgresHarness,
    read_all,
    run_ready_process,
    wait_for_leader,
)

from ..conftest import oldest_server_param
from ..helpers import eventually
from .test_leadership import _waits_for_a_lock
from .test_tls import _dsn as _tls_dsn
from .test_tls import tls_server  # noqa: F401 (a fixture)

ROOT = Path(__file__).parent.parent.parent
HOST = (sys.executable, "-m", "tests.postgres.test_failover_attack", "host")
#: SIGTERMs of a leading host per run.
ROUNDS: Final = int(os.environ.get("ATTACK_ROUNDS", "6"))


def _host(schema: str, app: str) -> int:
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )

    @projector("ledger", event_types=["Deposited"])
    async def ledger(event: RecordedEvent, ctx: ProjectionContext) -> None:
        n = event.data["n"]
        # Some events send a large statement (the Terminate lands behind it), half of them
        # go through queue (a pipelined executemany), half one statement each.
        pad = "x" * (300_000 if n % 13 == 0 else 1)
        sql = f'INSERT INTO "{app}".applied (event_id, n, pid, pad) VALUES ($1, $2, $3, $4)'
        if n % 2:
            ctx.db.queue(sql, event.event_id, n, os.getpid(), pad)
        else:
            await ctx.db.execute(sql, event.event_id, n, os.getpid(), pad)

    if "ATTACK_PING_INTERVAL" in os.environ:
        # A keepalive that pings all the time makes the stop-while-a-batch-waits moment
        # (TestCancelledHolder) common enough to meet in a run of a few hundred SIGTERMs.
        _leadership.PING_INTERVAL = float(os.environ["ATTACK_PING_INTERVAL"])  # type: ignore[misc]
    config = ProjectionConfig(batch_size=8, poll_interval=0.5)
    dsn = os.environ[DSN_ENVIRONMENT_VARIABLE]
    return trio.run(
        functools.partial(
            run_host,
            functools.partial(open_postgres_store, dsn, schema=schema),
            [ledger],
            config,
        )
    )


def _leaves(exc: BaseException) -> list[str]:
    # What a group that escaped holds, flattened: its leaves' types and messages.
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [f"{type(exc).__name__}: {str(exc)[:100]}"]


def _not_cancelled(exc: BaseException) -> list[str]:
    # The leaves of what escaped a stopped holder besides its cancellation: the findings.
    return [leaf for leaf in _leaves(exc) if not leaf.startswith("Cancelled")]


async def _deposit(
    store: PostgresStore, scope: trio.CancelScope, *, streams: int, pause: float, noted: bool
) -> None:
    # The tests' writer, until *scope* is cancelled: a Deposited event (and a Noted one,
    # which the ledger does not apply) per append, over *streams* accounts.
    with scope:
        n = 0
        while True:
            events = [NewEvent("Deposited", {"n": n})]
            if noted:
                events.append(NewEvent("Noted", {"n": n}))
            await store.append(f"acc-{n % streams}", events)
            n += 1
            await trio.sleep(pause)


async def _lock_holder(store: PostgresStore) -> str | None:
    # The application name of the session holding the ledger's lock.
    name: str | None = await store.admin.fetchval(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND ((l.classid::bigint << 32) | l.objid::bigint) = $1",
        projector_lock_key(store.schema, "ledger"),
    )
    return name


async def _applied_schema(store: PostgresStore) -> str:
    app = f"app_{uuid.uuid4().hex[:10]}"
    await store.admin.execute(
        f'CREATE SCHEMA "{app}"; '
        f'CREATE TABLE "{app}".applied (id bigserial PRIMARY KEY, event_id uuid NOT NULL, '
        "n bigint NOT NULL, pid int NOT NULL, pad text NOT NULL, "
        "applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
    return app


class _Hosts:
    """Host processes of one test, each with its stderr in a file."""

    def __init__(self, nursery: trio.Nursery, dsn: str, schema: str, app: str, logs: Path) -> None:
        self._nursery = nursery
        self._env = {DSN_ENVIRONMENT_VARIABLE: dsn, "PYTHONPATH": str(ROOT)}
        if "ATTACK_PING_INTERVAL" in os.environ:
            self._env["ATTACK_PING_INTERVAL"] = os.environ["ATTACK_PING_INTERVAL"]
        self._argv = [*HOST, schema, app]
        self._logs = logs
        self.processes: dict[int, trio.Process] = {}
        self.stderr: dict[int, Path] = {}

    async def start(self) -> int:
        log = self._logs / f"host-{len(self.stderr)}.log"
        with log.open("wb") as file:
            process: trio.Process = await self._nursery.start(
                functools.partial(
                    run_ready_process,
                    list(self._argv),
                    env=self._env,
                    stderr=file,
                    startup_limit=60,
                )
            )
        self.processes[process.pid] = process
        self.stderr[process.pid] = log
        return process.pid


async def _applied_by(store: PostgresStore, app: str, since: object, pid: int) -> bool:
    return bool(
        await store.admin.fetchval(
            f'SELECT EXISTS (SELECT 1 FROM "{app}".applied WHERE applied_at > $1 AND pid = $2)',
            since,
            pid,
        )
    )


async def _taken_over(store: PostgresStore, app: str, since: object, not_by: int) -> bool:
    return bool(
        await store.admin.fetchval(
            f'SELECT EXISTS (SELECT 1 FROM "{app}".applied WHERE applied_at > $1 AND pid <> $2)',
            since,
            not_by,
        )
    )


async def _verify_exactly_once(store: PostgresStore, app: str) -> int:
    deposits = [e for e in await read_all(store, page_size=1000) if e.type == "Deposited"]
    rows = await store.admin.fetch(f'SELECT event_id FROM "{app}".applied ORDER BY id')
    applied = [r["event_id"] for r in rows]
    assert len(applied) == len(set(applied)), "an event was applied twice"
    assert set(applied) == {e.event_id for e in deposits}, "an event was lost"
    assert applied == [e.event_id for e in deposits], "applied out of order"
    return len(applied)


async def _caught_up(store: PostgresStore) -> bool:
    checkpoint = await store.load_checkpoint("ledger")
    last = await store.last_position(EventFilter(event_types=["Deposited"]))
    return checkpoint is not None and last is not None and checkpoint >= last


class TestSigterm:
    """A leading host stopped by SIGTERM in the middle of its batches (run_host cancels
    everything; the keepalive's end writes Terminate while a batch may be in flight)."""

    async def test_sigterm_leaders_repeatedly_exactly_once_and_quietly(
        self, store: PostgresStore, harness: PostgresHarness, tmp_path: Path
    ) -> None:
        """Each SIGTERM: the host exits 0 within seconds, says nothing above INFO while it
        stops, a standby applies the next events, and at the end every event was applied
        exactly once, in order."""
        app = await _applied_schema(store)
        takeovers: list[float] = []
        stops: list[float] = []
        async with trio.open_nursery() as nursery:
            hosts = _Hosts(nursery, harness.dsn, harness.schema, app, tmp_path)
            for _ in range(2):
                await hosts.start()
            writing = trio.CancelScope()
            nursery.start_soon(
                partial(_deposit, store, writing, streams=10, pause=0.004, noted=True)
            )
            for _ in range(ROUNDS):
                with trio.fail_after(30):
                    leader = await wait_for_leader(store, "ledger")
                # In the middle of its batches: it has applied something since it led.
                since = await store.admin.fetchval("SELECT clock_timestamp()")
                await eventually(partial(_applied_by, store, app, since, leader), within=30)
                process = hosts.processes.pop(leader)
                said_before = hosts.stderr[leader].stat().st_size
                sent_at = await store.admin.fetchval("SELECT clock_timestamp()")
                started = trio.current_time()
                process.send_signal(signal.SIGTERM)
                with trio.fail_after(20):
                    code = await process.wait()
                stops.append(trio.current_time() - started)
                said = hosts.stderr[leader].read_bytes()[said_before:].decode()
                assert code == 0, said
                loud = [
                    line for line in said.splitlines() if not line.startswith(("INFO ", "DEBUG "))
                ]
                assert loud == [], said
                await eventually(partial(_taken_over, store, app, sent_at, leader), within=30)
                first = await store.admin.fetchval(
                    f'SELECT min(applied_at) FROM "{app}".applied WHERE applied_at > $1 '
                    "AND pid <> $2",
                    sent_at,
                    leader,
                )
                takeovers.append((first - sent_at).total_seconds() * 1000)
                await hosts.start()
            writing.cancel()
            await eventually(lambda: _caught_up(store), within=60)
            nursery.cancel_scope.cancel()
        applied = await _verify_exactly_once(store, app)
        print(
            f"\nSIGTERM: {len(takeovers)} takeovers, p50 {statistics.median(takeovers):.0f} ms, "
            f"max {max(takeovers):.0f} ms; stops p50 {statistics.median(stops):.2f} s, "
            f"max {max(stops):.2f} s; {applied} events applied exactly once"
        )


def _heavy_ledger(app: str) -> object:
    # Per event: one statement, a queued write (pipelined with the next ones), and now and
    # then a statement of about 1 MB: a cancellation lands in every kind of crossing.
    sql = (
        f'INSERT INTO "{app}".applied (event_id, n, pid, pad) VALUES ($1, $2, pg_backend_pid(), $3)'
    )

    @projector("ledger", event_types=["Deposited"])
    async def ledger(event: RecordedEvent, ctx: ProjectionContext) -> None:
        n = event.data["n"]
        pad = "y" * (1_000_000 if n % 11 == 0 else 1)
        if n % 3 == 0:
            await ctx.db.execute(sql, event.event_id, n, pad)
        else:
            ctx.db.queue(sql, event.event_id, n, pad)
        await ctx.db.fetchval("SELECT $1::int8[]", [n, None])

    return ledger


async def _cancel_when_sending(scope: trio.CancelScope) -> None:
    # Once every task waits (the batch's statement is in the socket's buffers, on its way).
    await trio.testing.wait_all_tasks_blocked()
    scope.cancel()


class TestLockSession:
    """The lock session's own statements (claims 1 and 2)."""

    async def test_the_lock_session_is_gone_once_the_block_has_exited(
        self, store: PostgresStore
    ) -> None:
        """After a block that ends normally, and after one cancelled while its batch sends a
        50 MB statement (the Terminate goes out behind it): once the block has exited, the
        server has no such session and nobody holds the lock (no polling), and a standby
        took over meanwhile."""
        big = "z" * 50_000_000

        async def standby(took_over: trio.Event) -> None:
            async with store.wait_acquire("gone"):
                took_over.set()

        for cancel in (False, True):
            pids: list[int] = []
            took_over = trio.Event()
            scope = trio.CancelScope()
            async with trio.open_nursery() as nursery:
                with scope:
                    async with store.try_acquire("gone") as leadership:
                        pids.append(leadership.backend_pid)
                        nursery.start_soon(standby, took_over)
                        await eventually(lambda: _waits_for_a_lock(store))
                        if cancel:
                            nursery.start_soon(_cancel_when_sending, scope)
                            async with leadership.open_batch() as batch:
                                await batch.db.execute("SELECT length($1::text)", big)
                assert scope.cancelled_caught is cancel
                gone = await store.admin.fetchval(
                    "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)", pids[0]
                )
                assert gone
                with trio.fail_after(10):
                    await took_over.wait()

    async def test_the_shared_session_branch_also_ends_the_wait_slices(
        self, store: PostgresStore, postgres_dsn: str
    ) -> None:
        """A standby whose granted statement finds its session already holding an advisory
        lock (the ``THEN false`` branch): not acquired, the lock it waited for not taken, and
        lock_timeout back at 0."""
        connection = await _bridge.connect(
            postgres_dsn, application_name="shared", connect_timeout=10
        )
        key = projector_lock_key(store.schema, "shared")
        try:
            await connection.execute("SELECT pg_advisory_lock(4242)")
            _, acquired = await wait_for_lock(connection, key)
            assert acquired is False
            assert await connection.fetchval("SELECT current_setting('lock_timeout')") == "0"
            held = await connection.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                "AND pid = pg_backend_pid()"
            )
            assert held == 1
        finally:
            await connection.close()

    @pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
    @pytest.mark.usefixtures("tls_server")
    async def test_over_tls_a_stopping_leader_lets_go_before_it_has_unwound(
        self, request: pytest.FixtureRequest
    ) -> None:
        """The Terminate goes through the TLS layer (the transport asyncpg writes to): a
        cancelled holder's standby takes over while the holder is still unwinding."""
        server: EmbeddedPostgres
        server, directory = request.getfixturevalue("tls_server")
        dsn = _tls_dsn(server, "localhost", f"sslmode=verify-full&sslrootcert={directory}/ca.crt")
        took_over = trio.Event()
        scope = trio.CancelScope()
        async with (
            open_postgres_store(dsn, schema=f"t_{uuid.uuid4().hex[:12]}") as store,
            trio.open_nursery() as nursery,
        ):

            async def standby() -> None:
                async with store.wait_acquire("tls"):
                    took_over.set()

            with scope:
                async with store.try_acquire("tls") as leadership:
                    assert isinstance(leadership, PostgresLeadership)
                    async with leadership._use() as connection:
                        assert await connection.fetchval(
                            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                        )
                    nursery.start_soon(standby)
                    await eventually(lambda: _waits_for_a_lock(store))
                    try:
                        scope.cancel()
                        await trio.sleep_forever()
                    finally:
                        with trio.CancelScope(shield=True), trio.fail_after(10):
                            await took_over.wait()


class TestCancelledHolder:
    """What a holder hears when it is cancelled: its cancellation, never a lost lock."""

    async def test_a_cancelled_holder_waiting_for_its_session_hears_the_cancellation(
        self, store: PostgresStore
    ) -> None:
        """The holder waits for the lock session while the keepalive's ping uses it; the ping
        ends (handing the session to the holder) and the stop comes in the same step. The
        keepalive's end marks the leadership lost before the holder runs; the holder must
        still end in its cancellation (a `move_on_after` around `run_projection` must not
        raise), not in `LeadershipLost` (trio runs either task first: 20 tries)."""
        escaped: list[str] = []
        leaderships: list[PostgresLeadership] = []

        async def holder(
            name: str, scope: trio.CancelScope, holding: trio.Event, pinging: trio.Event
        ) -> None:
            try:
                with scope:
                    async with store.try_acquire(name) as leadership:
                        assert isinstance(leadership, PostgresLeadership)
                        leaderships.append(leadership)
                        holding.set()
                        await pinging.wait()
                        async with leadership.open_batch() as batch:
                            await batch.save_checkpoint(None, Position(1, 1))
            except BaseException as exc:
                # A group too: the keepalive's Cancelled travels with it out of the
                # leadership's nursery, and the scope strips only the Cancelled.
                found = _not_cancelled(exc)
                if not found:
                    raise
                escaped.extend(found)  # the finding (the test fails below)

        for trial in range(20):
            scope = trio.CancelScope()
            holding = trio.Event()
            pinging = trio.Event()
            leaderships.clear()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(holder, f"race-{trial}", scope, holding, pinging)
                await holding.wait()
                # What the keepalive's ping holds while its statement runs.
                lock = leaderships[0]._connection_lock
                await lock.acquire()
                pinging.set()
                await trio.testing.wait_all_tasks_blocked()
                assert lock.statistics().tasks_waiting == 1
                lock.release()
                scope.cancel()
        assert escaped == []

    async def test_a_host_stopped_while_its_batch_waits_for_the_session_stops_quietly(
        self,
        store: PostgresStore,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """The same moment inside a host (`run_projections`, what run_host runs and cancels
        on SIGTERM): the unit's next batch waits for the session while a ping holds it, and
        the stop comes as the ping ends. The host must end in its cancellation alone and say
        nothing above INFO (12 tries; trio runs either task first)."""
        caplog.set_level(logging.INFO)
        app = await _applied_schema(store)
        leaderships: list[PostgresLeadership] = []
        acquire = PostgresStore._acquire

        @asynccontextmanager
        async def capturing(
            self: PostgresStore, name: str, **options: Any
        ) -> AsyncIterator[PostgresLeadership]:
            async with acquire(self, name, **options) as leadership:
                if name == "ledger":
                    leaderships.append(leadership)
                yield leadership

        monkeypatch.setattr(PostgresStore, "_acquire", capturing)
        ledger = _heavy_ledger(app)
        config = ProjectionConfig(poll_interval=0.5, balance=False)
        escaped: list[str] = []

        async def host(
            scope: trio.CancelScope,
            *,
            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            try:
                with scope:
                    await run_projections(store, [ledger], config, task_status=task_status)
            except BaseException as exc:
                found = _not_cancelled(exc)
                if not found:
                    raise
                escaped.extend(found)  # the finding (the test fails below)

        for trial in range(12):
            leaderships.clear()
            scope = trio.CancelScope()
            async with trio.open_nursery() as nursery:
                await nursery.start(host, scope)
                [leadership] = leaderships
                lock = leadership._connection_lock
                # What the keepalive's ping holds while its statement runs.
                await lock.acquire()
                await store.append("acc", [NewEvent("Deposited", {"n": trial})])
                with trio.fail_after(10):
                    while not lock.statistics().tasks_waiting:
                        await trio.testing.wait_all_tasks_blocked(cushion=0.005)
                lock.release()
                scope.cancel()
            assert escaped == [], (trial, escaped)
        loud = [r.getMessage() for r in caplog.records if r.levelno > logging.INFO]
        assert loud == []


class _Turns:
    """Runners in this process, each on a store of its own, taking turns to lead the
    ledger: the leading one is cancelled a random moment after it took over (mid-statement,
    mid-pipeline, mid-commit), and a fresh one starts. What escapes a runner besides its
    cancellation is kept in `escaped` (and raised)."""

    def __init__(
        self,
        nursery: trio.Nursery,
        harness: PostgresHarness,
        run: Callable[[PostgresStore], Awaitable[object]],
    ) -> None:
        self._nursery = nursery
        self._harness = harness
        self._run = run
        self._scopes: dict[str, trio.CancelScope] = {}
        self._done: dict[str, trio.Event] = {}
        self.escaped: list[str] = []
        #: How long each cancelled runner took to end (its store closed).
        self.unwinding: list[float] = []

    async def _runner(self, tag: str) -> None:
        scope = self._scopes[tag] = trio.CancelScope()
        self._done[tag] = trio.Event()
        try:
            with scope:
                async with open_postgres_store(
                    self._harness.dsn, schema=self._harness.schema, application_name=tag
                ) as own:
                    await self._run(own)
        except BaseException as exc:
            # The test's own end cancels the runners still going: their Cancelled is no
            # finding; anything else that escapes one is.
            self.escaped.extend(_not_cancelled(exc))
            raise
        finally:
            self._done[tag].set()

    async def take(self, store: PostgresStore, turns: int, rng: random.Random) -> None:
        """Start two runners, then *turns* times cancel the leading one and start another."""
        for serial in range(2):
            self._nursery.start_soon(self._runner, f"turn-{serial}")
        for serial in range(2, turns + 2):

            async def leads() -> bool:
                holder = await _lock_holder(store)
                return holder is not None and holder.startswith("turn-")

            await eventually(leads, within=30)
            holder = await _lock_holder(store)
            assert holder is not None
            tag = holder.split()[0]
            await trio.sleep(rng.uniform(0, 0.25))
            started = trio.current_time()
            self._scopes[tag].cancel()
            with trio.fail_after(10):
                await self._done[tag].wait()
            self.unwinding.append(trio.current_time() - started)
            self._nursery.start_soon(self._runner, f"turn-{serial}")


class TestCancelledLeader:
    """Leaders in this process cancelled at many moments, a standby in another store."""

    async def test_cancelled_at_many_moments_the_standby_resumes_exactly_once(
        self, store: PostgresStore, harness: PostgresHarness
    ) -> None:
        """Two runs on two stores take turns: the leading one is cancelled a random moment
        after it took over (mid-statement, mid-pipeline, mid-commit); its scope exits within
        a second; the other takes over; in the end every event was applied exactly once."""
        app = await _applied_schema(store)
        ledger = _heavy_ledger(app)
        config = ProjectionConfig(batch_size=6, continuous=True, wait_for_leadership=True)
        rng = random.Random(int(os.environ.get("ATTACK_SEED", "1788")))
        async with trio.open_nursery() as nursery:
            turns = _Turns(nursery, harness, lambda own: run_projection(own, ledger, config))
            writing = trio.CancelScope()
            nursery.start_soon(
                partial(_deposit, store, writing, streams=7, pause=0.003, noted=False)
            )
            await turns.take(store, ROUNDS * 4, rng)
            writing.cancel()
            await eventually(lambda: _caught_up(store), within=60)
            nursery.cancel_scope.cancel()
        applied = await _verify_exactly_once(store, app)
        print(
            f"\ncancelled {len(turns.unwinding)} leaders ({applied} events): unwound (store "
            f"closed) p50 {statistics.median(turns.unwinding):.2f} s, "
            f"max {max(turns.unwinding):.2f} s"
        )

    async def test_hosts_cancelled_at_many_moments_stop_quietly(
        self,
        store: PostgresStore,
        harness: PostgresHarness,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """What run_host does on SIGTERM, in this process: `run_projections` hosts take
        turns; the leading one is cancelled a random moment after it took over. Each ends in
        its cancellation alone (nothing escapes its scope) and says nothing above INFO;
        every event is applied exactly once. The keepalive pings every 2 ms here (0.5 s in
        production), so that a stop often lands while a batch waits for the session."""
        monkeypatch.setattr(_leadership, "PING_INTERVAL", 0.002)
        caplog.set_level(logging.INFO)
        app = await _applied_schema(store)
        ledger = _heavy_ledger(app)
        config = ProjectionConfig(batch_size=6, poll_interval=0.5)
        rng = random.Random(int(os.environ.get("ATTACK_SEED", "1788")))
        async with trio.open_nursery() as nursery:
            turns = _Turns(nursery, harness, lambda own: run_projections(own, [ledger], config))
            writing = trio.CancelScope()
            nursery.start_soon(
                partial(_deposit, store, writing, streams=7, pause=0.003, noted=False)
            )
            await turns.take(store, ROUNDS * 4, rng)
            writing.cancel()
            await eventually(lambda: _caught_up(store), within=60)
            nursery.cancel_scope.cancel()
        assert turns.escaped == []
        loud = [r.getMessage() for r in caplog.records if r.levelno > logging.INFO]
        assert loud == []
        await _verify_exactly_once(store, app)

    async def test_a_commit_in_flight_that_completes_is_seen_by_the_standby(
        self, store: PostgresStore, harness: PostgresHarness
    ) -> None:
        """The leader is cancelled while its batch's COMMIT runs on the server (a deferred
        trigger that outlasts the cancel request); the COMMIT completes there. The lock is
        released only after it (the server reads Terminate after COMMIT), so the standby
        resumes after that batch: nothing applied twice, nothing lost."""
        app = await _applied_schema(store)
        await store.admin.execute(
            f'CREATE FUNCTION "{app}".slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ '
            "BEGIN IF NEW.n = 3 THEN "
            "BEGIN PERFORM pg_sleep(5); EXCEPTION WHEN query_canceled THEN "
            "PERFORM pg_sleep(0.5); END; END IF; RETURN NULL; END $$; "
            f'CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON "{app}".applied '
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
            f'EXECUTE FUNCTION "{app}".slow_commit()'
        )
        for n in range(20):
            await store.append(f"acc-{n % 3}", [NewEvent("Deposited", {"n": n})])
        ledger = _heavy_ledger(app)
        config = ProjectionConfig(batch_size=10, wait_for_leadership=True)

        async def committing() -> bool:
            return bool(
                await store.admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                    "AND query = 'COMMIT' AND application_name LIKE 'leading %' "
                    # In the trigger's sleep, which catches the cancellation: a cancel that
                    # came earlier in the COMMIT would abort it (also correct, but not
                    # this scenario).
                    "AND wait_event = 'PgSleep'"
                )
            )

        async with (
            open_postgres_store(
                harness.dsn, schema=harness.schema, application_name="leading"
            ) as leading,
            open_postgres_store(
                harness.dsn, schema=harness.schema, application_name="standing"
            ) as standing,
            trio.open_nursery() as nursery,
        ):
            scope = trio.CancelScope()
            cancelled = trio.Event()

            async def leader() -> None:
                with scope:
                    await run_projection(leading, ledger, config)
                cancelled.set()

            nursery.start_soon(leader)
            await eventually(committing)
            await nursery.start(run_projection, standing, ledger, config)
            scope.cancel()
            with trio.fail_after(10):
                await cancelled.wait()
        assert await _verify_exactly_once(store, app) == 20
        # The leader's first batch (events 0-9) did commit, after its cancellation; the
        # standby applied the rest, on another session.
        row = await store.admin.fetchrow(
            "SELECT array_agg(DISTINCT pid) FILTER (WHERE n < 10) AS first, "
            f'array_agg(DISTINCT pid) FILTER (WHERE n >= 10) AS rest FROM "{app}".applied'
        )
        assert row is not None
        first, rest = row["first"], row["rest"]
        assert len(first) == len(rest) == 1
        assert first != rest


if __name__ == "__main__" and sys.argv[1] == "host":
    sys.exit(_host(sys.argv[2], sys.argv[3]))
