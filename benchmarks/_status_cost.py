"""status_cost: one `projection_status()` call with millions of events behind a unit, next to
the exact ``count(*)`` per unit that it made before (the lead's figure: 80-94 ms per unit at
1,000,000 events behind, on PostgreSQL 15).

The events are written by one ``INSERT ... SELECT generate_series`` (appending 10,000,000
events one request at a time would take most of an hour): rows as the append function writes
them (versions per stream, stream hashes, event ids), so that the store reads them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final

from eventcore_trio import Position, open_postgres_store
from eventcore_trio.postgres import PostgresStore

#: Streams the events are spread over, round robin.
STREAMS: Final = 1_000

#: How often each figure is measured: the median is reported.
CALLS: Final = 15
BASELINE_CALLS: Final = 5


async def fill(store: PostgresStore, count: int) -> None:
    """Write *count* events into the store's (empty) events table in one statement: every
    fourth a ``Withdrawn``, the rest ``Deposited``, over `STREAMS` streams; then vacuum it,
    as autovacuum would have done to a table of that age."""
    s = f'"{store.schema}"'
    await store.admin.execute(
        f"WITH streams AS (SELECT k, 'account-' || k AS stream_id, "
        f"  {s}.stream_hash('account-' || k) AS hash FROM generate_series(0, {STREAMS - 1}) k) "
        f"INSERT INTO {s}.events "
        "(stream_id, stream_version, event_id, type, data, metadata, stream_hash) "
        "SELECT st.stream_id, g.i / $2 + 1, gen_random_uuid(), "
        "CASE WHEN g.i % 4 = 3 THEN 'Withdrawn' ELSE 'Deposited' END, "
        "jsonb_build_object('amount', 1, 'n', g.i), '{}'::jsonb, st.hash "
        "FROM generate_series(0, $1::bigint - 1) g(i) JOIN streams st ON st.k = g.i % $2 "
        "ORDER BY g.i",
        count,
        STREAMS,
    )
    await store.admin.execute(
        f"INSERT INTO {s}.streams (stream_id, version) "
        "SELECT 'account-' || k, count(*) FROM generate_series(0, $1::bigint - 1) g(i), "
        "LATERAL (SELECT g.i % $2 AS k) x GROUP BY k",
        count,
        STREAMS,
    )
    await store.admin.execute(f"VACUUM (ANALYZE) {s}.events")


async def _behind(store: PostgresStore, unit: str, behind: int) -> tuple[int, int]:
    # One unit, whose checkpoint leaves *behind* events after it (the only subscriptions
    # row); its (tx, position).
    s = f'"{store.schema}"'
    await store.admin.execute(f"DELETE FROM {s}.subscriptions")
    row = await store.admin.fetchrow(
        f"SELECT tx, position FROM {s}.events ORDER BY tx DESC, position DESC OFFSET $1 LIMIT 1",
        behind,
    )
    assert row is not None
    await store.save_checkpoint(unit, Position(row["tx"], row["position"]))
    return row["tx"], row["position"]


async def _median_ms(calls: int, call: Callable[[], Awaitable[object]]) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def status_cost(dsn: str, schema: str, count: int, behinds: list[int]) -> list[list[float]]:
    """Fill *schema* with *count* events; for each of *behinds*: [ours, baseline] in ms, the
    median of one `projection_status()` call and of the exact count it replaces, for one
    unit with that many events behind."""
    async with open_postgres_store(dsn, schema=schema) as store:
        await fill(store, count)
        # The statement `ReadQueries.lag` ran per unit before 0.4.
        exact_sql = (
            f'SELECT count(*) AS n, min(recorded_at) AS oldest FROM "{schema}".events '
            "WHERE (tx, position) > ($1, $2)"
        )
        results = []
        for behind in behinds:
            checkpoint = await _behind(store, "status-cost", behind)
            [status] = await store.projection_status()
            assert status.lag_estimated, status
            error = (status.lag_events - behind) / behind
            print(f" (estimated {status.lag_events:,} of {behind:,}: {error:+.2%})", end="")
            exact = partial(store.admin.fetchrow, exact_sql, *checkpoint)
            await exact()  # both sides warm
            ours = await _median_ms(CALLS, store.projection_status)
            results.append([ours, await _median_ms(BASELINE_CALLS, exact)])
        return results
