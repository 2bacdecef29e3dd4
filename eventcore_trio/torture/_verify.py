"""The torture run's verification: the event log against what the writers and hosts did."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Set

import attrs

from ..postgres import PostgresStore
from ._model import EVENT_TYPE, PROJECTOR_NAME, STREAM_PREFIX
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


async def verify(
    store: PostgresStore,
    app: str,
    *,
    acknowledged: Set[uuid.UUID],
    rolled_back: Set[uuid.UUID],
) -> Findings:
    """Compare the log with the writers' record, the read model and the evidence tables."""
    events_table = f'"{store.schema}".events'
    rows = await store.admin.fetch(
        f"SELECT event_id, stream_id, (data->>'amount')::bigint AS amount FROM {events_table} "
        "WHERE type = $1 AND starts_with(stream_id, $2)",
        EVENT_TYPE,
        STREAM_PREFIX,
    )
    logged = {row["event_id"] for row in rows}
    fold: dict[str, tuple[int, int]] = {}
    for row in rows:
        total, count = fold.get(row["stream_id"], (0, 0))
        fold[row["stream_id"]] = (total + row["amount"], count + 1)

    applied_rows = await store.admin.fetch(f'SELECT event_id FROM "{app}".applied')
    applied = [row["event_id"] for row in applied_rows]
    applied_once = set(applied)

    ledger_rows = await store.admin.fetch(f'SELECT stream_id, total, events FROM "{app}".ledger')
    ledger = {row["stream_id"]: (row["total"], row["events"]) for row in ledger_rows}
    mismatches = sum(1 for s in fold.keys() | ledger.keys() if fold.get(s) != ledger.get(s))

    regressions = await store.admin.fetchval(
        f'SELECT count(*) FROM "{app}".checkpoint_regressions WHERE subscription_name = $1',
        PROJECTOR_NAME,
    )
    batch_rows = await store.admin.fetch(
        "SELECT backend_pid, min(started) AS started, max(finished) AS finished "
        f'FROM "{app}".applied GROUP BY xact, backend_pid'
    )
    batches = [Batch(r["backend_pid"], r["started"], r["finished"]) for r in batch_rows]
    return Findings(
        events=len(logged),
        lost=len(acknowledged - logged) + len(logged - applied_once),
        duplicated=len(applied) - len(applied_once),
        phantoms=len(rolled_back & logged),
        checkpoint_regressions=int(regressions),
        double_leaders=count_overlaps(batches),
        ledger_mismatches=mismatches,
    )
