"""Our side of each benchmark: the same work through eventcore-trio's public API, on Trio."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import trio

from eventcore_trio import NewEvent, RecordedEvent, open_postgres_store
from eventcore_trio.projection import (
    ProjectionConfig,
    ProjectionContext,
    projector,
    run_projection,
)


async def append_single_sequential(dsn: str, schema: str, count: int) -> float:
    async with open_postgres_store(dsn, schema=schema) as store:
        started = time.perf_counter()
        for n in range(count):
            await store.append(
                "stream-0", [NewEvent("Deposited", {"amount": 1})], expected_version=n
            )
        return count / (time.perf_counter() - started)


async def append_single_concurrent(dsn: str, schema: str, count: int, tasks: int) -> float:
    per_task = count // tasks
    async with open_postgres_store(
        dsn, schema=schema, min_pool_size=tasks, max_pool_size=tasks
    ) as store:

        async def worker(w: int) -> None:
            for n in range(per_task):
                await store.append(
                    f"stream-{w}", [NewEvent("Deposited", {"amount": 1})], expected_version=n
                )

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for w in range(tasks):
                nursery.start_soon(worker, w)
        return per_task * tasks / (time.perf_counter() - started)


async def append_batch(dsn: str, schema: str, count: int, size: int) -> float:
    async with open_postgres_store(dsn, schema=schema) as store:
        batch = [NewEvent("Deposited", {"amount": n}) for n in range(size)]
        started = time.perf_counter()
        for b in range(count // size):
            await store.append("stream-0", batch, expected_version=b * size)
        return (count // size) * size / (time.perf_counter() - started)


async def load_events(dsn: str, schema: str, count: int) -> None:
    """Fill *schema* with *count* Deposited events over 100 accounts (the catch-up data)."""
    async with open_postgres_store(dsn, schema=schema) as store:
        for chunk in range(0, count, 1000):
            size = min(1000, count - chunk)
            await store.append(
                f"account-{(chunk // 1000) % 100}",
                [NewEvent("Deposited", {"amount": 1, "n": chunk + i}) for i in range(size)],
            )


async def catch_up(
    dsn: str,
    schema: str,
    names: list[str],
    batch_size: int,
    *,
    transactional: bool = False,
    queued: bool = False,
) -> float:
    """Run one catch-up projection per name, concurrently; returns total events/s.

    *transactional*: one upsert per event through ``ctx.db`` (a round trip each); with
    *queued*, the same upsert queued (``ctx.db.queue``), sent once per batch.
    """

    def make(name: str) -> Any:
        if queued:
            sql = (
                f'INSERT INTO "{schema}".balances (account, total) VALUES ($1, $2) '
                "ON CONFLICT (account) DO UPDATE SET total = balances.total + excluded.total"
            )

            @projector(name)
            async def queue_upsert(event: RecordedEvent, ctx: ProjectionContext) -> None:
                ctx.db.queue(sql, event.stream_id, event.data["amount"])

            return queue_upsert
        if not transactional:

            @projector(name)
            async def noop(event: RecordedEvent, ctx: ProjectionContext) -> None:
                return None

            return noop
        sql = (
            f'INSERT INTO "{schema}".balances (account, total) VALUES ($1, $2) '
            "ON CONFLICT (account) DO UPDATE SET total = balances.total + excluded.total"
        )

        @projector(name)
        async def upsert(event: RecordedEvent, ctx: ProjectionContext) -> None:
            await ctx.db.execute(sql, event.stream_id, event.data["amount"])

        return upsert

    total = 0
    config = ProjectionConfig(batch_size=batch_size)
    projectors = [make(name) for name in names]
    async with open_postgres_store(dsn, schema=schema, max_pool_size=max(4, len(names))) as store:

        async def one(projector_: Any) -> None:
            nonlocal total
            result = await run_projection(projector_, store, config)
            total += result.events_applied

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for projector_ in projectors:
                nursery.start_soon(one, projector_)
        return total / (time.perf_counter() - started)


async def latency(
    dsn: str, schema: str, count: int, interval: float, *, notify: bool, poll_interval: float
) -> list[float]:
    """Append one event at a time; a continuous projection applies it; latencies in ms."""
    sent: dict[str, float] = {}
    latencies: list[float] = []
    all_seen = trio.Event()

    @projector(f"latency-{'notify' if notify else 'poll'}", event_types=["Ping"])
    async def ping(event: RecordedEvent, ctx: ProjectionContext) -> None:
        key = event.data["key"]
        if key in sent:
            latencies.append((time.perf_counter() - sent[key]) * 1000)
            if len(latencies) == count:
                all_seen.set()

    config = ProjectionConfig(
        continuous=True, use_notifications=notify, poll_interval=poll_interval
    )
    async with open_postgres_store(dsn, schema=schema) as store, trio.open_nursery() as nursery:
        await nursery.start(run_projection, ping, store, config)
        for n in range(count):
            key = f"k{n}"
            sent[key] = time.perf_counter()
            await store.append("latency", [NewEvent("Ping", {"key": key})])
            await trio.sleep(interval)
        with trio.fail_after(60):
            await all_seen.wait()
        nursery.cancel_scope.cancel()
    return latencies


async def execute_transfer(dsn: str, schema: str, count: int, accounts: int) -> float:
    """Transfers through execute() with the demo's bank: read two streams, fold, decide,
    append atomically."""
    import random

    from eventcore_trio import StreamAppend, execute
    from eventcore_trio.demo import AccountOpened, InsufficientFunds, Transfer, registry

    names = [f"acc-{n:03d}" for n in range(accounts)]
    async with open_postgres_store(dsn, schema=schema) as store:
        opened = [registry.new_event(AccountOpened(1000))]
        await store.append_atomic(
            [StreamAppend(name, opened, expected_version=0) for name in names]
        )
        rng = random.Random(7)
        started = time.perf_counter()
        for _ in range(count):
            source, target = rng.sample(names, 2)
            transfer = Transfer(source, target, rng.randint(1, 50))
            # A refusal reads and decides like a transfer; it only appends nothing.
            with contextlib.suppress(InsufficientFunds):
                await execute(store, transfer, registry=registry)
        return count / (time.perf_counter() - started)
