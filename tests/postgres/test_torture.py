"""The torture run against real PostgreSQL: its verification can fail, and a short run holds."""

from __future__ import annotations

import json
import random
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import attrs
import pytest
import trio

from eventcore_trio import NewEvent, StreamAppend
from eventcore_trio.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.projection import ProjectionConfig, run_projection
from eventcore_trio.testing import EmbeddedPostgres, PostgresHarness, read_all
from eventcore_trio.torture import FaultKind, run_torture
from eventcore_trio.torture._model import (
    EVENT_TYPE,
    SEAT_TAG_PREFIX,
    SEAT_TYPE,
    app_schema_sql,
    projectors,
)
from eventcore_trio.torture._report import DECISION_OUTCOMES, Findings
from eventcore_trio.torture._verify import count_decision_violations, verify
from eventcore_trio.torture._writers import WriteLog, _append_outbox

from ..conftest import oldest_server_param
from ..helpers import (
    TORTURE_REPORT_FIELDS,
    clean_findings,
    dsn_environment,
    eventually,
    start_interruptible,
)

if TYPE_CHECKING:
    from _typeshed import SupportsLenAndGetItem

T = TypeVar("T")
CLEAN = clean_findings(12)


def _claim(seat: int, by: str) -> NewEvent:
    # A seat claim as the writers make them (see torture/_writers.py).
    tag = f"{SEAT_TAG_PREFIX}{seat}"
    return NewEvent(
        SEAT_TYPE, {"seat": tag}, tags=[tag], metadata={"by": by}, event_id=uuid.uuid4()
    )


class TestVerification:
    """Each check of the verification catches the damage it exists for."""

    @pytest.fixture
    async def projected(
        self, harness: PostgresHarness
    ) -> AsyncIterator[tuple[PostgresStore, str, set[uuid.UUID]]]:
        """A store whose 12 events were projected correctly, with the evidence tables."""
        app = f"{harness.schema}_app"
        async with harness.open_store() as store:
            await store.admin.execute(app_schema_sql(harness.schema, app))
            ids: set[uuid.UUID] = set()
            for n in range(4):
                batch = [
                    NewEvent(EVENT_TYPE, {"amount": n + k}, event_id=uuid.uuid4()) for k in range(3)
                ]
                ids |= {e.event_id for e in batch if e.event_id}
                await store.append_atomic([StreamAppend(f"acct-{n}", batch)])
            for projector in projectors(app):
                await run_projection(store, projector, ProjectionConfig(batch_size=5))
            try:
                yield store, app, ids
            finally:
                await store.admin.execute(f'DROP SCHEMA "{app}" CASCADE')

    async def _verify(
        self,
        store: PostgresStore,
        app: str,
        ids: set[uuid.UUID],
        followed: list[uuid.UUID] | None = None,
        **kwargs: set[uuid.UUID],
    ) -> Findings:
        return await verify(
            store,
            app,
            acknowledged=kwargs.get("acknowledged", ids),
            rolled_back=kwargs.get("rolled_back", set()),
            outbox=kwargs.get("outbox", set()),
            followed=followed,
        )

    async def test_the_reactor_reacted_once_to_each_posting(
        self, projected: tuple[PostgresStore, str, set[uuid.UUID]]
    ) -> None:
        store, _, _ = projected
        reactions = await store.admin.fetch(
            f"SELECT data->>'source' AS source FROM \"{store.schema}\".events "
            "WHERE type = 'Reacted'"
        )
        postings = await store.admin.fetch(
            f'SELECT event_id FROM "{store.schema}".events '
            "WHERE type = 'Posted' AND (data->>'amount')::int % 3 = 0"
        )
        assert sorted(r["source"] for r in reactions) == sorted(
            str(p["event_id"]) for p in postings
        )
        assert reactions

    async def test_a_posting_the_reactor_never_reacted_to(
        self, projected: tuple[PostgresStore, str, set[uuid.UUID]]
    ) -> None:
        store, app, ids = projected
        late = uuid.uuid4()
        await store.append("acct-9", [NewEvent(EVENT_TYPE, {"amount": 3}, event_id=late)])
        findings = await self._verify(store, app, ids | {late})
        assert findings.reactions_missing == 1

    async def test_a_reaction_too_many(
        self, projected: tuple[PostgresStore, str, set[uuid.UUID]]
    ) -> None:
        store, app, ids = projected
        source = await store.admin.fetchval(
            f"SELECT data->>'source' FROM \"{store.schema}\".events WHERE type = 'Reacted' LIMIT 1"
        )
        await store.append("react-acct-0", [NewEvent("Reacted", {"source": source})])
        assert (await self._verify(store, app, ids)).reactions_repeated == 1

    async def test_an_outbox_row_without_its_events(
        self, projected: tuple[PostgresStore, str, set[uuid.UUID]]
    ) -> None:
        store, app, ids = projected
        await store.admin.execute(
            f'INSERT INTO "{app}".outbox VALUES (gen_random_uuid(), ARRAY[gen_random_uuid()])'
        )
        assert (await self._verify(store, app, ids)).outbox_mismatches == 1

    async def test_outbox_events_without_their_row(
        self, projected: tuple[PostgresStore, str, set[uuid.UUID]]
    ) -> None:
        store, app, ids = projected
        findings = await self._verify(store, app, ids, outbox={next(iter(ids))})
        assert findings.outbox_mismatches == 1

    async def test_a_follower_that_missed_or_repeated_an_event(
        self, projected: tuple[PostgresStore, str, set[uuid.UUID]]
    ) -> None:
        store, app, ids = projected
        everything = [e.event_id for e in await read_all(store)]
        assert (await self._verify(store, app, ids, followed=everything)) == CLEAN
        missed = await self._verify(store, app, ids, followed=everything[1:])
        assert missed.follower_missed == 1
        repeated = await self._verify(store, app, ids, followed=[*everything, everything[3]])
        assert repeated.follower_repeated == 1

    async def test_a_correct_projection_passes(
        self, projected: tuple[PostgresStore, str, set[uuid.UUID]]
    ) -> None:
        store, app, ids = projected
        assert await self._verify(store, app, ids) == CLEAN

    async def test_an_event_applied_twice(
        self, projected: tuple[PostgresStore, str, set[uuid.UUID]]
    ) -> None:
        store, app, ids = projected
        await store.admin.execute(
            f'INSERT INTO "{app}".applied SELECT * FROM "{app}".applied '
            "WHERE projection = 'ledger-p' LIMIT 1"
        )
        findings = await self._verify(store, app, ids)
        assert findings.duplicated == 1

    async def test_an_event_never_applied(
        self, projected: tuple[PostgresStore, str, set[uuid.UUID]]
    ) -> None:
        store, app, ids = projected
        await store.admin.execute(
            f"DELETE FROM \"{app}\".applied WHERE projection = 'ledger' "
            f'AND event_id = (SELECT event_id FROM "{app}".applied LIMIT 1)'
        )
        assert (await self._verify(store, app, ids)).lost == 1

    async def test_an_acknowledged_append_missing_from_the_log(
        self, projected: tuple[PostgresStore, str, set[uuid.UUID]]
    ) -> None:
        store, app, ids = projected
        findings = await self._verify(store, app, ids, acknowledged=ids | {uuid.uuid4()})
        assert findings.lost == 1

    async def test_a_rolled_back_event_in_the_log(
        self, projected: tuple[PostgresStore, str, set[uuid.UUID]]
    ) -> None:
        store, app, ids = projected
        findings = await self._verify(store, app, ids, rolled_back={next(iter(ids))})
        assert findings.phantoms == 1

    async def test_a_wrong_total(
        self, projected: tuple[PostgresStore, str, set[uuid.UUID]]
    ) -> None:
        store, app, ids = projected
        await store.admin.execute(
            f'UPDATE "{app}".ledger SET total = total + 1 '
            "WHERE stream_id = 'acct-2' AND projection = 'ledger'"
        )
        assert (await self._verify(store, app, ids)).ledger_mismatches == 1

    async def test_a_checkpoint_moved_back(
        self, projected: tuple[PostgresStore, str, set[uuid.UUID]]
    ) -> None:
        store, app, ids = projected
        await store.admin.execute(
            f'UPDATE "{store.schema}".subscriptions SET position = position - 1 '
            "WHERE subscription_name = $1",
            "ledger",
        )
        assert (await self._verify(store, app, ids)).checkpoint_regressions == 1

    async def test_two_leaders_at_once(
        self, projected: tuple[PostgresStore, str, set[uuid.UUID]]
    ) -> None:
        store, app, ids = projected
        # A batch of another session committed inside the span of an existing batch, for
        # the same unit (one partition of the partitioned ledger).
        await store.admin.execute(
            f'INSERT INTO "{app}".applied '
            "(projection, partition, event_id, host_pid, backend_pid, xact, started, finished) "
            "SELECT projection, partition, gen_random_uuid(), 1, backend_pid + 1, "
            f'xact + 1000000, started, finished FROM "{app}".applied '
            "WHERE projection = 'ledger-p' LIMIT 1"
        )
        assert (await self._verify(store, app, ids)).double_leaders == 1

    async def test_a_decision_after_another_claim_of_its_seat(
        self, projected: tuple[PostgresStore, str, set[uuid.UUID]]
    ) -> None:
        store, app, ids = projected
        # Appended without a condition, one after the other: the log a decision blind to
        # the claim before it (or two decisions that both succeeded) would leave.
        claims = [_claim(1, "outbox"), _claim(1, "decision"), _claim(2, "decision")]
        for claim in claims:
            await store.append_tagged([claim])
        claimed = {c.event_id for c in claims if c.event_id}
        findings = await self._verify(store, app, ids | claimed)
        assert findings == attrs.evolve(CLEAN, decision_violations=1)

    async def test_claims_after_a_decision_are_no_violation(
        self, projected: tuple[PostgresStore, str, set[uuid.UUID]]
    ) -> None:
        store, app, ids = projected
        # Outbox transactions claim unconditionally: after a decision's claim is allowed.
        claims = [_claim(1, "decision"), _claim(1, "outbox"), _claim(1, "outbox")]
        for claim in claims:
            await store.append_tagged([claim], stream_id="seat-1")
        claimed = {c.event_id for c in claims if c.event_id}
        # Committed with an outbox transaction's own row, which names them.
        await store.admin.execute(
            f'INSERT INTO "{app}".outbox VALUES (gen_random_uuid(), $1)', sorted(claimed)
        )
        assert await self._verify(store, app, ids | claimed, outbox=claimed) == CLEAN
        # A claim acknowledged to a writer and missing, one rolled back and present.
        missing = await self._verify(store, app, ids | claimed | {uuid.uuid4()})
        assert missing == attrs.evolve(CLEAN, lost=1)
        phantom = await self._verify(
            store, app, ids | claimed, rolled_back={c.event_id for c in claims[2:] if c.event_id}
        )
        assert phantom == attrs.evolve(CLEAN, phantoms=1)

    async def test_a_stream_applied_out_of_order(
        self, projected: tuple[PostgresStore, str, set[uuid.UUID]]
    ) -> None:
        store, app, ids = projected
        # The last event of acct-1 in ledger-p recorded as applied before the others.
        await store.admin.execute(
            f"UPDATE \"{app}\".applied SET id = 0 WHERE projection = 'ledger-p' "
            "AND stream_id = 'acct-1' AND stream_version = 3"
        )
        # Versions 1 and 2 each came after version 3.
        assert (await self._verify(store, app, ids)).order_violations == 2


class _FirstChoices(random.Random):
    """The writer's draws for a plain outbox transaction: its row first, no rollback, no
    seat claim, no pause."""

    def random(self) -> float:
        return 0.99

    def choice(self, seq: SupportsLenAndGetItem[T]) -> T:
        return seq[0]

    def uniform(self, a: float, b: float) -> float:
        return a


async def test_outbox_transactions_in_a_lock_cycle(harness: PostgresHarness) -> None:
    """Two outbox transactions appending accounts a and b in opposite orders, both let go at
    once by a transaction that held both accounts: each takes its first account and waits
    for the other's, and PostgreSQL aborts one. The writer records its events as rolled
    back (they must never appear) and goes on; the other commits. (A full torture run
    ended here with the deadlock's error before.)"""
    app = f"{harness.schema}_app"
    async with harness.open_store() as store:
        await store.admin.execute(app_schema_sql(harness.schema, app))
        log = WriteLog()
        orders = {"ab": ["acct-a", "acct-b"], "ba": ["acct-b", "acct-a"]}
        appends = {
            name: [
                StreamAppend(stream, [NewEvent(EVENT_TYPE, {"amount": 1}, event_id=uuid.uuid4())])
                for stream in streams
            ]
            for name, streams in orders.items()
        }
        ids = {
            name: {e.event_id for a in al for e in a.events if e.event_id}
            for name, al in appends.items()
        }

        async def waiting_for_locks() -> bool:
            waiting = await store.admin.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            return bool(waiting >= 2)

        async with trio.open_nursery() as nursery, store.transaction() as holder:
            await holder.append("acct-a", [NewEvent(EVENT_TYPE, {"amount": 0})])
            await holder.append("acct-b", [NewEvent(EVENT_TYPE, {"amount": 0})])
            for name in orders:
                nursery.start_soon(
                    _append_outbox, store, log, appends[name], ids[name], _FirstChoices(), app
                )
            await eventually(waiting_for_locks)
            # The holder committed: both go, and one of them is aborted.

        assert log.deadlocks == 1
        committed = [name for name in orders if ids[name] <= log.acknowledged]
        aborted = [name for name in orders if ids[name] <= log.rolled_back]
        assert len(committed) == len(aborted) == 1
        stored = {e.event_id for e in await read_all(store)}
        assert ids[committed[0]] <= stored
        assert not ids[aborted[0]] & stored
        await store.admin.execute(f'DROP SCHEMA "{app}" CASCADE')


def test_decision_violations_count_decisions_that_were_not_first() -> None:
    claims = [
        ("seat:1", "outbox"),
        ("seat:1", "decision"),  # after an outbox claim
        ("seat:2", "decision"),
        ("seat:2", "outbox"),
        ("seat:2", "decision"),  # a second decision on one seat
        ("seat:3", "decision"),
        ("seat:1", "outbox"),
    ]
    assert count_decision_violations(claims) == 2
    assert count_decision_violations([]) == 0


# The torture run's faults are processes, sessions and networks, alike on every supported
# version: its short runs (a dozen seconds each) run on one server, the oldest under test.
@pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
async def test_a_short_run_with_every_fault_verifies(own_server: EmbeddedPostgres) -> None:
    """Every kind of fault, server restarts included, on a server this test owns."""
    lines: list[str] = []
    report = await run_torture(
        server=own_server,
        # Long enough for three faults when a host joining takes 4-5 s and a server crash
        # 4 s to recover, as under the full suite's load (10 s once held only two).
        duration=16,
        seed=11,
        hosts=2,
        writers=2,
        stall_seconds=1.5,
        out=lines.append,
    )
    assert report.ok, "\n".join(lines + report.summary())
    assert report.events > 0
    assert len(report.faults) >= 3
    assert all(f.recovery_ms is not None for f in report.faults)
    # Decisions ran under the faults, and some of them claimed.
    assert report.events_by_path.get("decision", 0) > 0
    assert report.decisions["made"] == report.events_by_path["decision"]
    assert report.summary()[-1].startswith("VERIFIED")


class TestTortureCommand:
    @pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
    def test_json_report(self, postgres_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
        """--json prints one object with the issue's fields; progress goes to stderr."""
        code = main(
            [
                "torture",
                "--dsn",
                postgres_dsn,
                "--duration",
                "4",
                "--hosts",
                "2",
                "--writers",
                "2",
                "--seed",
                "5",
                "--faults",
                "sigkill-leader,network-drop",
                "--json",
            ]
        )
        captured = capsys.readouterr()
        assert code == EXIT_OK, captured.err
        report = json.loads(captured.out)
        for key in TORTURE_REPORT_FIELDS:
            assert key in report
        assert report["decision_violations"] == 0
        assert list(report["decisions"]) == list(DECISION_OUTCOMES)
        assert report["recovered_after_db_restart"] is None
        assert set(report["faults_by_kind"]) <= {"sigkill-leader", "network-drop"}
        assert "VERIFIED" in captured.err

    def test_unknown_fault(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["torture", "--faults", "meteor"]) == EXIT_USAGE
        assert "choose from" in capsys.readouterr().err

    def test_server_faults_need_an_owned_server(
        self, postgres_dsn: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code = main(["torture", "--dsn", postgres_dsn, "--faults", FaultKind.DB_CRASH.value])
        assert code == EXIT_USAGE
        assert "omit the DSN" in capsys.readouterr().err

    def test_bad_options(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["torture", "--hosts", "1"]) == EXIT_USAGE
        assert "at least 2" in capsys.readouterr().err


# What is tested is the command's own process handling, the same on every server version.
@pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True)
def test_ctrl_c_stops_a_run_cleanly(postgres_dsn: str) -> None:
    """SIGINT mid-run: exit 130, no traceback, no host process left behind.

    Without ``restrict_keyboard_interrupt_to_checkpoints`` the interrupt lands inside
    trio-asyncio's or asyncpg's callbacks under load and is swallowed (the run goes on), or
    ends in TrioInternalError.
    """
    argv = [sys.executable, "-m", "eventcore_trio.cli", "torture"]
    argv += ["--duration", "120", "--hosts", "2", "--faults", "sigkill-leader"]
    # Its own process group, which its host processes join: how we find them afterwards.
    process = start_interruptible(argv, start_new_session=True, env=dsn_environment(postgres_dsn))
    try:
        assert process.stdout is not None
        # Interrupt under load: once the first fault has been injected and recovered from.
        for line in process.stdout:
            if "new leader after" in line:
                break
        assert len(_group(process.pid)) >= 2, "the run and its hosts should be running"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err
    assert "interrupted" in err
    assert _group(process.pid) == []


def _group(group: int) -> list[int]:
    # Live processes of process group *group*, from /proc (field 5 of stat).
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(int(entry.name))
    return found
