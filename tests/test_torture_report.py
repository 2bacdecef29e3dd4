"""The torture run's pure parts: overlap detection, percentiles, the report's verdict."""

from __future__ import annotations

import datetime as dt
from typing import Any

import attrs
import pytest

from eventcore_trio import ConfigurationError
from eventcore_trio.torture import FaultKind, FaultRecord, TortureReport
from eventcore_trio.torture._proxy import rewrite_dsn, server_address
from eventcore_trio.torture._report import percentile
from eventcore_trio.torture._verify import Batch, count_overlaps

from .helpers import TORTURE_REPORT_FIELDS, clean_findings

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _at(ms: int) -> dt.datetime:
    return T0 + dt.timedelta(milliseconds=ms)


class TestOverlaps:
    def test_one_session_after_another_is_no_overlap(self) -> None:
        batches = [
            Batch(1, _at(0), _at(10)),
            Batch(1, _at(10), _at(20)),
            Batch(2, _at(25), _at(30)),
        ]
        assert count_overlaps(batches) == 0

    def test_a_batch_of_another_session_inside_a_batch_is_an_overlap(self) -> None:
        batches = [Batch(1, _at(0), _at(100)), Batch(2, _at(50), _at(60))]
        assert count_overlaps(batches) == 1

    def test_overlap_with_an_earlier_long_batch_is_found_past_short_ones(self) -> None:
        # Session 1's long batch spans session 2's start even though a short batch of
        # session 1 sorts in between.
        batches = [Batch(1, _at(0), _at(100)), Batch(1, _at(5), _at(6)), Batch(2, _at(50), _at(60))]
        assert count_overlaps(batches) == 1

    def test_order_of_input_does_not_matter(self) -> None:
        batches = [Batch(2, _at(50), _at(60)), Batch(1, _at(0), _at(100))]
        assert count_overlaps(batches) == 1


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0
    values = [float(v) for v in range(1, 101)]
    p99 = percentile(values, 99)
    assert p99 is not None
    assert 98.0 < p99 <= 100.0


def _report(**changes: Any) -> TortureReport:
    base = TortureReport(
        seed=1,
        duration_s=10.0,
        server="PostgreSQL 16",
        appended=100,
        rolled_back=5,
        unknown_outcome=0,
        faults=(
            FaultRecord(
                kind=FaultKind.SIGKILL_LEADER,
                at=1.0,
                target="h",
                failover_ms=12.0,
                recovery_ms=50.0,
            ),
            FaultRecord(
                kind=FaultKind.DB_RESTART, at=2.0, target="s", outage_ms=200.0, recovery_ms=90.0
            ),
        ),
        host_crashes=0,
        unrecovered=0,
        **attrs.asdict(clean_findings(100)),
    )
    return attrs.evolve(base, **changes)


def test_a_clean_report_is_ok_and_has_the_issue_fields() -> None:
    report = _report()
    data = report.to_json()
    assert report.ok
    assert data["ok"] is True
    for key in TORTURE_REPORT_FIELDS:
        assert key in data
    assert data["faults"] == 2
    assert data["failover_ms_p50"] == 12.0
    assert data["recovered_after_db_restart"] is True
    assert report.summary()[-1].startswith("VERIFIED")


@pytest.mark.parametrize(
    "field",
    [
        "lost",
        "duplicated",
        "phantoms",
        "checkpoint_regressions",
        "double_leaders",
        "ledger_mismatches",
        "order_violations",
        "reactions_missing",
        "reactions_repeated",
        "outbox_mismatches",
        "follower_missed",
        "follower_repeated",
        "decision_violations",
        "host_crashes",
        "unrecovered",
    ],
)
def test_any_nonzero_safety_count_fails_the_report(field: str) -> None:
    report = _report(**{field: 1})
    assert not report.ok
    assert report.to_json()["ok"] is False
    assert report.summary()[-1].startswith("FAILED")


def test_a_restart_without_recovery_is_reported() -> None:
    fault = FaultRecord(kind=FaultKind.DB_CRASH, at=1.0, target="s", recovery_ms=None)
    report = _report(faults=(fault,), unrecovered=1)
    assert report.recovered_after_db_restart is False
    assert not report.ok


def test_no_restart_means_no_verdict_on_restarts() -> None:
    fault = FaultRecord(
        kind=FaultKind.NETWORK_DROP, at=1.0, target="h", failover_ms=5.0, recovery_ms=9.0
    )
    assert _report(faults=(fault,)).recovered_after_db_restart is None


class TestDsnRewriting:
    def test_url(self) -> None:
        dsn = "postgresql://app:secret@db.example:6543/shop?sslmode=disable"
        assert server_address(dsn).host == "db.example"
        assert server_address(dsn).port == 6543
        assert (
            rewrite_dsn(dsn, 7000) == "postgresql://app:secret@127.0.0.1:7000/shop?sslmode=disable"
        )

    def test_url_with_host_in_query(self) -> None:
        dsn = "postgresql:///shop?host=/var/run/postgresql&port=5433"
        address = server_address(dsn)
        assert address.is_unix
        assert address.port == 5433
        assert rewrite_dsn(dsn, 7000) == "postgresql://127.0.0.1:7000/shop"

    def test_keywords(self) -> None:
        dsn = "host=db port=6000 dbname='my db' user=app"
        assert server_address(dsn).host == "db"
        assert rewrite_dsn(dsn, 7000) == "dbname='my db' user=app host=127.0.0.1 port=7000"

    def test_defaults_are_libpqs(self) -> None:
        address = server_address("dbname=shop")
        assert (address.host, address.port) == ("/var/run/postgresql", 5432)

    def test_several_hosts_are_refused(self) -> None:
        with pytest.raises(ConfigurationError, match="several hosts"):
            server_address("host=a,b port=5432")
