"""``eventcore-trio status``: the table of every unit, and what holds readers back."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Final

from .._positions import Position
from .._progress import VersionSummary, version_summaries, versioned
from .._status import ForeignLock, LiveHost, ProjectionState, ProjectionStatus, status_json
from .._versions import VersionRole, versioned_name
from ._options import StoreOptions


def printable(value: object) -> str:
    """*value* as text that cannot steer a terminal: control characters, escape sequences
    and other unprintable characters (bidirectional overrides, line separators) are shown
    escaped, as ``\\x1b``, ``\\n``, ``\\u202e``. For text from outside this process: host
    names, queries, error messages, event data."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def lag_text(events: int, estimated: bool) -> str:
    """A lag as the status table shows it: exact as counted, an estimate as ``~1,234,000``
    (`ProjectionStatus.lag_estimated`)."""
    return f"~{events:,}" if estimated else str(events)


#: Where the status's warning about foreign lock holders sends operators.
_LOCKS_ADVICE: Final = (
    "any role that may connect to the database can take the store's advisory locks: end "
    "the session (SELECT pg_terminate_backend(PID)) and keep untrusted roles out of the "
    "store's database (docs/operations.md, 'Advisory-lock keys and untrusted roles')"
)


def status_lines(
    records: Sequence[ProjectionStatus],
    foreign: Sequence[ForeignLock] = (),
    hosts: Sequence[LiveHost] = (),
    head: Position | None = None,
) -> list[str]:
    """The table `eventcore-trio status` prints, with every foreign string made printable.

    *foreign*: sessions from outside the store on its own locks, when no record says (a
    store where no projection has run). *hosts*: the live balancing hosts, one line for
    all of them, idle ones too. *head*: the store's last position, for the progress of a
    version that builds. A projection with several versions (or one above 1) gets a line
    per version (which serves, which builds and how far) above that version's units."""
    p = printable
    summaries = version_summaries(records, head)
    shown_versions = versioned(summaries)
    by_version = {(s.name, s.version): s for s in summaries}
    # A projection's versions one after the other, each with its units in the usual order.
    records = sorted(records, key=lambda r: (r.name, r.version, r.partitions, r.partition or 0))
    versions_shown: set[tuple[str, int]] = set()
    lines = [
        f"{'projection':24} {'state':8} {'leader':22} {'checkpoint':18} "
        f"{'lag':>8} {'lag s':>7} {'dead':>5}"
    ]
    shown: set[tuple[str, int, int]] = set()
    for r in records:
        name = p(r.name)
        if r.name in shown_versions:
            name = p(versioned_name(r.name, r.version))
            summary = by_version.get((r.name, r.version))
            if summary is not None and (r.name, r.version) not in versions_shown:
                versions_shown.add((r.name, r.version))
                lines.append(version_line(summary))
        if r.partition is not None and (r.name, r.version, r.partitions) not in shown:
            # A partitioned projection: one summary line, then its partitions under it (per
            # partition count: during a change of count, the new count's units are listed
            # too, awaiting the split).
            units = [
                u
                for u in records
                if (u.name, u.version, u.partitions) == (r.name, r.version, r.partitions)
            ]
            led = sum(1 for u in units if u.leader is not None)
            total_lag = lag_text(
                sum(u.lag_events for u in units), any(u.lag_estimated for u in units)
            )
            lines.append(
                f"{name:24} {f'{led}/{r.partitions} led':>8} {'':22} {'':18} "
                f"{total_lag:>8} "
                f"{max(u.lag_seconds for u in units):>7.1f} "
                f"{sum(u.dead_letters for u in units):>5}"
            )
        shown.add((r.name, r.version, r.partitions))
        leader = "-" if r.leader is None else f"{r.leader.pid}@{p(r.leader.host)}"
        label = name if r.partition is None else f"  [{r.partition}/{r.partitions}]"
        lines.append(
            f"{label:24} {r.state.value:8} {leader:22} {r.checkpoint or '-'!s:18} "
            f"{lag_text(r.lag_events, r.lag_estimated):>8} {r.lag_seconds:>7.1f} "
            f"{r.dead_letters:>5}"
        )
        if r.last_error:
            lines.append(f"    last error: {p(r.last_error)}")
        if r.state is ProjectionState.AWAITING_SPLIT:
            lines.append(
                f"    runs once no unit of {p(r.name)}'s recorded partition count runs "
                "(hosts running the old count lead those meanwhile)"
            )
        if r.unrunnable and r.state is not ProjectionState.SUPERSEDED:
            # A superseded unit is meant to stop: no host needs to run it.
            lacking = ", ".join(f"{h.pid}@{p(h.host)}" for h in r.lacking_hosts)
            lines.append(f"    no live host runs it (lacking: {lacking})")
        for lock in r.foreign_locks:
            if lock.unit is not None:
                lines.append(f"    WARNING: {p(lock.describe())}")
    if not records:
        lines.append("(no projection has run against this store)")
    if hosts:
        lines.append("live hosts: " + ", ".join(_host_summary(host) for host in hosts))
    per_host = Counter(
        f"{r.leader.pid}@{p(r.leader.host)}" for r in records if r.leader is not None
    )
    if per_host:
        lines.append(
            "units led per host: " + ", ".join(f"{h} {n}" for h, n in sorted(per_host.items()))
        )
    held = records[0].held_back_by if records else None
    if held is not None:
        lines.append(
            f"reads held back by transaction of pid {held.pid} ({held.application_name!r}, "
            f"{p(held.state)}, since {held.started_at}): {p(held.query)}"
        )
    # Every record has the store-wide ones: print them once.
    store_wide = [f for f in (records[0].foreign_locks if records else foreign) if f.unit is None]
    for lock in store_wide:
        lines.append(f"WARNING: {p(lock.describe())}")
    if store_wide or any(lock.unit is not None for r in records for lock in r.foreign_locks):
        lines.append(f"WARNING: {_LOCKS_ADVICE}")
    return lines


def version_line(summary: VersionSummary) -> str:
    """The line above a version's units: its role and, while it builds, its progress."""
    head = f"version {summary.version} of {printable(summary.name)}:"
    role = summary.role
    if role is VersionRole.SERVING:
        return f"{head} SERVING (readers use its read model)"
    if role is VersionRole.BUILDING:
        lag = lag_text(summary.lag_events, summary.lag_estimated)
        done = 0.0 if summary.progress is None else summary.progress
        return (
            f"{head} building, {done:.1%} of the event log applied ({lag} events to go); "
            "serves once caught up"
        )
    if role is VersionRole.SUPERSEDED:
        why = "a higher version serves"
    else:
        why = "an operator switched back below it"
    return (
        f"{head} {role.value} ({why}; it stops, its read model stays until "
        f"`eventcore-trio retire {printable(summary.name)} {summary.version}`)"
    )


def _host_summary(host: LiveHost) -> str:
    # "4242@web-1 (leads 2, stands by 1)", or "(idle)": what the balancer sees of it.
    doing = [
        f"{verb} {len(units)}"
        for verb, units in (("leads", host.state.leading), ("stands by", host.state.standing_by))
        if units
    ]
    return f"{host.process.pid}@{printable(host.process.host)} ({', '.join(doing) or 'idle'})"


async def status(options: StoreOptions, as_json: bool) -> None:
    # Once, first: which store this is (with --json on stderr, so stdout stays JSON).
    print(options.describe(), file=sys.stderr if as_json else sys.stdout, flush=True)
    async with options.open() as store:
        records = await store.projection_status()
        hosts = await store.live_hosts()
        head = await store.last_position()
        # Each record carries them; without records, they are asked for alone.
        foreign = () if records else await store.admin.foreign_locks()
    if as_json:
        # json.dumps escapes control characters itself.
        print(json.dumps([status_json(r) for r in records], indent=2))
        return
    for line in status_lines(records, foreign, hosts, head):
        print(line)
