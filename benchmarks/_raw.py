"""The baselines: the same SQL work written by hand with asyncpg on plain asyncio.

They run in a process of their own (``python -m benchmarks._raw FUNCTION``, the arguments as
JSON on stdin) that never imports trio or trio-asyncio, whose import would install its
event-loop policy and patch asyncio's loop lookup: the baseline is plain asyncio, as a user
without us would run it.

Each function is what a careful user would write without eventcore-trio: a transaction with
a version check for a single append, one unnest() statement for a batch, a hand-rolled
catch-up loop that decodes rows and saves a checkpoint per page, a LISTEN loop. They run on
the same server, in the same run, against the same rows as our side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

import asyncpg

from ._decision_data import CAPACITY, CHUNK, SUBSCRIBED, course_tag, decision_events

RAW_SCHEMA_SQL = """
CREATE SCHEMA "{s}";
CREATE TABLE "{s}".streams (stream_id text COLLATE "C" PRIMARY KEY, version bigint NOT NULL);
CREATE TABLE "{s}".events (
    tx bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    position bigint GENERATED ALWAYS AS IDENTITY,
    stream_id text COLLATE "C" NOT NULL,
    stream_version bigint NOT NULL,
    event_id uuid NOT NULL DEFAULT gen_random_uuid(),
    type text COLLATE "C" NOT NULL,
    data jsonb NOT NULL,
    metadata jsonb NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tx, position),
    UNIQUE (stream_id, stream_version),
    UNIQUE (event_id)
);
-- The same indexes as eventcore-trio's events table, so inserts maintain the same trees.
CREATE INDEX ON "{s}".events (type, tx, position);
CREATE TABLE "{s}".checkpoints (name text PRIMARY KEY, tx bigint, position bigint);
"""


async def create_raw_schema(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(RAW_SCHEMA_SQL.format(s=schema))
    finally:
        await conn.close()


async def append_single_sequential(dsn: str, schema: str, count: int) -> float:
    """One event per append, version-checked in a transaction; returns events/s."""
    conn = await asyncpg.connect(dsn)
    try:
        payload = json.dumps({"amount": 1})
        started = time.perf_counter()
        for n in range(count):
            await _append_one(conn, schema, "stream-0", n, payload)
        return count / (time.perf_counter() - started)
    finally:
        await conn.close()


async def _append_one(
    conn: asyncpg.Connection, schema: str, stream: str, expected: int, payload: str
) -> None:
    # The natural hand-written append: lock the stream row, check, insert, bump, commit.
    async with conn.transaction():
        version = await conn.fetchval(
            f'SELECT version FROM "{schema}".streams WHERE stream_id = $1 FOR UPDATE', stream
        )
        if version is None:
            await conn.execute(
                f'INSERT INTO "{schema}".streams VALUES ($1, 0) ON CONFLICT DO NOTHING', stream
            )
            version = 0
        if version != expected:
            raise RuntimeError(f"conflict on {stream}: {version} != {expected}")
        await conn.execute(
            f'INSERT INTO "{schema}".events (stream_id, stream_version, type, data, metadata) '
            "VALUES ($1, $2, 'Deposited', $3, '{}')",
            stream,
            version + 1,
            payload,
        )
        await conn.execute(
            f'UPDATE "{schema}".streams SET version = $2 WHERE stream_id = $1', stream, version + 1
        )


async def append_single_same_sql(dsn: str, schema: str, channel: str, count: int) -> float:
    """Our own append, by hand: the store's ``append_events`` statement then its
    ``pg_notify`` on *channel*, on one connection, as `PostgresStore.append` sends them (in
    *schema*, a store's schema). What our SQL costs without Trio, the crossing or the
    library: the floor under ``append_single_sequential``. Events/s."""
    conn = await asyncpg.connect(dsn)
    try:
        sql = f'SELECT * FROM "{schema}".append_events($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)'
        payload = json.dumps({"amount": 1})

        async def append(expected: int) -> None:
            # The arguments `AppendStatement.single` sends for one event on one stream.
            await conn.fetch(
                sql,
                ["same-sql"],
                [expected],
                [1],
                None,
                None,
                None,
                ["Deposited"],
                [payload],
                None,
                None,
            )
            await conn.execute("SELECT pg_notify($1, '')", channel)

        for n in range(WARM_UP):
            await append(n)
        started = time.perf_counter()
        for n in range(WARM_UP, WARM_UP + count):
            await append(n)
        return count / (time.perf_counter() - started)
    finally:
        await conn.close()


async def append_single_concurrent(dsn: str, schema: str, count: int, tasks: int) -> float:
    """The same from *tasks* concurrent tasks on distinct streams; returns events/s."""
    pool = await asyncpg.create_pool(dsn, min_size=tasks, max_size=tasks)
    try:
        payload = json.dumps({"amount": 1})
        per_task = count // tasks

        async def worker(w: int) -> None:
            async with pool.acquire() as conn:
                for n in range(per_task):
                    await _append_one(conn, schema, f"stream-{w}", n, payload)

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(tasks)))
        return per_task * tasks / (time.perf_counter() - started)
    finally:
        await pool.close()


async def append_batch(dsn: str, schema: str, count: int, size: int) -> float:
    """*size* events per append with the fastest single statement (unnest); events/s."""
    conn = await asyncpg.connect(dsn)
    try:
        payloads = [json.dumps({"amount": n}) for n in range(size)]
        sql = (
            f'INSERT INTO "{schema}".events (stream_id, stream_version, type, data, metadata) '
            "SELECT $1, v, 'Deposited', d, '{}' FROM unnest($2::bigint[], $3::jsonb[]) AS u(v, d)"
        )
        started = time.perf_counter()
        for batch in range(count // size):
            base = batch * size
            # The unique (stream_id, stream_version) constraint is the concurrency check.
            await conn.execute(sql, "stream-0", list(range(base + 1, base + size + 1)), payloads)
        return (count // size) * size / (time.perf_counter() - started)
    finally:
        await conn.close()


_READ = (
    "SELECT tx, position, stream_id, stream_version, event_id, type, data, metadata, recorded_at "
    'FROM "{s}".events WHERE (tx, position) > ($1, $2) '
    "AND tx < pg_snapshot_xmin(pg_current_snapshot())::text::bigint "
    "ORDER BY tx, position LIMIT $3"
)


async def _noop(event: dict[str, Any]) -> None:
    return None


def _decode(row: asyncpg.Record) -> dict[str, Any]:
    # A row as a hand-written reader would use it: a dict, JSON decoded.
    return {
        "event_id": row["event_id"],
        "stream_id": row["stream_id"],
        "stream_version": row["stream_version"],
        "position": (row["tx"], row["position"]),
        "type": row["type"],
        "data": json.loads(row["data"]),
        "metadata": json.loads(row["metadata"]),
        "recorded_at": row["recorded_at"],
    }


def _decode_tagged(row: asyncpg.Record) -> dict[str, Any]:
    event = _decode(row)
    event["tags"] = row["tags"]
    return event


async def _catch_up_on(
    conn: asyncpg.Connection, schema: str, name: str, batch_size: int, upsert: bool | str
) -> int:
    # upsert: False (no-op), True (one upsert per event), "batched" (one executemany per page)
    read = _READ.format(s=schema)
    save = (
        f'INSERT INTO "{schema}".checkpoints VALUES ($1, $2, $3) ON CONFLICT (name) '
        "DO UPDATE SET tx = excluded.tx, position = excluded.position"
    )
    upsert_sql = (
        f'INSERT INTO "{schema}".balances (account, total) VALUES ($1, $2) '
        "ON CONFLICT (account) DO UPDATE SET total = balances.total + excluded.total"
    )
    tx, position, total = 0, 0, 0
    while True:
        rows = await conn.fetch(read, tx, position, batch_size)
        if not rows:
            return total
        async with conn.transaction():
            batched: list[tuple[str, Any]] = []
            for row in rows:
                event = _decode(row)
                if upsert == "batched":
                    batched.append((event["stream_id"], event["data"]["amount"]))
                elif upsert:
                    await conn.execute(upsert_sql, event["stream_id"], event["data"]["amount"])
                else:
                    await _noop(event)
            if batched:
                await conn.executemany(upsert_sql, batched)
            tx, position = rows[-1]["tx"], rows[-1]["position"]
            await conn.execute(save, name, tx, position)
        total += len(rows)


async def catch_up(
    dsn: str, schema: str, names: list[str], batch_size: int, upsert: bool | str = False
) -> float:
    """Catch up one reader per name, concurrently, by hand: read a page, decode each row,
    apply, save the checkpoint in the page's transaction. Returns total events/s."""
    conns = [await asyncpg.connect(dsn) for _ in names]
    try:
        started = time.perf_counter()
        counts = await asyncio.gather(
            *(
                _catch_up_on(c, schema, n, batch_size, upsert)
                for c, n in zip(conns, names, strict=True)
            )
        )
        return sum(counts) / (time.perf_counter() - started)
    finally:
        for conn in conns:
            await conn.close()


async def prepare_catch_up(dsn: str, schema: str) -> None:
    """Add the baseline's checkpoint table and the upsert target to the catch-up schema."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{schema}".balances (account text PRIMARY KEY, '
            "total bigint NOT NULL); "
            f'CREATE TABLE IF NOT EXISTS "{schema}".checkpoints '
            "(name text PRIMARY KEY, tx bigint, position bigint)"
        )
    finally:
        await conn.close()


async def latency(
    dsn: str,
    schema: str,
    channel: str,
    count: int,
    interval: float,
    notify: bool,
    poll_interval: float,
) -> list[float]:
    """Append one event at a time; a LISTEN (or polling) reader applies it; latencies in ms."""
    writer = await asyncpg.connect(dsn)
    reader = await asyncpg.connect(dsn)
    listener = await asyncpg.connect(dsn)
    try:
        start_tx, start_pos = 0, 0
        last = await reader.fetchrow(
            f'SELECT tx, position FROM "{schema}".events ORDER BY tx DESC, position DESC LIMIT 1'
        )
        if last is not None:
            start_tx, start_pos = last["tx"], last["position"]
        sent: dict[str, float] = {}
        latencies: list[float] = []
        wake = asyncio.Event()
        if notify:
            await listener.add_listener(channel, lambda *_: wake.set())
        read = _READ.format(s=schema)

        async def consume() -> None:
            tx, position = start_tx, start_pos
            while len(latencies) < count:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), poll_interval)
                wake.clear()
                while True:
                    rows = await reader.fetch(read, tx, position, 500)
                    for row in rows:
                        key = json.loads(row["data"])["key"]
                        if key in sent:
                            latencies.append((time.perf_counter() - sent[key]) * 1000)
                    if not rows:
                        break
                    tx, position = rows[-1]["tx"], rows[-1]["position"]

        consumer = asyncio.create_task(consume())
        for n in range(count):
            key = f"k{n}"
            sent[key] = time.perf_counter()
            async with writer.transaction():
                await writer.execute(
                    f'INSERT INTO "{schema}".events (stream_id, stream_version, type, data, '
                    "metadata) VALUES ($1, $2, 'Ping', $3, '{}')",
                    "latency",
                    n + 1,
                    json.dumps({"key": key}),
                )
                if notify:
                    await writer.execute(f"SELECT pg_notify('{channel}', '')")
            await asyncio.sleep(interval)
        await asyncio.wait_for(consumer, 60)
        return latencies
    finally:
        for conn in (writer, reader, listener):
            await conn.close()


async def execute_transfer(dsn: str, schema: str, count: int, accounts: int) -> float:
    """Transfers by hand: read both streams, fold, decide, then a version-checked two-stream
    append in one transaction (locks in stream order); retries a conflict. Commands/s."""
    import random

    conn = await asyncpg.connect(dsn)
    try:
        names = [f"acc-{n:03d}" for n in range(accounts)]
        async with conn.transaction():
            for name in names:
                await conn.execute(f'INSERT INTO "{schema}".streams VALUES ($1, 1)', name)
                await conn.execute(
                    f'INSERT INTO "{schema}".events (stream_id, stream_version, type, data, '
                    "metadata) VALUES ($1, 1, 'AccountOpened', '{\"initial\": 1000}', '{}')",
                    name,
                )
        read = (
            f'SELECT type, data FROM "{schema}".events WHERE stream_id = $1 ORDER BY stream_version'
        )
        lock = f'SELECT version FROM "{schema}".streams WHERE stream_id = $1 FOR UPDATE'
        insert = (
            f'INSERT INTO "{schema}".events (stream_id, stream_version, type, data, metadata) '
            "VALUES ($1, $2, $3, $4, '{}')"
        )
        bump = f'UPDATE "{schema}".streams SET version = $2 WHERE stream_id = $1'
        rng = random.Random(7)
        started = time.perf_counter()
        for _ in range(count):
            source, target = rng.sample(names, 2)
            amount = rng.randint(1, 50)
            versions, balance = {}, 0
            for stream in (source, target):
                rows = await conn.fetch(read, stream)
                versions[stream] = len(rows)
                if stream == source:
                    for row in rows:
                        data = json.loads(row["data"])
                        if row["type"] == "AccountOpened":
                            balance = data["initial"]
                        elif row["type"] == "MoneyWithdrawn":
                            balance -= data["amount"]
                        else:
                            balance += data["amount"]
            if balance < amount:
                continue
            async with conn.transaction():
                for stream in sorted((source, target)):
                    if await conn.fetchval(lock, stream) != versions[stream]:
                        raise RuntimeError("conflict (cannot happen single-threaded)")
                payload = json.dumps({"amount": amount})
                await conn.execute(insert, source, versions[source] + 1, "MoneyWithdrawn", payload)
                await conn.execute(insert, target, versions[target] + 1, "MoneyDeposited", payload)
                await conn.execute(bump, source, versions[source] + 1)
                await conn.execute(bump, target, versions[target] + 1)
        return count / (time.perf_counter() - started)
    finally:
        await conn.close()


async def execute_long_stream(dsn: str, schema: str, count: int, length: int) -> float:
    """Deposits by hand on a stream of *length* events: read the whole stream and fold it
    (what a command without a cache does), then a version-checked append. Commands/s."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'INSERT INTO "{schema}".streams VALUES ($1, $2)', "account", length)
        await conn.executemany(
            f'INSERT INTO "{schema}".events (stream_id, stream_version, type, data, metadata) '
            "VALUES ('account', $1, 'MoneyDeposited', '{\"amount\": 1}', '{}')",
            [(v,) for v in range(1, length + 1)],
        )
        read = (
            f'SELECT type, data FROM "{schema}".events WHERE stream_id = $1 ORDER BY stream_version'
        )
        started = time.perf_counter()
        for _ in range(count):
            rows = await conn.fetch(read, "account")
            balance = 0
            for row in rows:
                balance += json.loads(row["data"])["amount"]
            await _append_one(conn, schema, "account", len(rows), json.dumps({"amount": 1}))
        return count / (time.perf_counter() - started)
    finally:
        await conn.close()


#: Untimed calls before a timed loop (as on our side): the statement is prepared on the first.
WARM_UP = 200


async def bridge_roundtrip(dsn: str, count: int) -> float:
    """``SELECT 1`` on one connection in a sequential loop: one round trip per call, the floor
    under every statement. Statements/s."""
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(WARM_UP):
            await conn.fetchval("SELECT 1")
        started = time.perf_counter()
        for _ in range(count):
            await conn.fetchval("SELECT 1")
        return count / (time.perf_counter() - started)
    finally:
        await conn.close()


async def execute_short_stream(dsn: str, schema: str, count: int, length: int) -> float:
    """Deposits by hand, each on its own stream of *length* events (as on our side): read the
    stream's rows, fold them with ``json.loads``, then the version-checked append. Commands/s."""
    conn = await asyncpg.connect(dsn)
    try:
        # One more stream than timed commands, for the untimed warm-up command.
        names = [f"account-{n:05d}" for n in range(count + 1)]
        async with conn.transaction():
            await conn.executemany(
                f'INSERT INTO "{schema}".streams VALUES ($1, $2)',
                [(name, length) for name in names],
            )
            await conn.executemany(
                f'INSERT INTO "{schema}".events (stream_id, stream_version, type, data, metadata) '
                "VALUES ($1, $2, $3, $4, '{}')",
                [
                    (name, 1, "AccountOpened", '{"initial": 1000}')
                    if version == 1
                    else (name, version, "MoneyDeposited", '{"amount": 1, "source": "seed"}')
                    for name in names
                    for version in range(1, length + 1)
                ],
            )
        read = (
            f'SELECT type, data FROM "{schema}".events WHERE stream_id = $1 ORDER BY stream_version'
        )
        payload = json.dumps({"amount": 1, "source": "bench"})

        async def deposit(stream: str) -> None:
            rows = await conn.fetch(read, stream)
            balance = 0
            for row in rows:
                data = json.loads(row["data"])
                if row["type"] == "AccountOpened":
                    balance = data["initial"]
                elif row["type"] == "MoneyWithdrawn":
                    balance -= data["amount"]
                else:
                    balance += data["amount"]
            await _append_one(conn, schema, stream, len(rows), payload)

        await deposit(names[-1])
        started = time.perf_counter()
        for name in names[:count]:
            await deposit(name)
        return count / (time.perf_counter() - started)
    finally:
        await conn.close()


#: The baseline's tags, added to its events table by hand (decisions over a query, issue 28):
#: the events' tags, and one row per (tag, event) in a B-tree, so that a decision reads one
#: tag's rows in order. The same shape as eventcore-trio's event_tags.
RAW_TAGS_SQL = """
ALTER TABLE "{s}".events ADD COLUMN tags text[] COLLATE "C" NOT NULL DEFAULT '{{}}';
CREATE TABLE "{s}".event_tags (
    tag text COLLATE "C" NOT NULL,
    tx bigint NOT NULL,
    position bigint NOT NULL,
    type text COLLATE "C" NOT NULL,
    PRIMARY KEY (tag, tx, position) INCLUDE (type)
);
"""

#: Insert events with their tags (joined by chr(31)) and their event_tags rows: one statement.
_INSERT_TAGGED = (
    'WITH e AS (INSERT INTO "{s}".events (stream_id, stream_version, type, data, metadata, '
    "tags) SELECT x.stream_id, x.version, x.type, x.data, '{{}}', "
    "string_to_array(x.tags, chr(31)) "
    "FROM unnest($1::text[], $2::bigint[], $3::text[], $4::jsonb[], $5::text[]) "
    "WITH ORDINALITY AS x(stream_id, version, type, data, tags, ord) ORDER BY x.ord "
    "RETURNING tx, position, type, tags) "
    'INSERT INTO "{s}".event_tags (tag, tx, position, type) '
    "SELECT g.tag, e.tx, e.position, e.type FROM e, unnest(e.tags) AS g(tag)"
)

#: One tag's events of some types, in the global order: the read of a decision (and the
#: SELECT read_query_latency's baseline sends, there against eventcore-trio's own tables).
_READ_TAG = (
    "SELECT e.tx, e.position, e.stream_id, e.stream_version, e.event_id, e.type, e.data, "
    "e.metadata, e.recorded_at, e.tags "
    'FROM "{s}".event_tags AS t JOIN "{s}".events AS e ON e.tx = t.tx AND e.position = t.position '
    "WHERE t.tag = $1 AND t.type = ANY($2::text[]) ORDER BY t.tx, t.position"
)


async def append_conditional(
    dsn: str, schema: str, count: int, decisions: int, warm_up: int, matches: int
) -> float:
    """Decisions by hand on a course of its own each, after loading *count* events (the
    layout of `benchmarks._decision_data`) with one unnest() statement per 1,000: read the
    course's subscriptions, fold them, then one transaction: an advisory lock per tag of the
    new event (the course's among them, sorted, so writers of a tag queue on it), check that
    no subscription came after the read, insert the event and its tag rows. The first
    *warm_up* decisions are untimed. Decisions/s."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(RAW_SCHEMA_SQL.format(s=schema) + RAW_TAGS_SQL.format(s=schema))
        insert = _INSERT_TAGGED.format(s=schema)
        events = decision_events(count, decisions + warm_up, matches)
        for start in range(0, count, CHUNK):
            chunk = events[start : start + CHUNK]
            await conn.execute(
                insert,
                [f"load-{start // CHUNK}"] * len(chunk),
                list(range(1, len(chunk) + 1)),
                [type_ for type_, _, _ in chunk],
                [json.dumps(data) for _, _, data in chunk],
                [chr(31).join(tags) for _, tags, _ in chunk],
            )
        for table in ("events", "event_tags"):
            await conn.execute(f'VACUUM (ANALYZE) "{schema}".{table}')
        read = _READ_TAG.format(s=schema)
        lock = "SELECT pg_advisory_xact_lock(hashtext(k)) FROM unnest($1::text[]) AS k ORDER BY k"
        check = (
            f'SELECT EXISTS (SELECT FROM "{schema}".event_tags '
            "WHERE tag = $1 AND type = ANY($2::text[]) AND (tx, position) > ($3, $4))"
        )
        types = [SUBSCRIBED]

        async def subscribe(course: int) -> None:
            tag = course_tag(course)
            rows = await conn.fetch(read, tag, types)
            subscribed = [_decode_tagged(row) for row in rows]
            students = {event["data"]["student"] for event in subscribed}
            if len(subscribed) != matches or len(students) >= CAPACITY:
                raise RuntimeError(f"course {course}: {len(subscribed)} subscriptions read")
            after = subscribed[-1]["position"] if subscribed else (0, 0)
            student = f"new-{course}"
            tags = sorted([tag, f"student:{student}"])
            async with conn.transaction():
                await conn.execute(lock, tags)
                if await conn.fetchval(check, tag, types, *after):
                    raise RuntimeError(f"course {course}: subscribed to since the read")
                await conn.execute(
                    insert,
                    [f"$tagged-{uuid.uuid4().hex}"],
                    [1],
                    [SUBSCRIBED],
                    [json.dumps({"student": student})],
                    [chr(31).join(tags)],
                )

        for course in range(decisions, decisions + warm_up):
            await subscribe(course)
        started = time.perf_counter()
        for course in range(decisions):
            await subscribe(course)
        return decisions / (time.perf_counter() - started)
    finally:
        await conn.close()


async def read_query_latency(
    dsn: str, schema: str, reads: int, courses: int, warm_up: int, matches: int
) -> list[float]:
    """*reads* reads of one course's subscriptions by hand (`_READ_TAG`, decoded as the
    catch-up baseline decodes), on eventcore-trio's tables in *schema*, the courses in turn
    after *warm_up* untimed reads; each read's time in ms."""
    conn = await asyncpg.connect(dsn)
    try:
        read = _READ_TAG.format(s=schema)
        tags = [course_tag(course) for course in range(courses)]
        types = [SUBSCRIBED]
        for n in range(warm_up):
            await conn.fetch(read, tags[n % courses], types)
        times = []
        for n in range(reads):
            tag = tags[(n + warm_up) % courses]
            started = time.perf_counter()
            events = [_decode_tagged(row) for row in await conn.fetch(read, tag, types)]
            times.append((time.perf_counter() - started) * 1000)
            if len(events) != matches:
                raise RuntimeError(f"read {len(events)} events of {tag}, expected {matches}")
        return times
    finally:
        await conn.close()


if __name__ == "__main__":
    import sys

    function = globals()[sys.argv[1]]
    arguments = json.loads(sys.stdin.read())
    print(json.dumps(asyncio.run(function(*arguments))))
