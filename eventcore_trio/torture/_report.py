"""What a torture run found: the faults it injected and the verification's counts."""

from __future__ import annotations

import enum
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, final

import attrs


class FaultKind(enum.Enum):
    """The faults a torture run injects.

    .. versionadded:: 0.1
    """

    #: SIGKILL the host process that leads the projection (a crash).
    SIGKILL_LEADER = "sigkill-leader"
    #: SIGTERM the leading host process (a graceful shutdown, as in a deploy).
    SIGTERM_LEADER = "sigterm-leader"
    #: ``pg_terminate_backend`` of the session that holds the projection's lock.
    TERMINATE_LOCK_SESSION = "terminate-lock-session"
    #: ``pg_terminate_backend`` of every pooled and listening session of hosts and writers.
    TERMINATE_POOL_SESSIONS = "terminate-pool-sessions"
    #: Reset every connection between the leading host and the server at once.
    NETWORK_DROP = "network-drop"
    #: Cut the leading host off (no bytes either way, new connections hang), then reset.
    NETWORK_STALL = "network-stall"
    #: Restart the server with a fast shutdown (only when the run owns the server).
    DB_RESTART = "db-restart"
    #: Stop the server with an immediate shutdown, a crash as far as the data goes, and
    #: start it again: it recovers from its WAL (only when the run owns the server).
    DB_CRASH = "db-crash"
    #: Start one more host process: the hosts spread the units anew (hand-offs).
    #:
    #: .. versionadded:: 0.2
    HOST_JOIN = "host-join"
    #: Stop a host process for good with SIGTERM (a scale-in), while at least two remain.
    #:
    #: .. versionadded:: 0.2
    HOST_LEAVE = "host-leave"
    #: For a moment, the NOTIFY that follows each of the writers' appends fails on the
    #: server after the append committed (`PostgresAdmin.failing_notifications`).
    #:
    #: .. versionadded:: 0.3
    NOTIFY_FAILURE = "notify-failure"


#: The outcomes of the writers' decisions (`TortureReport.decisions`): the claim committed;
#: the read found the seat claimed; the condition failed (the seat was claimed between the
#: read and the append); the session went mid-append (the claim may or may not have
#: committed).
DECISION_OUTCOMES = ("made", "refused", "condition_failed", "cut_off")

#: Faults after which another session takes the lock: these give the failover figures.
LEADER_FAULTS = frozenset(
    {
        FaultKind.SIGKILL_LEADER,
        FaultKind.SIGTERM_LEADER,
        FaultKind.TERMINATE_LOCK_SESSION,
        FaultKind.NETWORK_DROP,
    }
)
DB_FAULTS = frozenset({FaultKind.DB_RESTART, FaultKind.DB_CRASH})


@final
@attrs.frozen(kw_only=True)
class FaultRecord:
    """One injected fault and how the system came back from it.

    Attributes:
        kind: what was done.
        at: seconds since the run started.
        target: what it was done to, for people ("host-2 (pid 4242)", "the server").
        outage_ms: how long the fault itself lasted (a stall, a server restart); 0 for
            instant faults.
        failover_ms: from the fault to another session holding the projection's lock, for
            faults that end the leader's session; None otherwise.
        recovery_ms: from the end of the fault to the projection applying an event appended
            after it; None if it did not recover within the run's limit.

    .. versionadded:: 0.1
    """

    kind: FaultKind
    at: float
    target: str
    outage_ms: float = 0.0
    failover_ms: float | None = None
    recovery_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        """This record as JSON-ready values."""
        return {
            "kind": self.kind.value,
            "at": round(self.at, 3),
            "target": self.target,
            "outage_ms": round(self.outage_ms, 1),
            "failover_ms": _round(self.failover_ms),
            "recovery_ms": _round(self.recovery_ms),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The *q*-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]


@attrs.frozen(kw_only=True)
class Findings:
    """What the verification counted; see `TortureReport` for the meaning of each."""

    events: int
    lost: int
    duplicated: int
    phantoms: int
    checkpoint_regressions: int
    double_leaders: int
    ledger_mismatches: int
    order_violations: int = 0
    reactions_missing: int = 0
    reactions_repeated: int = 0
    outbox_mismatches: int = 0
    follower_missed: int = 0
    follower_repeated: int = 0
    decision_violations: int = 0


@final
@attrs.frozen(kw_only=True)
class TortureReport(Findings):
    """The outcome of `run_torture`: what was done, and what the verification found.

    `ok` is True only when every safety count is zero and every fault was recovered from.

    Attributes:
        seed: the seed that chose the writers' choices and the fault schedule.
        duration_s: how long faults were injected, in seconds.
        server: the server's version string.
        events: events in the log that each projection had to apply.
        appended: events the writers were told had committed (markers included).
        rolled_back: events whose transactions were rolled back or never committed (they
            must not appear).
        unknown_outcome: appends cut off mid-commit, which may or may not have committed.
        faults: every fault injected, in order.
        lost: events acknowledged to a writer but missing from the log, plus events in the
            log the projection never applied.
        duplicated: extra applications of events applied more than once.
        phantoms: events of rolled-back transactions that appear in the log.
        checkpoint_regressions: times a checkpoint was saved behind the previous one.
        double_leaders: pairs of committed batches from different lock sessions whose
            transactions overlapped in time.
        ledger_mismatches: accounts whose projected total differs from a fold of the log.
        order_violations: events applied after a later event of the same stream (each
            stream's events must be applied in order, in a partitioned projection too).
        reactions_missing: postings the reactor projection should have reacted to (with
            ``ctx.append``, after writing through ``ctx.db``) and did not.
        reactions_repeated: reactions beyond one per such posting.
        outbox_mismatches: outbox transactions whose own row and events did not commit
            together.
        follower_missed: events in the log that an independent follower paging
            ``read_events`` from its own cursor was never given (a skipped event).
        follower_repeated: events that follower was given more than once.
        decision_violations: seat claims made by a decision (a conditional append over the
            seat's claims) that follow another claim of the same seat in the global order:
            two overlapping decisions that both succeeded, or a decision that missed a claim
            written before it (an outbox transaction's, say).
        events_by_path: events acknowledged per write path (``append``, ``append_atomic``,
            ``held``, ``outbox``, ``outbox_claim`` for the seat claims of outbox
            transactions, ``decision``, plus the recovery markers) and appended by the
            reactor (``reactor``).
        decisions: decisions per outcome: ``made`` (the claim committed), ``refused`` (the
            read found the seat claimed), ``condition_failed`` (`AppendConditionFailed`:
            claimed between the read and the append), ``cut_off`` (the session went
            mid-append: unknown outcome).
        deadlocks: outbox transactions PostgreSQL aborted to break a lock cycle (two of
            them appending the same accounts in opposite orders); their events are counted
            in *rolled_back* and must not appear.
        host_crashes: host processes that exited without being told to.
        unrecovered: faults after which the projection did not resume within the limit.

    .. versionadded:: 0.1
    .. versionchanged:: 0.4
       ``decision_violations``, ``decisions`` and ``deadlocks``.
    """

    seed: int
    duration_s: float
    server: str
    appended: int
    rolled_back: int
    unknown_outcome: int
    faults: tuple[FaultRecord, ...]
    host_crashes: int
    unrecovered: int
    events_by_path: Mapping[str, int] = attrs.field(factory=dict)
    decisions: Mapping[str, int] = attrs.field(factory=dict)
    deadlocks: int = 0

    @property
    def ok(self) -> bool:
        """True when nothing was lost, duplicated or regressed and every fault recovered."""
        counts = [f.name for f in attrs.fields(Findings) if f.name != "events"]
        return not any(getattr(self, name) for name in [*counts, "host_crashes", "unrecovered"])

    @property
    def failover_ms(self) -> list[float]:
        """Failover times of the faults that end the leader's session, in order."""
        return [
            f.failover_ms
            for f in self.faults
            if f.kind in LEADER_FAULTS and f.failover_ms is not None
        ]

    @property
    def db_restart_recovery_ms(self) -> list[float]:
        """Per server restart or crash: from the server being back to the projection resuming."""
        return [f.recovery_ms for f in self.faults if f.kind in DB_FAULTS and f.recovery_ms]

    @property
    def recovered_after_db_restart(self) -> bool | None:
        """True if the projection resumed after every server restart; None if there was none."""
        restarts = [f for f in self.faults if f.kind in DB_FAULTS]
        if not restarts:
            return None
        return all(f.recovery_ms is not None for f in restarts)

    def to_json(self) -> dict[str, Any]:
        """The report as one JSON-ready object (the shape of ``torture --json``)."""
        counts = Counter(f.kind.value for f in self.faults)
        recovery = [f.recovery_ms for f in self.faults if f.recovery_ms is not None]
        return {
            "ok": self.ok,
            "seed": self.seed,
            "duration_s": round(self.duration_s, 1),
            "server": self.server,
            "events": self.events,
            "appended": self.appended,
            "rolled_back": self.rolled_back,
            "unknown_outcome": self.unknown_outcome,
            "faults": len(self.faults),
            "faults_by_kind": dict(sorted(counts.items())),
            "lost": self.lost,
            "duplicated": self.duplicated,
            "phantoms": self.phantoms,
            "checkpoint_regressions": self.checkpoint_regressions,
            "double_leaders": self.double_leaders,
            "ledger_mismatches": self.ledger_mismatches,
            "order_violations": self.order_violations,
            "reactions_missing": self.reactions_missing,
            "reactions_repeated": self.reactions_repeated,
            "outbox_mismatches": self.outbox_mismatches,
            "follower_missed": self.follower_missed,
            "follower_repeated": self.follower_repeated,
            "decision_violations": self.decision_violations,
            "events_by_path": dict(sorted(self.events_by_path.items())),
            "decisions": {o: self.decisions.get(o, 0) for o in DECISION_OUTCOMES},
            "deadlocks": self.deadlocks,
            "host_crashes": self.host_crashes,
            "unrecovered": self.unrecovered,
            "failover_ms_p50": _round(percentile(self.failover_ms, 50)),
            "failover_ms_p99": _round(percentile(self.failover_ms, 99)),
            "recovery_ms_p50": _round(percentile(recovery, 50)),
            "recovery_ms_p99": _round(percentile(recovery, 99)),
            "recovered_after_db_restart": self.recovered_after_db_restart,
            "db_restart_recovery_ms_max": _round(max(self.db_restart_recovery_ms, default=None)),
            "fault_log": [f.to_json() for f in self.faults],
        }

    def summary(self) -> list[str]:
        """The report for people: a few lines, the verdict last."""
        data = self.to_json()
        kinds = ", ".join(f"{n} {k}" for k, n in data["faults_by_kind"].items())
        lines = [
            f"{self.events} events projected ({self.appended} acknowledged to writers, "
            f"{self.rolled_back} rolled back ({self.deadlocks} outbox transactions aborted "
            f"as deadlocks), {self.unknown_outcome} appends cut off mid-commit) "
            f"on {self.server}",
            f"{len(self.faults)} faults in {self.duration_s:.0f}s (seed {self.seed}): {kinds}",
            "events by write path: "
            + (", ".join(f"{n} {path}" for path, n in data["events_by_path"].items()) or "-"),
            "decisions: " + ", ".join(f"{n} {o}" for o, n in data["decisions"].items()),
            f"failover p50 {_ms(data['failover_ms_p50'])}, p99 {_ms(data['failover_ms_p99'])}; "
            f"recovery p50 {_ms(data['recovery_ms_p50'])}, p99 {_ms(data['recovery_ms_p99'])}",
        ]
        if self.recovered_after_db_restart is not None:
            lines.append(
                "recovered after every server restart: "
                f"{'yes' if self.recovered_after_db_restart else 'NO'} (slowest "
                f"{_ms(data['db_restart_recovery_ms_max'])} after the server was back)"
            )
        checks = {
            "lost": self.lost,
            "duplicated": self.duplicated,
            "phantoms": self.phantoms,
            "checkpoint regressions": self.checkpoint_regressions,
            "double leaders": self.double_leaders,
            "ledger mismatches": self.ledger_mismatches,
            "order violations": self.order_violations,
            "reactions missing": self.reactions_missing,
            "reactions repeated": self.reactions_repeated,
            "outbox mismatches": self.outbox_mismatches,
            "missed by the follower": self.follower_missed,
            "repeated to the follower": self.follower_repeated,
            "decision violations": self.decision_violations,
            "host crashes": self.host_crashes,
            "unrecovered faults": self.unrecovered,
        }
        lines.append(", ".join(f"{name} {count}" for name, count in checks.items()))
        lines.append(
            "VERIFIED: nothing lost, nothing applied twice, no checkpoint moved back, never two "
            "leaders, every decision saw the claims before it"
            if self.ok
            else "FAILED: " + ", ".join(name for name, count in checks.items() if count)
        )
        return lines


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"
