"""What the torture run projects: a ledger per account, plus a record of every application.

Three projections build it: "ledger" (one unit, the one whose leader the faults hit),
"ledger-p" (the same in four partitions, whose units the hosts spread among themselves) and
"ledger-r" (the same again, as a reactor: after writing its rows through ``ctx.db`` it appends
a reaction to every third posting with ``ctx.append``, so its batches append after they
wrote, as application reactors do).

The read model (`ledger`) is what a user's projection would write. The `applied` table is
the evidence: one row per event applied, with the host process, the lock session and the
batch's transaction and server-clock interval, all committed in the batch's transaction. So an
event applied twice is two rows, an event never applied is none, and two leaders at once are
two batches from different sessions whose intervals overlap. A trigger on the checkpoint table
records every move backwards.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Final, final

import attrs

from .._events import NewEvent, RecordedEvent, StreamAppend
from .._filters import EventFilter
from ..projection import ProjectionContext

PROJECTOR_NAME: Final = "ledger"
#: The same ledger, partitioned: its units spread over the hosts.
PARTITIONED_NAME: Final = "ledger-p"
PARTITIONS: Final = 4
#: The same ledger again, reacting to postings with events of its own.
REACTOR_NAME: Final = "ledger-r"
PROJECTIONS: Final = (PROJECTOR_NAME, PARTITIONED_NAME, REACTOR_NAME)
STREAM_PREFIX: Final = "acct-"
EVENT_TYPE: Final = "Posted"
#: The reactor's events: one per posting whose amount is a multiple of 3, in a stream per
#: account (``react-acct-007``), with the posting's id as ``data["source"]``.
REACTION_TYPE: Final = "Reacted"
REACTION_PREFIX: Final = "react-"
LEDGER_FILTER: Final = EventFilter(event_types=[EVENT_TYPE], stream_prefix=STREAM_PREFIX)
#: Every posting carries the tag of its account (``account:acct-007``), so that appends take
#: tag locks under every fault.
ACCOUNT_TAG_PREFIX: Final = "account:"
#: The decisions' events: a claim of a seat (``seat:<half seconds>``, its only tag), by a
#: decision (``metadata["by"] == "decision"``) or by an outbox transaction (``"outbox"``,
#: in a stream ``seat-<half seconds>``). No projection applies them.
SEAT_TYPE: Final = "SeatClaimed"
SEAT_TAG_PREFIX: Final = "seat:"
SEAT_STREAM_PREFIX: Final = "seat-"


def account_tag(stream_id: str) -> str:
    """The tag every posting to *stream_id* carries."""
    return f"{ACCOUNT_TAG_PREFIX}{stream_id}"


def app_schema_sql(store_schema: str, app: str) -> str:
    """DDL for the torture run's read model and evidence tables, in schema *app*."""
    return f"""
    CREATE SCHEMA "{app}";
    CREATE TABLE "{app}".ledger (
        projection text NOT NULL, stream_id text NOT NULL, total bigint NOT NULL,
        events bigint NOT NULL, PRIMARY KEY (projection, stream_id));
    -- id: the order of application (one stream is applied by one unit at a time, so for a
    -- stream it is the commit order); it says whether versions were applied in order.
    CREATE TABLE "{app}".applied (
        id bigserial, projection text NOT NULL DEFAULT '{PROJECTOR_NAME}', partition int,
        event_id uuid NOT NULL, stream_id text NOT NULL DEFAULT '',
        stream_version bigint NOT NULL DEFAULT 0, host_pid int NOT NULL,
        backend_pid int NOT NULL, xact bigint NOT NULL, started timestamptz NOT NULL,
        finished timestamptz NOT NULL);
    -- The outbox writers' own rows: one per transaction, committed with its events or not
    -- at all.
    CREATE TABLE "{app}".outbox (
        id uuid PRIMARY KEY, event_ids uuid[] NOT NULL);
    CREATE TABLE "{app}".checkpoint_regressions (
        subscription_name text NOT NULL, old_tx bigint NOT NULL, old_position bigint NOT NULL,
        new_tx bigint NOT NULL, new_position bigint NOT NULL,
        at timestamptz NOT NULL DEFAULT clock_timestamp());
    CREATE FUNCTION "{app}".note_regression() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        IF (NEW.tx, NEW.position) < (OLD.tx, OLD.position) THEN
            INSERT INTO "{app}".checkpoint_regressions
                (subscription_name, old_tx, old_position, new_tx, new_position)
            VALUES (NEW.subscription_name, OLD.tx, OLD.position, NEW.tx, NEW.position);
        END IF;
        RETURN NEW;
    END $fn$;
    CREATE TRIGGER torture_regressions BEFORE UPDATE ON "{store_schema}".subscriptions
        FOR EACH ROW EXECUTE FUNCTION "{app}".note_regression();
    """


@final
@attrs.frozen
class LedgerProjector:
    """The transactional projection the torture hosts run: totals per account, with evidence."""

    app: str
    name: str = PROJECTOR_NAME
    filter: EventFilter = LEDGER_FILTER
    partitions: int = 1
    #: Also append a reaction to every posting whose amount is a multiple of 3.
    reacts: bool = False

    async def apply(self, event: RecordedEvent, ctx: ProjectionContext) -> None:
        """Apply one event (the runtime isolates a failed batch event by event)."""
        await self.apply_batch([event], ctx)

    async def apply_batch(self, events: Sequence[RecordedEvent], ctx: ProjectionContext) -> None:
        """Apply a whole batch in two statements on the leader's session."""
        totals: dict[str, int] = defaultdict(int)
        counts: dict[str, int] = defaultdict(int)
        for event in events:
            totals[event.stream_id] += int(event.data["amount"])
            counts[event.stream_id] += 1
        streams = sorted(totals)
        await ctx.db.execute(
            f'INSERT INTO "{self.app}".ledger AS l (projection, stream_id, total, events) '
            # ROWS FROM with qualified unnests: the multi-argument unnest() is expanded only
            # unqualified, into calls that a look-alike in another schema could take.
            "SELECT $4, * FROM ROWS FROM (pg_catalog.unnest($1::text[]), "
            "pg_catalog.unnest($2::bigint[]), pg_catalog.unnest($3::bigint[])) "
            "ON CONFLICT (projection, stream_id) DO UPDATE "
            "SET total = l.total + excluded.total, events = l.events + excluded.events",
            streams,
            [totals[s] for s in streams],
            [counts[s] for s in streams],
            self.name,
        )
        await ctx.db.execute(
            f'INSERT INTO "{self.app}".applied (projection, partition, event_id, stream_id, '
            "stream_version, host_pid, backend_pid, xact, started, finished) "
            "SELECT $4, $5, e, s, v, $2, pg_backend_pid(), pg_current_xact_id()::text::bigint, "
            "now(), clock_timestamp() "
            "FROM ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($3::text[]), "
            "pg_catalog.unnest($6::bigint[])) WITH ORDINALITY AS x(e, s, v, n) "
            "ORDER BY n",
            [event.event_id for event in events],
            os.getpid(),
            [event.stream_id for event in events],
            self.name,
            ctx.partition,
            [event.stream_version for event in events],
        )
        if self.reacts:
            # After the writes above, as a reactor that records what it did first: the
            # append of a transaction that already holds an id (the late path of the
            # read horizon).
            reactions: dict[str, list[NewEvent]] = defaultdict(list)
            for event in events:
                if int(event.data["amount"]) % 3 == 0:
                    reactions[f"{REACTION_PREFIX}{event.stream_id}"].append(
                        NewEvent(REACTION_TYPE, {"source": str(event.event_id)})
                    )
            if reactions:
                await ctx.append_atomic(
                    [StreamAppend(stream, batch) for stream, batch in sorted(reactions.items())]
                )


def projectors(app: str) -> list[LedgerProjector]:
    """What every torture host runs: the ledger, the ledger in partitions, and the reactor."""
    return [
        LedgerProjector(app),
        LedgerProjector(app, name=PARTITIONED_NAME, partitions=PARTITIONS),
        LedgerProjector(app, name=REACTOR_NAME, reacts=True),
    ]
