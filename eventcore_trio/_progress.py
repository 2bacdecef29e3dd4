"""Projection versions as operators see them: which serves, which builds and how far it got.

One rule for ``eventcore-trio status``, ``eventcore-trio versions``, the dashboard and
``/metrics``, computed from a `projection_status` read and the store's head alone, so that it
costs no query of its own per unit.

A rebuild's progress is how far through the event log the version has read: each unit's
checkpoint against the head, in the store's order of events (the units of a version averaged).
With matching events spread evenly over the log this is the share of its events applied, the
same assumption the estimated lag makes (`ProjectionStatus.lag_estimated`); a unit that has
caught up is at 100 %, one that has applied nothing at 0 %.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, final

import attrs

from ._positions import Position, position_parts
from ._status import ProjectionState, ProjectionStatus
from ._versions import VersionRole

#: The progress shown while a unit still lags: never 100 % before it has caught up.
_ALMOST: Final = 0.999


@final
@attrs.frozen(kw_only=True)
class VersionSummary:
    """One version of a projection: its role, units, lag and (building) rebuild progress."""

    name: str
    version: int
    role: VersionRole
    units: int
    lag_events: int
    lag_estimated: bool
    #: Share of the event log read, 0 to 1, for a building version; None for the others.
    progress: float | None


def unit_progress(record: ProjectionStatus, head: Position | None) -> float:
    """How far through the log *record*'s unit has read: 0 to 1 (see the module)."""
    if record.lag_events == 0 and record.checkpoint is not None:
        return 1.0
    if record.checkpoint is None or head is None:
        return 0.0
    _, read = position_parts(record.checkpoint)
    _, last = position_parts(head)
    if last <= 0:
        return 0.0
    # Still lagging: under 100 % even where the checkpoint's place rounds up to it.
    return min(_ALMOST, max(0.0, read / last))


def _role(units: Sequence[ProjectionStatus], serving: int | None) -> VersionRole:
    if any(r.serving for r in units):
        return VersionRole.SERVING
    if all(r.state is ProjectionState.SUPERSEDED for r in units):
        # Superseded below the serving version; above it, an operator switched back.
        below = serving is not None and units[0].version < serving
        return VersionRole.SUPERSEDED if below else VersionRole.WITHDRAWN
    return VersionRole.BUILDING


def version_summaries(
    records: Iterable[ProjectionStatus], head: Position | None
) -> list[VersionSummary]:
    """Every version of every projection in *records*, by name then version; *head* is the
    store's last position (`EventReader.last_position`), for the progress of building
    versions."""
    by_version: dict[tuple[str, int], list[ProjectionStatus]] = {}
    for record in records:
        if record.state is ProjectionState.AWAITING_SPLIT:
            continue  # a partition count not yet in force: its units do not apply yet
        by_version.setdefault((record.name, record.version), []).append(record)
    serving = {
        name: version
        for (name, version), units in by_version.items()
        if any(u.serving for u in units)
    }
    result = []
    for (name, version), units in sorted(by_version.items()):
        role = _role(units, serving.get(name))
        progress = None
        if role is VersionRole.BUILDING:
            progress = sum(unit_progress(u, head) for u in units) / len(units)
        result.append(
            VersionSummary(
                name=name,
                version=version,
                role=role,
                units=len(units),
                lag_events=sum(u.lag_events for u in units),
                lag_estimated=any(u.lag_estimated for u in units),
                progress=progress,
            )
        )
    return result


def versioned(summaries: Iterable[VersionSummary]) -> set[str]:
    """The projections whose versions are worth showing: more than one, or one above 1."""
    counts: dict[str, int] = {}
    for summary in summaries:
        counts[summary.name] = counts.get(summary.name, 0) + (1 if summary.version == 1 else 2)
    return {name for name, count in counts.items() if count > 1}
