"""Failover: kill -9 the leading host process; time until the standby process applies."""

from __future__ import annotations

import datetime as dt
import signal
import sys

import trio

from eventcore_trio import NewEvent, open_postgres_store
from eventcore_trio.postgres import DSN_ENVIRONMENT_VARIABLE, PostgresStore
from eventcore_trio.testing import run_ready_process, wait_for_leader


async def _host(
    dsn: str, schema: str, *, task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED
) -> None:
    # The DSN (which may hold a password) goes through the environment, not argv.
    await run_ready_process(
        [sys.executable, "-m", "benchmarks._host_process", schema],
        env={DSN_ENVIRONMENT_VARIABLE: dsn},
        task_status=task_status,
    )


async def _first_after(store: PostgresStore, since: dt.datetime, not_by: int) -> dt.datetime | None:
    first: dt.datetime | None = await store.admin.fetchval(
        f'SELECT min(applied_at) FROM "{store.schema}".applied '
        "WHERE applied_at > $1 AND applied_by <> $2",
        since,
        not_by,
    )
    return first


async def _poll(condition: object, limit: float = 30) -> None:
    # The state lives in another process and the database: poll it.
    with trio.fail_after(limit):
        while not await condition():  # type: ignore[operator]  # noqa: ASYNC110
            await trio.sleep(0.005)


async def failover(dsn: str, schema: str, kills: int) -> list[float]:
    """Milliseconds from each SIGKILL of the leader to the first event the standby applied."""
    takeovers: list[float] = []
    async with open_postgres_store(dsn, schema=schema) as store:
        await store.admin.execute(
            f'CREATE TABLE "{schema}".applied (id bigserial PRIMARY KEY, applied_by int NOT NULL, '
            "applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        async with trio.open_nursery() as nursery:
            hosts = [await nursery.start(_host, dsn, schema) for _ in range(2)]

            async def writer() -> None:
                n = 0
                while True:
                    await store.append("ticks", [NewEvent("Tick", {"n": n})])
                    n += 1
                    await trio.sleep(0.002)

            nursery.start_soon(writer)
            for _ in range(kills):
                with trio.fail_after(30):
                    leader = await wait_for_leader(store, "failover", poll=0.01)
                killed_at = await store.admin.fetchval("SELECT clock_timestamp()")
                victim = next(h for h in hosts if h.pid == leader)
                victim.send_signal(signal.SIGKILL)
                hosts.remove(victim)

                async def taken_over(since: dt.datetime = killed_at, old: int = leader) -> bool:
                    return await _first_after(store, since, old) is not None

                await _poll(taken_over)
                first = await _first_after(store, killed_at, leader)
                assert first is not None
                takeovers.append((first - killed_at).total_seconds() * 1000)
                hosts.append(await nursery.start(_host, dsn, schema))
            nursery.cancel_scope.cancel()
    return takeovers
