"""Runs each benchmark next to its baseline, prints a table, writes JSON and a chart."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

from eventcore_trio import open_postgres_store
from eventcore_trio.testing import EmbeddedPostgres

from . import _decisions, _failover, _ours, _partitioned, _status_cost

NAMES = (
    "append_single_sequential",
    "append_single_same_sql",
    "append_single_concurrent",
    "append_batch_100",
    "catch_up_noop",
    "catch_up_transactional",
    "catch_up_transactional_execute",
    "catch_up_transactional_batched",
    "catch_up_parallel_4",
    "catch_up_partitioned_1_host",
    "catch_up_partitioned_2_hosts",
    "catch_up_partitioned_4_hosts",
    "latency_notify_p50_ms",
    "latency_notify_p99_ms",
    "latency_notify_10_projectors_p50_ms",
    "latency_notify_10_projectors_p99_ms",
    "latency_poll_p50_ms",
    "failover_ms_p50",
    "failover_ms_p99",
    "execute_transfer",
    "execute_transfer_cached",
    "execute_long_stream",
    "execute_long_vs_short",
    "execute_first_command_snapshot_ms",
    "execute_first_command_no_snapshot_ms",
    "bridge_roundtrip",
    "execute_short_stream",
    "append_conditional",
    "read_query_latency_p50_ms",
    "read_query_latency_p99_ms",
    "status_cost_1m_ms",
    "status_cost_10m_ms",
    "append_single_personal",
    "catch_up_personal",
    "catch_up_personal_read",
)

#: Results a ``--quick`` run leaves out unless named with ``--only`` (filling their data
#: takes minutes).
FULL_ONLY = frozenset({"status_cost_1m_ms", "status_cost_10m_ms"})


@dataclass
class Result:
    """One line of the results."""

    name: str
    unit: str
    ours: float
    baseline: float | None
    ratio: float | None
    better: str
    #: pyeventsourcing's figure for the same work (``--peer``), where it has an equivalent.
    peer: float | None = None


@dataclass
class Sizes:
    """How much work each benchmark does."""

    appends: int
    concurrent_appends: int
    batch_events: int
    events: int
    latency_pings: int
    poll_pings: int
    kills: int
    transfers: int
    roundtrips: int
    #: append_conditional: the events loaded, then the decisions timed.
    decision_events: int
    decisions: int
    #: read_query_latency: the events in the table, then the reads timed.
    query_events: int
    query_reads: int

    @classmethod
    def for_mode(cls, quick: bool, events: int | None) -> Sizes:
        if quick:
            # CI's run, where only the results' presence counts: a minute or so.
            # 10,000 events, because the peer's transactional catch-up commits each one
            # (about 800 a second) and the partitioned catch-up runs three times.
            return cls(
                *(500, 800, 10_000, events or 10_000, 60, 20, 3, 200, 5_000),
                decision_events=20_000,
                decisions=300,
                query_events=50_000,
                query_reads=300,
            )
        return cls(
            *(5_000, 8_000, 50_000, events or 100_000, 300, 50, 10, 2_000, 20_000),
            decision_events=100_000,
            decisions=2_000,
            query_events=1_000_000,
            query_reads=2_000,
        )


@dataclass
class Context:
    dsn: str
    run: str
    sizes: Sizes
    schemas: list[str]
    catch_up_schema: str | None = None
    peer: bool = False

    def schema(self, name: str) -> str:
        schema = f"bench_{self.run}_{name}"[:63]
        self.schemas.append(schema)
        return schema


def _throughput(name: str, ours: float, baseline: float) -> Result:
    return Result(name, "events/s", ours, baseline, ours / baseline, "higher")


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _in_process(module: str, what: str, function: str, *args: Any) -> Any:
    # The arguments (a DSN with a password among them) go through stdin: a command line is
    # visible to every user of the machine.
    completed = subprocess.run(
        [sys.executable, "-m", module, function],
        input=json.dumps(args),
        capture_output=True,
        text=True,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{what} {function} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def ours_fresh(function: str, *args: Any, **kwargs: Any) -> Any:
    """Run one of our functions in a fresh Trio process; return its JSON result.

    The benchmarks our side of which is set against a baseline run it this way, as the
    baselines run: in a process holding only what it needs. In the harness's own process
    every full garbage collection also walks the harness's modules (about 22,000 objects),
    which made a no-op catch-up 9 % slower (six alternating pairs)."""
    return _in_process("benchmarks._ours", "ours", function, *args, {_ours.KWARGS: kwargs})


def raw(function: str, *args: Any) -> Any:
    """Run a baseline function in a plain-asyncio process; return its JSON result."""
    return _in_process("benchmarks._raw", "baseline", function, *args)


def peer(function: str, *args: Any) -> Any:
    """Run pyeventsourcing's equivalent in a process of its own; return its JSON result."""
    return _in_process("benchmarks._peer", "peer", function, *args)


def _with_peer(ctx: Context, result: Result, function: str, *args: Any) -> Result:
    if ctx.peer:
        result.peer = peer(function, ctx.dsn, ctx.schema(f"peer_{result.name}"), *args)
    return result


def bench_append_single_sequential(ctx: Context) -> list[Result]:
    schema = ctx.schema("append_seq_raw")
    raw("create_raw_schema", ctx.dsn, schema)
    baseline = raw("append_single_sequential", ctx.dsn, schema, ctx.sizes.appends)
    ours = ours_fresh(
        "append_single_sequential", ctx.dsn, ctx.schema("append_seq"), ctx.sizes.appends
    )
    result = _throughput("append_single_sequential", ours, baseline)
    return [_with_peer(ctx, result, "append_single_sequential", ctx.sizes.appends)]


async def _channel(dsn: str, schema: str) -> str:
    async with open_postgres_store(dsn, schema=schema) as store:
        return store.notify_channel


def bench_append_single_same_sql(ctx: Context) -> list[Result]:
    # Our appends against our own statements sent by hand from plain asyncio: the share of
    # the crossing and the library, apart from what the SQL costs (the floor of the
    # append_single_sequential ratio is this baseline over that one's).
    schema = ctx.schema("append_same_sql")
    ours = ours_fresh("append_single_sequential", ctx.dsn, schema, ctx.sizes.appends)
    baseline = raw(
        "append_single_same_sql",
        ctx.dsn,
        schema,
        trio.run(_channel, ctx.dsn, schema),
        ctx.sizes.appends,
    )
    return [_throughput("append_single_same_sql", ours, baseline)]


def bench_append_single_concurrent(ctx: Context) -> list[Result]:
    schema = ctx.schema("append_conc_raw")
    raw("create_raw_schema", ctx.dsn, schema)
    n = ctx.sizes.concurrent_appends
    baseline = raw("append_single_concurrent", ctx.dsn, schema, n, 8)
    ours = ours_fresh("append_single_concurrent", ctx.dsn, ctx.schema("append_conc"), n, 8)
    result = _throughput("append_single_concurrent", ours, baseline)
    return [_with_peer(ctx, result, "append_single_concurrent", n, 8)]


def bench_append_batch_100(ctx: Context) -> list[Result]:
    schema = ctx.schema("append_batch_raw")
    raw("create_raw_schema", ctx.dsn, schema)
    n = ctx.sizes.batch_events
    baseline = raw("append_batch", ctx.dsn, schema, n, 100)
    ours = ours_fresh("append_batch", ctx.dsn, ctx.schema("append_batch"), n, 100)
    return [
        _with_peer(ctx, _throughput("append_batch_100", ours, baseline), "append_batch", n, 100)
    ]


def _catch_up_data(ctx: Context) -> str:
    # One events table shared by every catch-up benchmark, ours and baseline alike.
    if ctx.catch_up_schema is None:
        schema = ctx.schema("catch_up")
        trio.run(_ours.load_events, ctx.dsn, schema, ctx.sizes.events)
        raw("prepare_catch_up", ctx.dsn, schema)
        raw("catch_up", ctx.dsn, schema, ["warm-up"], 1000)  # warm the cache for both sides
        ctx.catch_up_schema = schema
    return ctx.catch_up_schema


def catch_up_pair(ctx: Context, batch_size: int, tag: str) -> tuple[float, float]:
    """(ours, baseline) events/s for one no-op catch-up at *batch_size*."""
    schema = _catch_up_data(ctx)
    baseline = raw("catch_up", ctx.dsn, schema, [f"raw-{tag}"], batch_size)
    ours = ours_fresh("catch_up", ctx.dsn, schema, [f"ours-{tag}"], batch_size)
    return ours, baseline


def bench_catch_up_noop(ctx: Context) -> list[Result]:
    ours, baseline = catch_up_pair(ctx, 500, "noop")
    return [_throughput("catch_up_noop", ours, baseline)]


#: Events the peer's transactional catch-up projects: it commits once per event, so its
#: rate does not depend on the count, and 100,000 would take minutes.
PEER_CATCH_UP_EVENTS = 20_000


def bench_catch_up_transactional(ctx: Context) -> list[Result]:
    """The read model as the docs teach it (one upsert per event, queued with
    ``ctx.db.queue``) against the hand-written loop that runs one upsert per event."""
    schema = _catch_up_data(ctx)
    baseline = raw("catch_up", ctx.dsn, schema, ["raw-tx"], 500, True)
    ours = ours_fresh("catch_up", ctx.dsn, schema, ["ours-tx"], 500, queued=True)
    result = _throughput("catch_up_transactional", ours, baseline)
    events = min(ctx.sizes.events, PEER_CATCH_UP_EVENTS)
    return [_with_peer(ctx, result, "catch_up_transactional", events)]


def bench_catch_up_transactional_execute(ctx: Context) -> list[Result]:
    """The same upsert awaited through ``ctx.db.execute`` per event: a crossing and a round
    trip per event, like the baseline."""
    schema = _catch_up_data(ctx)
    baseline = raw("catch_up", ctx.dsn, schema, ["raw-txe"], 500, True)
    ours = ours_fresh("catch_up", ctx.dsn, schema, ["ours-txe"], 500, transactional=True)
    return [_throughput("catch_up_transactional_execute", ours, baseline)]


def bench_catch_up_transactional_batched(ctx: Context) -> list[Result]:
    schema = _catch_up_data(ctx)
    baseline = raw("catch_up", ctx.dsn, schema, ["raw-txb"], 500, "batched")
    ours = ours_fresh("catch_up", ctx.dsn, schema, ["ours-txb"], 500, queued=True)
    return [_throughput("catch_up_transactional_batched", ours, baseline)]


def bench_catch_up_parallel_4(ctx: Context) -> list[Result]:
    schema = _catch_up_data(ctx)
    baseline = raw("catch_up", ctx.dsn, schema, [f"raw-par-{i}" for i in range(4)], 500)
    ours = ours_fresh("catch_up", ctx.dsn, schema, [f"ours-par-{i}" for i in range(4)], 500)
    return [_throughput("catch_up_parallel_4", ours, baseline)]


def bench_catch_up_partitioned(ctx: Context) -> list[Result]:
    """K=4 over 1, 2 and 4 host processes: the 1-host figure against the raw transactional
    baseline (one process, one upsert per event), the others against 1 host (scaling)."""
    schema = _catch_up_data(ctx)
    baseline = raw("catch_up", ctx.dsn, schema, ["raw-part"], 500, True)
    rates = {
        hosts: trio.run(
            _partitioned.catch_up_partitioned, ctx.dsn, schema, hosts, f"part{hosts}_{ctx.run}"
        )
        for hosts in (1, 2, 4)
    }
    one = rates[1]
    return [
        _throughput("catch_up_partitioned_1_host", one, baseline),
        _throughput("catch_up_partitioned_2_hosts", rates[2], one),
        _throughput("catch_up_partitioned_4_hosts", rates[4], one),
    ]


def _notify_latency(ctx: Context, name: str, others: int) -> list[Result]:
    # Live latency next to the raw LISTEN loop (alone, always): p50 and p99, named
    # latency_notify[_<name>]_p50_ms / _p99_ms.
    n = ctx.sizes.latency_pings
    schema = ctx.schema(f"latency{others}_raw")
    raw("create_raw_schema", ctx.dsn, schema)
    base = raw("latency", ctx.dsn, schema, f"{schema}_ch", n, 0.01, True, 1.0)
    ours = ours_fresh(
        "latency",
        ctx.dsn,
        ctx.schema(f"latency{others}"),
        n,
        0.01,
        notify=True,
        poll_interval=1.0,
        others=others,
    )
    prefix = f"latency_notify{name}"
    p50 = (statistics.median(ours), statistics.median(base))
    p99 = (_percentile(ours, 0.99), _percentile(base, 0.99))
    return [
        Result(f"{prefix}_p50_ms", "ms", p50[0], p50[1], p50[0] / p50[1], "lower"),
        Result(f"{prefix}_p99_ms", "ms", p99[0], p99[1], p99[0] / p99[1], "lower"),
    ]


def bench_latency(ctx: Context) -> list[Result]:
    results = _notify_latency(ctx, "", 0)
    if ctx.peer:
        n = ctx.sizes.latency_pings
        theirs = peer("latency", ctx.dsn, ctx.schema("peer_latency"), n, 0.01)
        results[0].peer = statistics.median(theirs)
        results[1].peer = _percentile(theirs, 0.99)
    return results


def bench_latency_ten_projectors(ctx: Context) -> list[Result]:
    # The same pings with nine more projections applying them, each with a write in its
    # batch transaction.
    return _notify_latency(ctx, "_10_projectors", 9)


POLL_INTERVAL = 0.2


def bench_latency_poll(ctx: Context) -> list[Result]:
    n = ctx.sizes.poll_pings
    schema = ctx.schema("poll_raw")
    raw("create_raw_schema", ctx.dsn, schema)
    base = raw("latency", ctx.dsn, schema, f"{schema}_ch", n, 0.05, False, POLL_INTERVAL)
    ours = ours_fresh(
        "latency", ctx.dsn, ctx.schema("poll"), n, 0.05, notify=False, poll_interval=POLL_INTERVAL
    )
    ours_p50, base_p50 = statistics.median(ours), statistics.median(base)
    return [Result("latency_poll_p50_ms", "ms", ours_p50, base_p50, ours_p50 / base_p50, "lower")]


def bench_failover(ctx: Context) -> list[Result]:
    takeovers = trio.run(_failover.failover, ctx.dsn, ctx.schema("failover"), ctx.sizes.kills)
    return [
        Result("failover_ms_p50", "ms", statistics.median(takeovers), None, None, "lower"),
        Result("failover_ms_p99", "ms", _percentile(takeovers, 0.99), None, None, "lower"),
    ]


def bench_execute_transfer(ctx: Context) -> list[Result]:
    schema = ctx.schema("transfer_raw")
    raw("create_raw_schema", ctx.dsn, schema)
    baseline = raw("execute_transfer", ctx.dsn, schema, ctx.sizes.transfers, 100)
    ours = ours_fresh("execute_transfer", ctx.dsn, ctx.schema("transfer"), ctx.sizes.transfers, 100)
    cached = ours_fresh(
        "execute_transfer",
        ctx.dsn,
        ctx.schema("transfer_cached"),
        ctx.sizes.transfers,
        100,
        True,
    )
    return [
        Result("execute_transfer", "commands/s", ours, baseline, ours / baseline, "higher"),
        # The same transfers with a StateCache (the baseline re-reads both streams).
        Result(
            "execute_transfer_cached", "commands/s", cached, baseline, cached / baseline, "higher"
        ),
    ]


#: The long stream of execute_long_stream, and the short one it is compared with.
LONG_STREAM, SHORT_STREAM = 5_000, 10


def bench_execute_long_stream(ctx: Context) -> list[Result]:
    count = ctx.sizes.transfers // 2
    short = trio.run(_ours.execute_long_stream, ctx.dsn, ctx.schema("short"), count, SHORT_STREAM)
    schema = ctx.schema("long")
    long = trio.run(_ours.execute_long_stream, ctx.dsn, schema, count, LONG_STREAM)
    raw_schema = ctx.schema("long_raw")
    raw("create_raw_schema", ctx.dsn, raw_schema)
    # Without a cache every command reads 5,000 events: a few dozen show the rate.
    baseline = raw("execute_long_stream", ctx.dsn, raw_schema, 30, LONG_STREAM)
    warm_ms = 1000 / long
    with_snapshot = ours_fresh("first_command_ms", ctx.dsn, schema, True)
    without = ours_fresh("first_command_ms", ctx.dsn, schema, False)
    return [
        Result("execute_long_stream", "commands/s", long, baseline, long / baseline, "higher"),
        # The yardstick: warm commands on 5,000 events against 10 (no baseline).
        Result("execute_long_vs_short", "ratio", long / short, None, None, "higher"),
        # A fresh process's first command, against a warm command (the "baseline" column).
        Result(
            "execute_first_command_snapshot_ms",
            "ms",
            with_snapshot,
            warm_ms,
            with_snapshot / warm_ms,
            "lower",
        ),
        Result(
            "execute_first_command_no_snapshot_ms",
            "ms",
            without,
            warm_ms,
            without / warm_ms,
            "lower",
        ),
    ]


def bench_bridge_roundtrip(ctx: Context) -> list[Result]:
    """A pooled ``SELECT 1`` through the store against one raw connection: the cost of a
    crossing into asyncio (and the pool) on top of one round trip. No peer column: its
    equivalent would be psycopg's round trip, not an event store's."""
    n = ctx.sizes.roundtrips
    baseline = raw("bridge_roundtrip", ctx.dsn, n)
    ours = ours_fresh("bridge_roundtrip", ctx.dsn, ctx.schema("roundtrip"), n)
    return [Result("bridge_roundtrip", "statements/s", ours, baseline, ours / baseline, "higher")]


#: Events in each stream of execute_short_stream.
SHORT_COMMAND_STREAM = 10


def bench_execute_short_stream(ctx: Context) -> list[Result]:
    """One uncached single-stream state command per stream of 10 events."""
    n = ctx.sizes.transfers
    schema = ctx.schema("short_stream_raw")
    raw("create_raw_schema", ctx.dsn, schema)
    baseline = raw("execute_short_stream", ctx.dsn, schema, n, SHORT_COMMAND_STREAM)
    ours = ours_fresh(
        "execute_short_stream", ctx.dsn, ctx.schema("short_stream"), n, SHORT_COMMAND_STREAM
    )
    result = Result("execute_short_stream", "commands/s", ours, baseline, ours / baseline, "higher")
    return [_with_peer(ctx, result, "execute_short_stream", n, SHORT_COMMAND_STREAM)]


def bench_append_conditional(ctx: Context) -> list[Result]:
    """A decision over a query (read_query of three events among the loaded ones, then
    append_tagged on its condition) against the same decision by hand: a read, then an
    advisory lock per tag, the check and the insert in one transaction."""
    n, decisions = ctx.sizes.decision_events, ctx.sizes.decisions
    warm_up, matches = _decisions.WARM_UP, _decisions.DECISION_MATCHES
    baseline = raw(
        "append_conditional", ctx.dsn, ctx.schema("decide_raw"), n, decisions, warm_up, matches
    )
    ours = trio.run(_decisions.append_conditional, ctx.dsn, ctx.schema("decide"), n, decisions)
    return [Result("append_conditional", "decisions/s", ours, baseline, ours / baseline, "higher")]


def bench_read_query_latency(ctx: Context) -> list[Result]:
    """One read_query returning 10 events among `Sizes.query_events`, against the same
    SELECT by hand on the same tables."""
    schema = ctx.schema("read_query")
    trio.run(_decisions.load_query_events, ctx.dsn, schema, ctx.sizes.query_events)
    courses, warm_up = _decisions.QUERY_COURSES, _decisions.WARM_UP
    matches = _decisions.QUERY_MATCHES

    def baseline(reads: int) -> list[float]:
        times: list[float] = raw(
            "read_query_latency", ctx.dsn, schema, reads, courses, warm_up, matches
        )
        return times

    baseline(courses)  # every course once, untimed: the cache as warm for both sides
    ours = trio.run(_decisions.read_query_latency, ctx.dsn, schema, ctx.sizes.query_reads)
    base = baseline(ctx.sizes.query_reads)
    p50 = (statistics.median(ours), statistics.median(base))
    p99 = (_percentile(ours, 0.99), _percentile(base, 0.99))
    return [
        Result("read_query_latency_p50_ms", "ms", p50[0], p50[1], p50[0] / p50[1], "lower"),
        Result("read_query_latency_p99_ms", "ms", p99[0], p99[1], p99[0] / p99[1], "lower"),
    ]


def bench_append_single_personal(ctx: Context) -> list[Result]:
    """append_single_sequential's loop with two personal fields per event, a handful of
    subjects, against the same loop and fields without them (our plain twin, same run)."""
    key, n = os.urandom(32), ctx.sizes.appends

    def run(personal: bool) -> float:
        schema = ctx.schema(f"append_{'personal' if personal else 'plain'}")
        return trio.run(_ours.append_single_customer, ctx.dsn, schema, n, key, personal)

    plain = run(False)
    personal = run(True)
    return [_throughput("append_single_personal", personal, plain)]


def bench_catch_up_personal(ctx: Context) -> list[Result]:
    """catch_up_noop over events with two personal fields each against the same events with
    the fields plain (our plain twin, same run): one no-op projection each, batch 500; then
    the same with a handler reading both personal fields (``catch_up_personal_read``; the
    twin reads the same fields, plain). Rates are the medians of five rounds, the ratio
    the median of the rounds' ratios (each round a pair run back to back)."""
    key, n = os.urandom(32), ctx.sizes.events
    schemas = {False: ctx.schema("catch_up_plain"), True: ctx.schema("catch_up_personal")}
    for personal, schema in schemas.items():
        trio.run(_ours.load_customer_events, ctx.dsn, schema, n, key, personal)

    def run(personal: bool, name: str, reads: bool = False) -> float:
        schema = schemas[personal]
        return trio.run(
            lambda: _ours.catch_up(
                ctx.dsn, schema, [name], 500, key_encryption_key=key, reads_personal=reads
            )
        )

    for personal in schemas:  # untimed: the server's cache as warm for both
        run(personal, "warm-up")
    # Five rounds of a pair (the plain twin and the personal side back to back, which goes
    # first alternating), and the median of the pairs' ratios: one catch-up takes a second
    # or two, and this shared machine's speed drifts by a third over a minute, more than the
    # difference measured; a pair's two runs see the same machine.
    rates: dict[tuple[bool, bool], list[float]] = {}
    ratios: dict[bool, list[float]] = {}
    for round_ in range(CATCH_UP_PERSONAL_ROUNDS):
        for reads in (False, True):
            pair = {}
            for personal in (False, True) if round_ % 2 == 0 else (True, False):
                name = f"{'personal' if personal else 'plain'}_{'read' if reads else 'noop'}"
                pair[personal] = run(personal, f"{name}_{round_}", reads=reads)
                rates.setdefault((reads, personal), []).append(pair[personal])
            ratios.setdefault(reads, []).append(pair[True] / pair[False])

    def result(name: str, reads: bool) -> Result:
        ours, plain = (statistics.median(rates[reads, personal]) for personal in (True, False))
        return Result(name, "events/s", ours, plain, statistics.median(ratios[reads]), "higher")

    return [
        result("catch_up_personal", reads=False),
        result("catch_up_personal_read", reads=True),
    ]


#: The pairs catch_up_personal runs (see `bench_catch_up_personal`).
CATCH_UP_PERSONAL_ROUNDS = 5


#: Events behind the one unit of status_cost, by result name; the events table holds the most.
STATUS_COST_BEHIND = {"status_cost_1m_ms": 1_000_000, "status_cost_10m_ms": 10_000_000}


def bench_status_cost(ctx: Context) -> list[Result]:
    """One ``projection_status()`` call with one unit 1,000,000 and 10,000,000 events behind,
    against the exact count per unit it made before 0.4 (benchmarks/_status_cost.py)."""
    behinds = list(STATUS_COST_BEHIND.values())
    figures = trio.run(
        _status_cost.status_cost, ctx.dsn, ctx.schema("status_cost"), max(behinds) + 1, behinds
    )
    return [
        Result(name, "ms", ours, baseline, ours / baseline, "lower")
        for name, (ours, baseline) in zip(STATUS_COST_BEHIND, figures, strict=True)
    ]


BENCHMARKS: list[tuple[tuple[str, ...], Callable[[Context], list[Result]]]] = [
    (("append_single_sequential",), bench_append_single_sequential),
    (("append_single_same_sql",), bench_append_single_same_sql),
    (("append_single_concurrent",), bench_append_single_concurrent),
    (("append_batch_100",), bench_append_batch_100),
    (("catch_up_noop",), bench_catch_up_noop),
    (("catch_up_transactional",), bench_catch_up_transactional),
    (("catch_up_transactional_execute",), bench_catch_up_transactional_execute),
    (("catch_up_transactional_batched",), bench_catch_up_transactional_batched),
    (("catch_up_parallel_4",), bench_catch_up_parallel_4),
    (
        (
            "catch_up_partitioned_1_host",
            "catch_up_partitioned_2_hosts",
            "catch_up_partitioned_4_hosts",
        ),
        bench_catch_up_partitioned,
    ),
    (("latency_notify_p50_ms", "latency_notify_p99_ms"), bench_latency),
    (
        ("latency_notify_10_projectors_p50_ms", "latency_notify_10_projectors_p99_ms"),
        bench_latency_ten_projectors,
    ),
    (("latency_poll_p50_ms",), bench_latency_poll),
    (("failover_ms_p50", "failover_ms_p99"), bench_failover),
    (("execute_transfer", "execute_transfer_cached"), bench_execute_transfer),
    (
        (
            "execute_long_stream",
            "execute_long_vs_short",
            "execute_first_command_snapshot_ms",
            "execute_first_command_no_snapshot_ms",
        ),
        bench_execute_long_stream,
    ),
    (("bridge_roundtrip",), bench_bridge_roundtrip),
    (("execute_short_stream",), bench_execute_short_stream),
    (("append_conditional",), bench_append_conditional),
    (("read_query_latency_p50_ms", "read_query_latency_p99_ms"), bench_read_query_latency),
    (("status_cost_1m_ms", "status_cost_10m_ms"), bench_status_cost),
    (("append_single_personal",), bench_append_single_personal),
    (("catch_up_personal", "catch_up_personal_read"), bench_catch_up_personal),
]


def _peer_version() -> str:
    from importlib.metadata import version

    return version("eventsourcing")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform()}


async def _server_version(dsn: str) -> str:
    async with open_postgres_store(dsn, schema="bench_meta") as store:
        return str(await store.admin.fetchval("SHOW server_version"))


async def _drop(dsn: str, schemas: list[str]) -> None:
    async with open_postgres_store(dsn, schema="bench_meta") as store:
        for schema in [*schemas, "bench_meta"]:
            await store.admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def catch_up_chart(ctx: Context, path: Path) -> None:
    """Plot catch-up throughput against batch size, ours and baseline, into *path*."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [50, 100, 250, 500, 1000, 2000]
    points = [catch_up_pair(ctx, size, f"chart-{size}") for size in sizes]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sizes, [p[0] for p in points], marker="o", label="eventcore-trio (run_projection)")
    ax.plot(sizes, [p[1] for p in points], marker="s", label="raw asyncpg on asyncio (by hand)")
    ax.set_xscale("log")
    ax.set_xlabel("batch size (events per page and transaction)")
    ax.set_ylabel("events/s")
    ax.set_title(f"No-op catch-up over {ctx.sizes.events:,} events")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"chart written to {path}")


def _format(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ratio":
        return f"{value:.2f}"
    return f"{value:,.1f}" if unit == "ms" else f"{value:,.0f}"


def print_table(results: list[Result]) -> None:
    with_peer = any(r.peer is not None for r in results)
    peer_header = f" {'peer':>12}" if with_peer else ""
    print()
    header = (
        f"{'benchmark':36} {'unit':12} {'ours':>12} {'baseline':>12} {'ratio':>7}"
        f"{peer_header}  better"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        peer_cell = f" {_format(r.peer, r.unit):>12}" if with_peer else ""
        print(
            f"{r.name:36} {r.unit:12} {_format(r.ours, r.unit):>12} "
            f"{_format(r.baseline, r.unit):>12} {ratio:>7}{peer_cell}  {r.better}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark eventcore-trio next to hand-written asyncpg on asyncio, in the "
        "same run on the same server.",
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get("EVENTCORE_DSN"),
        help="PostgreSQL to run against (default: EVENTCORE_DSN, else an embedded server)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes (under two minutes), without status_cost unless named in --only",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only these results (repeatable or comma-separated): {', '.join(NAMES)}",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write results as JSON")
    parser.add_argument("--events", type=int, help="events for the catch-up benchmarks")
    parser.add_argument("--chart", type=Path, metavar="PNG", help="plot catch-up vs batch size")
    parser.add_argument(
        "--peer",
        action="store_true",
        help="also run pyeventsourcing's equivalents, as a third column (needs the 'peer' "
        "dependency group: uv run --group peer python -m benchmarks --peer)",
    )
    args = parser.parse_args(argv)
    if args.peer and importlib.util.find_spec("eventsourcing") is None:
        parser.error(
            "--peer needs pyeventsourcing: run uv run --group peer python -m benchmarks --peer"
        )
    only = {n for item in args.only for n in item.split(",") if n}
    unknown = only - set(NAMES)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    selected = [(names, fn) for names, fn in BENCHMARKS if not only or set(names) & only]
    if args.quick and not only:
        selected = [(names, fn) for names, fn in selected if not set(names) <= FULL_ONLY]
    sizes = Sizes.for_mode(args.quick, args.events)
    server: EmbeddedPostgres | None = None
    dsn = args.dsn
    if dsn is None:
        server = EmbeddedPostgres()
        server.start()
        dsn = server.dsn
    ctx = Context(dsn=dsn, run=uuid.uuid4().hex[:6], sizes=sizes, schemas=[], peer=args.peer)
    results: list[Result] = []
    try:
        version = trio.run(_server_version, dsn)
        print(
            f"eventcore-trio benchmarks: PostgreSQL {version}, {machine()['cpu']}, "
            f"{os.cpu_count()} cores, {'quick' if args.quick else 'full'} run"
        )
        started = time.perf_counter()
        for index, (names, fn) in enumerate(selected, start=1):
            print(f"[{index}/{len(selected)}] {', '.join(names)} …", end="", flush=True)
            step = time.perf_counter()
            produced = [r for r in fn(ctx) if not only or r.name in only]
            results.extend(produced)
            summary = "; ".join(
                f"{r.name} ours {_format(r.ours, r.unit)} vs {_format(r.baseline, r.unit)}"
                + ("" if r.peer is None else f" (peer {_format(r.peer, r.unit)})")
                + f" {r.unit}"
                for r in produced
            )
            print(f" {time.perf_counter() - step:.1f}s: {summary}", flush=True)
        if args.chart is not None:
            catch_up_chart(ctx, args.chart)
        print_table(results)
        print(f"\ntotal {time.perf_counter() - started:.0f}s")
        if args.json is not None:
            document = {
                "machine": machine(),
                "python": sys.version.split()[0],
                "postgres_version": version,
                "events": sizes.events,
                "mode": "quick" if args.quick else "full",
                "peer": "eventsourcing " + _peer_version() if args.peer else None,
                "results": [asdict(r) for r in results],
            }
            args.json.write_text(json.dumps(document, indent=2) + "\n")
            print(f"results written to {args.json}")
    finally:
        if server is not None:
            server.cleanup()
        else:
            trio.run(_drop, dsn, ctx.schemas)
    expected = {n for names, _ in selected for n in names if not only or n in only}
    missing = expected - {r.name for r in results}
    bad = [
        r.name
        for r in results
        if not r.ours > 0
        or (r.baseline is not None and not r.baseline > 0)
        or (r.peer is not None and not r.peer > 0)
    ]
    if missing or bad:
        print(f"missing results: {sorted(missing)}; non-positive: {bad}", file=sys.stderr)
        return 1
    return 0
