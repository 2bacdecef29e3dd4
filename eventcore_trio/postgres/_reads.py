"""The read path: the SQL that reads events, gap-free, and the decoding of its rows.

Gap-free visibility: readers see only rows below the read horizon (`visible`), all of whose
writers have ended. A transaction that drew its position early but commits late has a ``tx``
at or above today's horizon, so it is read later, never skipped. See docs/postgres.md
("Gap-free reads", "The read horizon"). Filters are WHERE clauses, so they apply before the LIMIT.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, final

import attrs
import trio

from .._backend._decoding import decode_stored, require_decoded
from .._errors import DatabaseError
from .._events import RecordedEvent, UndecodableEvent
from .._filters import EventFilter
from .._positions import Position, position_parts, trusted_position
from ._keys import index_lock_key
from ._pool import Pool, SessionOptions

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

#: The columns of an events row as read, in `decode_row`'s order. Most events have no tags:
#: an empty array comes back as NULL, which asyncpg hands over as None instead of decoding
#: an array into a new list (about 0.1 us per row, of the 1.5 us asyncpg spends on one).
#: The personal field names come joined by the unit separator (names hold no control
#: character): a string decodes faster than an array, and `decode_row` turns each distinct
#: one into one shared tuple.
EVENT_COLUMNS: Final = (
    "tx, position, stream_id, stream_version, event_id, type, data, metadata, recorded_at, "
    "NULLIF(tags, '{}') AS tags, subject, array_to_string(personal, chr(31)) AS personal"
)

#: The data keys of a page's subjects, by subject (None: forgotten), from
#: `_personal.PersonalData.keys_for`.
Keys = Mapping[str, "AESGCM | None"]


#: Up to how many matching events behind status counts a unit's lag exactly; beyond, it
#: estimates it (`lag_estimate`). Counting this many costs about a millisecond along an
#: index (10 ms through a filter no index serves, such as a stream prefix matching a tenth),
#: ten times that at 100,000, where an exact count of every event behind costs a second per
#: unit at 10,000,000 (docs/benchmarks.md, "Status cost").
EXACT_LAG: Final = 10_000

#: Rows of transactions that have all ended: the cheap visibility rule, tried first.
VISIBLE: Final = "tx < pg_snapshot_xmin(pg_current_snapshot())::text::bigint"


def _next_prefix(prefix: str) -> str | None:
    # The smallest string greater than every string that starts with prefix, in code-point
    # order (the "C" collation of stream_id): lets a prefix filter be an index range scan.
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            return "".join(chars) + chr(last + 1)
    return None


def filter_clauses(event_filter: EventFilter | None, args: list[object]) -> list[str]:
    """WHERE clauses for *event_filter*; its parameters are appended to *args*."""
    clauses: list[str] = []
    if event_filter is None:
        return clauses
    if event_filter.event_types is not None:
        args.append(sorted(event_filter.event_types))
        clauses.append(f"type = ANY(${len(args)}::text[])")
    if event_filter.stream_prefix is not None:
        args.append(event_filter.stream_prefix)
        clauses.append(f"stream_id >= ${len(args)}")
        upper = _next_prefix(event_filter.stream_prefix)
        if upper is not None:
            args.append(upper)
            clauses.append(f"stream_id < ${len(args)}")
    if event_filter.stream_regex is not None:
        args.append(event_filter.stream_regex)
        clauses.append(f"stream_id ~ ${len(args)}")
    if event_filter.partition is not None:
        # The stored hash (see _partitions); the count is written into the SQL, so that the
        # expression matches that of the count's index (`partition_index`).
        args.append(event_filter.partition.index)
        clauses.append(
            f"{partition_expression(event_filter.partition.count)} = ${len(args)}::bigint"
        )
    if event_filter.tags:
        # A condition on the rows the ordered walk visits, as a stream pattern is, so a page
        # still stops at its limit; driving the read from event_tags instead would leave the
        # order, and the plan, to a join (measured: docs/projections.md, "Filtering by tags").
        args.append(list(event_filter.tags))
        clauses.append(f"tags @> ${len(args)}::text[]")
    return clauses


def partition_expression(count: int) -> str:
    """Which of *count* partitions an events row is in, as SQL (*count* is a checked int)."""
    # bigint % bigint: pg_catalog's operator of exactly those types, which one of another
    # schema cannot displace (bigint % int would need a cast, and an exact look-alike
    # planted in public would win). The planner folds the cast: indexes built before it
    # still match.
    return f"(stream_hash % {int(count)}::bigint)"


def partition_index(schema: str, count: int) -> tuple[str, str]:
    """The name of the index that serves reads of one of *count* partitions, and the
    statement that builds it without blocking appends."""
    name = f"events_partition_{int(count)}_idx"
    return name, (
        f'CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON "{schema}".events '
        f"({partition_expression(count)}, tx, position)"
    )


# Whether an index of the schema is valid: NULL while there is none.
_INDEX_STATE: Final = (
    "SELECT i.indisvalid FROM pg_catalog.pg_index i "
    "JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid "
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = $1 AND c.relname = $2"
)

# Whether this role may build an index on the events table: only its owner (or a member of
# the owning role, or a superuser) may.
_MAY_INDEX_EVENTS: Final = (
    "SELECT pg_catalog.pg_has_role(c.relowner, 'USAGE') FROM pg_catalog.pg_class c "
    "WHERE c.oid = pg_catalog.to_regclass($1)"
)


def partition_index_advice(schema: str, count: int) -> str:
    """The command the schema's owner runs to build the index of *count* partitions
    (``eventcore-trio migrate --schema S --partition-index N``), for messages that name it.

    .. versionadded:: 0.3
    """
    return f"eventcore-trio migrate --schema {schema} --partition-index {int(count)}"


async def ensure_partition_index(
    pool: Pool,
    schema: str,
    count: int,
    *,
    options: SessionOptions,
) -> bool:
    """Build the index that serves reads of one of *count* partitions, unless it is there;
    True once it is, False (nothing done) when this role may not build it.

    Only the owner of the events table may index it: a least-privilege runtime role reads
    partitions without the index (a scan of the whole log per read) until the owner builds
    it (`partition_index_advice`).
    """
    # Each partition's read walks its own index instead of the whole log (see
    # docs/scale-out.md). Built once per count, CONCURRENTLY, so appends go on meanwhile;
    # one build at a time (two concurrent builds wait for each other's transactions and
    # PostgreSQL aborts one as a deadlock), under a session lock on a connection of its
    # own. A build that was aborted leaves an invalid index: it is dropped and rebuilt.
    # A build waits for every older snapshot in the database; standbys wait in slices
    # for that reason (see _lock_session.wait_for_lock).
    name, build = partition_index(schema, count)
    if await pool.fetchval(_INDEX_STATE, schema, name):
        return True
    if not await pool.fetchval(_MAY_INDEX_EVENTS, f'"{schema}".events'):
        return False
    connection = await options.connect_session("index")
    try:
        # Polled, not waited for in a statement: a waiting statement holds a snapshot,
        # which the build in progress would wait for in turn.
        while not await connection.fetchval(  # noqa: ASYNC110  (another process's lock)
            "SELECT pg_catalog.pg_try_advisory_lock($1::bigint)", index_lock_key(schema)
        ):
            await trio.sleep(0.2)
        for attempt in range(5):
            valid = await connection.fetchval(_INDEX_STATE, schema, name)
            if valid:
                return True
            if valid is False:
                await connection.execute(f'DROP INDEX CONCURRENTLY "{schema}".{name}')
            try:
                await connection.execute(build)
            except DatabaseError as exc:
                # Another build (of another schema or tool) in the same database.
                if exc.sqlstate != "40P01" or attempt == 4:
                    raise
                await trio.sleep(0.1 * 2**attempt)
        return True
    finally:
        await connection.close()


@functools.lru_cache(maxsize=1024)
def _split_names(joined: str) -> tuple[str, ...]:
    return tuple(joined.split("\x1f"))


def _personal_names(names: str | list[str]) -> tuple[str, ...]:
    # Joined as `EVENT_COLUMNS` reads them (one tuple per distinct list, shared), or the
    # array read_query's function returns.
    return _split_names(names) if type(names) is str else tuple(names)


def decode_row(row: Any, keys: Keys | None = None) -> RecordedEvent | UndecodableEvent:
    """An events row (columns in `EVENT_COLUMNS` order, maybe more after) as an event; its
    personal fields opened with *keys* (which must hold its subject: see `Keys`)."""
    # By index (an asyncpg Record is also a sequence): this runs once per event read.
    (
        tx,
        seq,
        stream_id,
        stream_version,
        event_id,
        event_type,
        raw_data,
        raw_metadata,
        at,
        tags,
        subject,
        personal,
    ) = row[:12]
    data_key = None
    if personal:
        # A path that did not fetch the page's keys is a bug, not a forget.
        assert keys is not None, "personal event decoded without its subject's key"
        data_key = keys.get(subject)
    return decode_stored(
        trusted_position(tx, seq),
        stream_id,
        stream_version,
        event_id,
        event_type,
        raw_data,
        raw_metadata,
        at,
        tags=tuple(tags) if tags else (),
        subject=subject,
        personal=_personal_names(personal) if personal else (),
        data_key=data_key,
    )


def recorded_row(row: Any, keys: Keys | None = None) -> RecordedEvent:
    """An events row as a `RecordedEvent`, or `EventDecodeError`."""
    return require_decoded(decode_row(row, keys))


@final
class ReadQueries:
    """The read statements of one schema."""

    def __init__(self, schema: str) -> None:
        self._events = f'"{schema}".events'
        # Whether committed events wait above the snapshot's xmin (an InitPlan: once per
        # statement): then the reader asks for the writers' horizon and reads on to it.
        # (max(tx): one step of a backward index scan; an EXISTS over tx >= xmin may be
        # planned as a sequential scan.)
        self._held = (
            f"coalesce((SELECT max(tx) FROM {self._events}) "
            ">= pg_snapshot_xmin(pg_current_snapshot())::text::bigint, false) AS held"
        )
        # With the newest event this statement sees (one step of a backward index scan),
        # which tells a reader whether anything can follow its cursor (see `read_page`).
        self.horizon = (
            f"SELECT h.horizon, h.held_back, n.tx AS newest_tx, n.position AS newest_position "
            f'FROM "{schema}".read_horizon() AS h LEFT JOIN LATERAL (SELECT tx, position '
            f"FROM {self._events} ORDER BY tx DESC, position DESC LIMIT 1) AS n ON true"
        )
        self.read_stream = (
            f"SELECT {EVENT_COLUMNS} FROM {self._events} "
            "WHERE stream_id = $1 AND stream_version > $2 ORDER BY stream_version"
        )

    def read_events(
        self,
        after: Position | None,
        limit: int,
        event_filter: EventFilter | None,
        horizon: int | None = None,
    ) -> tuple[str, list[object]]:
        """One statement for a page, walked along the ``(tx, position)`` primary key.

        Below the snapshot's xmin, with a last ``held`` column (see `read_page`); or below
        *horizon*, a writers' horizon asked for by an earlier statement.
        """
        tx, seq = (0, 0) if after is None else position_parts(after)
        args: list[object] = [tx, seq, limit]
        if horizon is None:
            visible, columns = VISIBLE, f"{EVENT_COLUMNS}, {self._held}"
        else:
            args.append(horizon)
            visible, columns = f"tx < ${len(args)}", EVENT_COLUMNS
        clauses = ["(tx, position) > ($1, $2)", visible, *filter_clauses(event_filter, args)]
        return (
            f"SELECT {columns} FROM {self._events} "
            f"WHERE {' AND '.join(clauses)} ORDER BY tx, position LIMIT $3",
            args,
        )

    def last_position(
        self, event_filter: EventFilter | None, horizon: int
    ) -> tuple[str, list[object]]:
        """The last event below *horizon* matching *event_filter*: ``tx, position`` or no
        row."""
        args: list[object] = [horizon]
        clauses = ["tx < $1", *filter_clauses(event_filter, args)]
        return (
            f"SELECT tx, position FROM {self._events} WHERE {' AND '.join(clauses)} "
            "ORDER BY tx DESC, position DESC LIMIT 1",
            args,
        )

    def lag(
        self, checkpoint: Position | None, event_filter: EventFilter | None
    ) -> tuple[str, list[object]]:
        """What status needs to tell a unit's lag, at a cost that does not grow with it.

        One row per event type of *event_filter* (one row without types): ``n``, how many
        committed matching events follow *checkpoint*, counted up to `EXACT_LAG` + 1 along
        an index (the primary key, the type index, a partition index); ``low`` and
        ``high``, the least and greatest position among those counted; ``tx``,
        ``position`` and ``recorded_at`` of the first of them, NULL when none follows; and
        ``head``, the position of the last event of the store. `lag_estimate` turns the
        rows into a lag. Committed, not visible: events held back by the read horizon are
        lag too.
        """
        tx, seq = (0, 0) if checkpoint is None else position_parts(checkpoint)
        args: list[object] = [tx, seq]
        types = None if event_filter is None else event_filter.event_types
        rest = None if event_filter is None else attrs.evolve(event_filter, event_types=None)
        clauses = ["(tx, position) > ($1, $2)", *filter_clauses(rest, args)]
        source = ""
        if types is not None:
            # One count per type, each an ordered walk of the type index: with
            # `type = ANY(...)` PostgreSQL (before 17) reads that index in no useful order
            # and sorts every match after the checkpoint to count the first ones (0.3 s
            # at 2,500,000 matches, where one type's walk takes 3 ms).
            args.append(sorted(types))
            source = f"unnest(${len(args)}::text[]) AS t(type) CROSS JOIN LATERAL "
            clauses.append("type = t.type")
        where = " AND ".join(clauses)
        # The limit is written into the SQL: a parameter would leave the planner guessing
        # how many rows the count reads.
        return (
            "SELECT w.n, w.low, w.high, f.tx, f.position, f.recorded_at, "
            f"(SELECT position FROM {self._events} ORDER BY tx DESC, position DESC LIMIT 1) "
            f"AS head FROM {source}"
            "(SELECT count(*) AS n, min(position) AS low, max(position) AS high "
            f"FROM (SELECT position FROM {self._events} WHERE {where} "
            f"ORDER BY tx, position LIMIT {int(EXACT_LAG) + 1}) AS counted) AS w "
            f"LEFT JOIN LATERAL (SELECT tx, position, recorded_at FROM {self._events} "
            f"WHERE {where} ORDER BY tx, position LIMIT 1) AS f ON true",
            args,
        )


def lag_estimate(rows: Sequence[Any]) -> tuple[int, bool, dt.datetime | None]:
    """A unit's lag from the rows of `ReadQueries.lag`: how many events, whether that is an
    estimate, and when the first of them was recorded (None when none follows).

    Up to `EXACT_LAG` events (of each type) the count is exact. Beyond, the counted events
    are the first ones after the checkpoint: as many matching events per position as among
    them (1 for an unfiltered unit, less the gaps that failed appends leave in the
    sequence; about 1/K for a partition of K), over the positions from the first of them to
    the head.
    """
    # Chosen by measurement (docs/benchmarks.md, "Status cost"): both ends are index
    # steps, so the cost stays that of counting EXACT_LAG rows, and the density of the
    # first matches is within a percent on evenly spread events. pg_class.reltuples, the
    # other cheap figure, is the whole table's, as old as the last ANALYZE, and blind to a
    # filter. Never below what was counted: an estimate is always above EXACT_LAG.
    total, estimated = 0, False
    for row in rows:
        n: int = row["n"]
        if n <= EXACT_LAG:
            total += n
            continue
        per_position = n / (row["high"] - row["low"] + 1)
        total += max(n, round(per_position * (row["head"] - row["low"] + 1)))
        estimated = True
    first = min(
        (row for row in rows if row["tx"] is not None),
        key=lambda row: (row["tx"], row["position"]),
        default=None,
    )
    return total, estimated, None if first is None else first["recorded_at"]


async def read_page(
    pool: Pool,
    queries: ReadQueries,
    after: Position | None,
    limit: int,
    event_filter: EventFilter | None,
) -> list[Any]:
    """Up to *limit* rows after *after*, gap-free, held back by event writers only.

    First below the snapshot's xmin, which needs no lock table. When that page is short and
    committed events may wait above the xmin (some transaction, a writer or not, is open),
    ask for the writers' horizon and read on to it: a statement that starts after the
    horizon was computed sees every event below it (docs/postgres.md, "The read horizon").
    """
    sql, args = queries.read_events(after, limit, event_filter)
    rows = list(await pool.fetch(sql, *args))
    if len(rows) == limit:
        return rows
    if rows and not rows[-1]["held"]:
        return rows
    horizon_row = await pool.fetchrow(queries.horizon)
    assert horizon_row is not None
    cursor = trusted_position(rows[-1]["tx"], rows[-1]["position"]) if rows else after
    newest = horizon_row["newest_tx"], horizon_row["newest_position"]
    if not horizon_row["held_back"] and (
        newest[0] is None or (cursor is not None and newest <= position_parts(cursor))
    ):
        # Nothing below the horizon follows the cursor: an event below it belongs to a
        # transaction that ended before the horizon statement, which saw the newest one.
        return rows
    # Held back: read on to the writers' horizon. Not held back: every event is below the
    # horizon statement's xmin, but the first statement's xmin may have been older (a
    # transaction anywhere in the cluster held it, and ended in between), and the events
    # between the two are committed: read them too. A short page returned instead would
    # leave them to the next wake-up (the notification is spent: the next poll). This
    # costs a third statement only when some event follows the cursor (for a filtered
    # reader, one it may not match).
    sql, args = queries.read_events(cursor, limit - len(rows), event_filter, horizon_row["horizon"])
    return rows + list(await pool.fetch(sql, *args))


async def horizon(pool: Pool, queries: ReadQueries) -> int:
    """The horizon a read starting now may read below (the writers', when held back)."""
    row = await pool.fetchrow(queries.horizon)
    assert row is not None
    return int(row["horizon"])
