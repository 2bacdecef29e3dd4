"""The torture run's verification: the event log against what the writers and hosts did."""

from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence, Set

import attrs

from ..postgres import PostgresStore
from ._model import (
    EVENT_TYPE,
    PROJECTIONS,
    REACTION_TYPE,
    REACTOR_NAME,
    SEAT_TAG_PREFIX,
    SEAT_TYPE,
    STREAM_PREFIX,
)
from ._report import Findings


@attrs.frozen
class Batch:
    """One committed batch, as its evidence rows show it: which session, and when."""

    backend_pid: int
    started: dt.datetime
    finished: dt.datetime


def count_overlaps(batches: Iterable[Batch]) -> int:
    """How many batches began before a batch of another session had finished.

    With one leader at a time, batches of different lock sessions are disjoint in time: the
    next session's transaction can only begin after the previous session (and its last
    transaction) ended. Each overlap is a moment with two leaders.
    """
    overlaps = 0
    latest: Batch | None = None
    for batch in sorted(batches, key=lambda b: (b.started, b.finished)):
        if (
            latest is not None
            and batch.backend_pid != latest.backend_pid
            and batch.started < latest.finished
        ):
            overlaps += 1
        if latest is None or batch.finished >= latest.finished:
            latest = batch
    return overlaps


def count_order_violations(versions_in_applied_order: Iterable[tuple[str, int]]) -> int:
    """How many times a stream's version was applied after a later one of the same stream."""
    last: dict[str, int] = {}
    violations = 0
    for stream, version in versions_in_applied_order:
        if version <= last.get(stream, 0):
            violations += 1
        last[stream] = max(version, last.get(stream, 0))
    return violations


def count_decision_violations(claims_in_log_order: Iterable[tuple[str, str | None]]) -> int:
    """How many claims made by a decision were not the first claim of their seat.

    *claims_in_log_order*: every committed claim as (seat, who claimed it: ``"decision"``,
    ``"outbox"``), in the global order. A decision claims only when its read found no claim,
    and only if no claim was written after its read: any claim before its own in the global
    order was either returned by the read or lies after the read's position, and failed the
    condition. Claims written unconditionally (by outbox transactions) may follow any claim.
    """
    claimed: set[str] = set()
    violations = 0
    for seat, by in claims_in_log_order:
        if by == "decision" and seat in claimed:
            violations += 1
        claimed.add(seat)
    return violations


async def verify(
    store: PostgresStore,
    app: str,
    *,
    acknowledged: Set[uuid.UUID],
    rolled_back: Set[uuid.UUID],
    outbox: Set[uuid.UUID] = frozenset(),
    followed: Sequence[uuid.UUID] | None = None,
    projections: Sequence[str] = PROJECTIONS,
) -> Findings:
    """Compare the log with the writers' record, the read models and the evidence tables.

    Every count covers every projection in *projections*; double leaders are counted per
    unit (a projection, or one partition of it). *outbox*: the events acknowledged to
    outbox writers, each of which must have its transaction's own row. *followed*: every
    event id an independent follower of ``read_events`` was given, in order, which must be
    every event of the log exactly once (None: no follower ran). The reactor's events are
    checked when its projection is among *projections*: one per posting whose amount is a
    multiple of 3. *acknowledged* and *rolled_back* cover the seat claims too; the ledger
    checks cover postings only.
    """
    events_table = f'"{store.schema}".events'
    rows = await store.admin.fetch(
        f"SELECT event_id, stream_id, (data->>'amount')::bigint AS amount FROM {events_table} "
        "WHERE type = $1 AND starts_with(stream_id, $2)",
        EVENT_TYPE,
        STREAM_PREFIX,
    )
    logged = {row["event_id"] for row in rows}
    everything = {
        row["event_id"] for row in await store.admin.fetch(f"SELECT event_id FROM {events_table}")
    }
    fold: dict[str, tuple[int, int]] = {}
    for row in rows:
        total, count = fold.get(row["stream_id"], (0, 0))
        fold[row["stream_id"]] = (total + row["amount"], count + 1)

    lost = len(acknowledged - everything)
    duplicated = mismatches = double_leaders = order_violations = 0
    for name in projections:
        applied_rows = await store.admin.fetch(
            f'SELECT event_id, stream_id, stream_version FROM "{app}".applied '
            "WHERE projection = $1 ORDER BY id",
            name,
        )
        applied = [row["event_id"] for row in applied_rows]
        applied_once = set(applied)
        lost += len(logged - applied_once)
        duplicated += len(applied) - len(applied_once)
        order_violations += count_order_violations(
            (row["stream_id"], row["stream_version"]) for row in applied_rows if row["stream_id"]
        )
        ledger_rows = await store.admin.fetch(
            f'SELECT stream_id, total, events FROM "{app}".ledger WHERE projection = $1', name
        )
        ledger = {row["stream_id"]: (row["total"], row["events"]) for row in ledger_rows}
        mismatches += sum(1 for s in fold.keys() | ledger.keys() if fold.get(s) != ledger.get(s))
        batch_rows = await store.admin.fetch(
            "SELECT partition, backend_pid, min(started) AS started, max(finished) AS finished "
            f'FROM "{app}".applied WHERE projection = $1 GROUP BY partition, xact, backend_pid',
            name,
        )
        units: dict[int | None, list[Batch]] = {}
        for r in batch_rows:
            units.setdefault(r["partition"], []).append(
                Batch(r["backend_pid"], r["started"], r["finished"])
            )
        double_leaders += sum(count_overlaps(batches) for batches in units.values())

    reactions_missing = reactions_repeated = 0
    if REACTOR_NAME in projections:
        sources = Counter(
            uuid.UUID(row["source"])
            for row in await store.admin.fetch(
                f"SELECT data->>'source' AS source FROM {events_table} WHERE type = $1",
                REACTION_TYPE,
            )
        )
        reacted_to = {row["event_id"] for row in rows if row["amount"] % 3 == 0}
        reactions_missing = len(reacted_to - sources.keys())
        # A reaction to nothing the reactor should have reacted to is one too many as well.
        reactions_repeated = sum(
            n if source not in reacted_to else n - 1 for source, n in sources.items()
        )

    outbox_rows = await store.admin.fetch(f'SELECT event_ids FROM "{app}".outbox')
    with_row = {event_id for row in outbox_rows for event_id in row["event_ids"]}
    outbox_mismatches = sum(
        1 for row in outbox_rows if not set(row["event_ids"]) <= everything
    ) + len(outbox - with_row)

    claims = await store.admin.fetch(
        f"SELECT tags, metadata->>'by' AS by FROM {events_table} WHERE type = $1 "
        "ORDER BY tx, position",
        SEAT_TYPE,
    )
    decision_violations = count_decision_violations(
        (next((t for t in row["tags"] if t.startswith(SEAT_TAG_PREFIX)), ""), row["by"])
        for row in claims
    )

    follower_missed = follower_repeated = 0
    if followed is not None:
        follower_missed = len(everything - set(followed))
        follower_repeated = len(followed) - len(set(followed))

    regressions = await store.admin.fetchval(f'SELECT count(*) FROM "{app}".checkpoint_regressions')
    return Findings(
        events=len(logged),
        lost=lost,
        duplicated=duplicated,
        phantoms=len(rolled_back & everything),
        checkpoint_regressions=int(regressions),
        double_leaders=double_leaders,
        ledger_mismatches=mismatches,
        order_violations=order_violations,
        reactions_missing=reactions_missing,
        reactions_repeated=reactions_repeated,
        outbox_mismatches=outbox_mismatches,
        follower_missed=follower_missed,
        follower_repeated=follower_repeated,
        decision_violations=decision_violations,
    )
