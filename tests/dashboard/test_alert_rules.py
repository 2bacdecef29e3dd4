"""The alert rules shipped in deploy/prometheus/: valid for Prometheus, unit-tested with
``promtool test rules``, and over metrics the dashboard actually serves."""

from __future__ import annotations

import datetime as dt
import re
import subprocess

from eventcore_trio import LeaderInfo, ProjectionState, ProjectionStatus
from eventcore_trio.dashboard import prometheus_text

from .promtool import RULES_DIR, check_metrics, promtool

RULES = RULES_DIR / "eventcore-alerts.yml"
RULE_TESTS = RULES_DIR / "eventcore-alerts.test.yml"


def _unit(name: str, *, running: bool = True) -> ProjectionStatus:
    leader = LeaderInfo(pid=41, host="web-1", application_name="eventcore host")
    return ProjectionStatus(
        name=name,
        checkpoint=None,
        lag_events=3,
        lag_seconds=1.5,
        leader=leader if running else None,
        standbys=1,
        state=ProjectionState.RUNNING if running else ProjectionState.FAILED,
        last_error=None if running else "boom",
        updated_at=dt.datetime.now(dt.UTC),
        dead_letters=2,
        runnable_by=2,
    )


def _promtool(*args: str) -> str:
    result = subprocess.run(
        [promtool(), *args], cwd=RULES_DIR, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_rules_load_in_prometheus() -> None:
    """``promtool check rules`` accepts the file: every expression parses."""
    assert "SUCCESS: 6 rules found" in _promtool("check", "rules", RULES.name)


def test_the_rules_fire_when_they_should_and_only_then() -> None:
    """``promtool test rules``: each alert fires after its ``for:``, not before; nothing
    fires on a healthy unit, or on a unit's last values while the store is down."""
    assert "SUCCESS" in _promtool("test", "rules", RULE_TESTS.name)


def test_the_rules_name_only_metrics_the_dashboard_serves() -> None:
    """Every ``eventcore_*`` series a rule reads is one /metrics serves (a renamed metric
    would otherwise silence its alert)."""
    served = {
        line.split()[2]
        for line in prometheus_text([_unit("ledger")], status_age=0.5).decode().splitlines()
        if line.startswith("# TYPE ")
    }
    text = "\n".join(
        line for line in RULES.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    read = set(re.findall(r"\beventcore_\w+", text))
    assert read, "no rule reads an eventcore metric"
    assert read <= served, read - served
    assert set(re.findall(r"^\s*- alert: (\w+)$", text, re.MULTILINE)) == {
        "EventcoreMetricsAbsent",
        "EventcoreStoreUnreachable",
        "EventcoreProjectionNotRunning",
        "EventcoreProjectionLagging",
        "EventcoreDeadLetters",
        "EventcoreUnitUnrunnable",
    }


def test_metrics_pass_promtool_lint_up_and_down() -> None:
    """The exposition, with the store up and with it down, passes ``promtool check
    metrics`` (the live endpoint is linted in tests/postgres/test_dashboard.py)."""
    check_metrics(prometheus_text([_unit("ledger"), _unit("audit", running=False)], status_age=1))
    check_metrics(prometheus_text([_unit("ledger")], store_up=False, status_age=42.0))
