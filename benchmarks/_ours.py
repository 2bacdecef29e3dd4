"""Our side of each benchmark: the same work through eventcore-trio's public API, on Trio."""

from __future__ import annotations

import functools
import time
from typing import Any

import trio

from eventcore_trio import NewEvent, RecordedEvent, StreamAppend, open_postgres_store
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


#: The subjects of append_single_personal: a handful, so each key is made once and cached.
APPEND_SUBJECTS = 5
#: The subjects (and streams) of catch_up_personal's events, and the events each append
#: gives one: a page of 500 holds the events of five subjects.
CATCH_UP_SUBJECTS, EVENTS_PER_SUBJECT_CHUNK = 100, 100


#: The key under which `_harness.ours_fresh` passes keyword arguments (last among the
#: arguments, to this module's command line entry below).
KWARGS = "__kwargs__"


def customer_event(n: int, subject: str, personal: bool) -> NewEvent:
    """The event of the personal-data benchmarks: two personal fields (an email and a name)
    next to two plain ones; *personal* False gives its plain twin, the same fields unsealed
    and no subject, so the two differ only in what issue 29 adds."""
    data = {"amount": 1, "n": n, "email": f"{subject}@example.org", "name": "Ada Lovelace"}
    if not personal:
        return NewEvent("CustomerUpdated", data)
    return NewEvent("CustomerUpdated", data, subject=subject, personal=["email", "name"])


async def append_single_customer(
    dsn: str, schema: str, count: int, key_encryption_key: bytes, personal: bool
) -> float:
    """`append_single_sequential`'s loop with `customer_event`s over `APPEND_SUBJECTS`
    subjects, personal or their plain twins. Events/s."""
    async with open_postgres_store(
        dsn, schema=schema, key_encryption_key=key_encryption_key
    ) as store:
        started = time.perf_counter()
        for n in range(count):
            event = customer_event(n, f"customer-{n % APPEND_SUBJECTS}", personal)
            await store.append("stream-0", [event], expected_version=n)
        return count / (time.perf_counter() - started)


async def load_customer_events(
    dsn: str, schema: str, count: int, key_encryption_key: bytes, personal: bool
) -> None:
    """Fill *schema* with *count* `customer_event`s (catch_up_personal's data): streams
    ``customer-<k>``, each event about its stream's customer, 1,000 events per append."""
    async with open_postgres_store(
        dsn, schema=schema, key_encryption_key=key_encryption_key
    ) as store:
        for chunk in range(0, count, 1000):
            appends = []
            for start in range(chunk, min(chunk + 1000, count), EVENTS_PER_SUBJECT_CHUNK):
                subject = f"customer-{(start // EVENTS_PER_SUBJECT_CHUNK) % CATCH_UP_SUBJECTS}"
                end = min(start + EVENTS_PER_SUBJECT_CHUNK, count)
                events = [customer_event(n, subject, personal) for n in range(start, end)]
                appends.append(StreamAppend(subject, events))
            await store.append_atomic(appends)


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
    key_encryption_key: bytes | None = None,
    reads_personal: bool = False,
) -> float:
    """Run one catch-up projection per name, concurrently; returns total events/s.

    *transactional*: one upsert per event through ``ctx.db`` (a round trip each); with
    *queued*, the same upsert queued (``ctx.db.queue``), sent once per batch.
    *key_encryption_key*: the store's, for events with personal fields; with
    *reads_personal* the handler reads `customer_event`'s email and name (and nothing else).
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
        if reads_personal:

            @projector(name)
            async def reads(event: RecordedEvent, ctx: ProjectionContext) -> None:
                data = event.data
                if not (data["email"] and data["name"]):
                    raise AssertionError("a personal field read back empty")

            return reads
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
    async with open_postgres_store(
        dsn,
        schema=schema,
        max_pool_size=max(4, len(names)),
        key_encryption_key=key_encryption_key,
    ) as store:

        async def one(projector_: Any) -> None:
            nonlocal total
            result = await run_projection(store, projector_, config)
            total += result.events_applied

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for projector_ in projectors:
                nursery.start_soon(one, projector_)
        return total / (time.perf_counter() - started)


async def latency(
    dsn: str,
    schema: str,
    count: int,
    interval: float,
    *,
    notify: bool,
    poll_interval: float,
    others: int = 0,
) -> list[float]:
    """Append one event at a time; a continuous projection applies it; latencies in ms.

    With *others*, that many more projections apply the same events at the same time, each
    with an upsert in its batch transaction (which holds a transaction id while it runs).
    """
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
        await nursery.start(run_projection, store, ping, config)
        if others:
            await store.admin.execute(
                f'CREATE TABLE IF NOT EXISTS "{schema}".pings (projector text, key text, '
                "PRIMARY KEY (projector, key))"
            )
        for index in range(others):
            await nursery.start(run_projection, store, _ping_recorder(schema, index), config)
        for n in range(count):
            key = f"k{n}"
            sent[key] = time.perf_counter()
            await store.append("latency", [NewEvent("Ping", {"key": key})])
            await trio.sleep(interval)
        with trio.fail_after(60):
            await all_seen.wait()
        nursery.cancel_scope.cancel()
    return latencies


def _ping_recorder(schema: str, index: int) -> Any:
    sql = f'INSERT INTO "{schema}".pings VALUES ($1, $2) ON CONFLICT DO NOTHING'

    @projector(f"recorder-{index}", event_types=["Ping"])
    async def record(event: RecordedEvent, ctx: ProjectionContext) -> None:
        ctx.db.queue(sql, f"recorder-{index}", event.data["key"])

    return record


async def execute_transfer(
    dsn: str, schema: str, count: int, accounts: int, cached: bool = False
) -> float:
    """Transfers through execute() with the demo's bank: read two streams, fold, decide,
    append atomically; with *cached*, a StateCache keeps the accounts' states."""
    import random

    from eventcore_trio import StateCache
    from eventcore_trio.demo import AccountOpened, random_transfer, registry

    names = [f"acc-{n:03d}" for n in range(accounts)]
    async with open_postgres_store(dsn, schema=schema) as store:
        opened = [registry.new_event(AccountOpened(1000))]
        await store.append_atomic(
            [StreamAppend(name, opened, expected_version=0) for name in names]
        )
        rng = random.Random(7)
        cache = StateCache() if cached else None
        started = time.perf_counter()
        for _ in range(count):
            # A refusal reads and decides like a transfer; it only appends nothing.
            await random_transfer(store, names, rng, most=50, cache=cache)
        return count / (time.perf_counter() - started)


def _deposit_command() -> Any:
    # Built on first use: the bank's Account state, one deposit per command.
    from collections.abc import Mapping, Sequence

    import attrs

    from eventcore_trio.demo import Account, MoneyDeposited

    @attrs.frozen
    class Deposit:
        account: str
        amount: int

        def streams(self) -> Mapping[str, type[Account]]:
            return {self.account: Account}

        def decide(self, states: Mapping[str, Account]) -> Mapping[str, Sequence[Any]]:
            return {self.account: [MoneyDeposited(self.amount, "bench")]}

    return Deposit


async def _fill_account(store: Any, stream: str, length: int) -> None:
    from eventcore_trio.demo import AccountOpened, MoneyDeposited, registry

    events = [registry.new_event(AccountOpened(1000))]
    events += [registry.new_event(MoneyDeposited(1, "seed")) for _ in range(length - 1)]
    for start in range(0, length, 1_000):
        await store.append(stream, events[start : start + 1_000])


async def execute_long_stream(dsn: str, schema: str, count: int, length: int) -> float:
    """Deposits through execute() with a StateCache on a stream of *length* events, warm (the
    first command, which folds the stream, is not timed). Commands/s."""
    from eventcore_trio import StateCache, execute
    from eventcore_trio.demo import registry

    deposit = _deposit_command()
    async with open_postgres_store(dsn, schema=schema) as store:
        await _fill_account(store, "account", length)
        cache = StateCache()
        await execute(store, deposit("account", 1), registry=registry, cache=cache)
        started = time.perf_counter()
        for _ in range(count):
            await execute(store, deposit("account", 1), registry=registry, cache=cache)
        return count / (time.perf_counter() - started)


#: Untimed calls before a timed loop: the pool's connection opens and the statement is
#: prepared on the first, which is not what a per-call rate measures.
WARM_UP = 200


async def bridge_roundtrip(dsn: str, schema: str, count: int) -> float:
    """A pooled ``SELECT 1`` through ``store.admin`` in a sequential loop: one crossing into
    asyncio and one round trip per call, the least a pooled statement costs. Statements/s."""
    async with open_postgres_store(dsn, schema=schema) as store:
        admin = store.admin
        for _ in range(WARM_UP):
            await admin.fetchval("SELECT 1")
        started = time.perf_counter()
        for _ in range(count):
            await admin.fetchval("SELECT 1")
        return count / (time.perf_counter() - started)


async def execute_short_stream(dsn: str, schema: str, count: int, length: int) -> float:
    """Deposits through execute() without a cache, each on its own stream of *length* events
    (so every command reads exactly *length*: one stream would grow by one per command): read,
    fold into the bank's `Account`, decide, append with the expected version. Commands/s."""
    from eventcore_trio import execute
    from eventcore_trio.demo import AccountOpened, MoneyDeposited, registry

    deposit = _deposit_command()
    # One more stream than timed commands: the untimed first command warms the connection
    # (its first append prepares the statement and compiles the append function).
    names = [f"account-{n:05d}" for n in range(count + 1)]
    events = [registry.new_event(AccountOpened(1000))]
    events += [registry.new_event(MoneyDeposited(1, "seed")) for _ in range(length - 1)]
    async with open_postgres_store(dsn, schema=schema) as store:
        for start in range(0, len(names), 100):
            await store.append_atomic(
                [
                    StreamAppend(name, events, expected_version=0)
                    for name in names[start : start + 100]
                ]
            )
        await execute(store, deposit(names[-1], 1), registry=registry)
        started = time.perf_counter()
        for name in names[:count]:
            await execute(store, deposit(name, 1), registry=registry)
        return count / (time.perf_counter() - started)


async def first_command_ms(dsn: str, schema: str, snapshot: bool) -> float:
    """The first deposit of a fresh process (a cold cache, a warm connection) on the stream
    that `execute_long_stream` filled, with its snapshot or after deleting the snapshots. Ms."""
    from eventcore_trio import StateCache, execute, take_snapshot
    from eventcore_trio.demo import Account, AccountOpened, registry
    from eventcore_trio.postgres import PostgresStore

    deposit = _deposit_command()
    async with open_postgres_store(dsn, schema=schema) as store:
        assert isinstance(store, PostgresStore)
        if snapshot:
            await take_snapshot(store, registry, Account, "account")
        else:
            await store.delete_snapshots()
        # Warm the pool's connection with an append elsewhere: its first append prepares the
        # statement and compiles the append function in that session (about 9 ms, once per
        # connection), which is not what this measures.
        await store.append("warm-up", [registry.new_event(AccountOpened(0))])
        started = time.perf_counter()
        await execute(store, deposit("account", 1), registry=registry, cache=StateCache())
        return (time.perf_counter() - started) * 1000


if __name__ == "__main__":
    import json
    import sys

    # The keyword arguments come last (see _harness.ours_fresh).
    *arguments, keywords = json.loads(sys.stdin.read())
    function = functools.partial(globals()[sys.argv[1]], *arguments, **keywords[KWARGS])
    print(json.dumps(trio.run(function)))
