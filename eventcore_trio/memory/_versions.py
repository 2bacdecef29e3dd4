"""Projection versions: which version of each projection serves, switching, retiring.

The same rules as PostgreSQL's (`eventcore_trio._versions`): the first version asked about
serves at once; a building version takes over once every unit of it has caught up, checked
and recorded in one synchronous step (atomic here, as between two Trio checkpoints one task
runs alone); a switch by hand withdraws the versions above the new serving one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from .._errors import InvalidArgument, ProjectionNotFound, ProjectionRunning
from .._filters import EventFilter
from .._partitions import Unit
from .._versions import VersionRole, VersionSwitch, role_of, split_versioned, versioned_name
from ._leadership import wait_lead
from ._reads import first_after
from ._state import MemoryState, now


def role(state: MemoryState, name: str, version: int) -> VersionRole:
    """*version*'s role, making it serve when no version of *name* does yet."""
    if name not in state.serving:
        _switch(state, name, version, "first")
    return role_of(version, state.serving[name], frozenset(state.withdrawn.get(name, ())))


def switch_if_caught_up(
    state: MemoryState, name: str, version: int, units: Sequence[tuple[str, EventFilter]]
) -> VersionRole:
    """Make *version* serve if it builds and every one of *units* has caught up."""
    current = role(state, name, version)
    if current is not VersionRole.BUILDING:
        return current
    for unit, unit_filter in units:
        checkpoint = state.checkpoints.get(unit)
        if checkpoint is not None and state.ahead(checkpoint):
            return current  # a checkpoint past the store is not caught up: it skips events
        if any(
            unit_filter.matches(e.stream_id, e.type, e.tags)
            for e in state.log[first_after(state, checkpoint) :]
        ):
            return current
    _switch(state, name, version, "caught-up", units=[unit for unit, _ in units])
    return VersionRole.SERVING


def serve(state: MemoryState, name: str, version: int) -> None:
    """An operator's switch to *version*, withdrawing every known version above it."""
    if not _has_run(state, name, version):
        raise ProjectionNotFound(
            f"version {version} of projection {name!r} has not run against this store, or "
            "was retired"
        )
    if state.serving.get(name) == version:
        return
    withdrawn = state.withdrawn.setdefault(name, set())
    withdrawn.discard(version)
    withdrawn.update(v for v in _versions(state, name) if v > version)
    _switch(state, name, version, "manual", units=_units(state, versioned_name(name, version)))


async def retire(state: MemoryState, name: str, version: int, *, wait: bool) -> None:
    """Drop *version*'s checkpoints, dead letters and partition count (it must not serve)."""
    if state.serving.get(name) == version:
        raise InvalidArgument(
            f"version {version} of projection {name!r} serves reads; switch to another "
            "version first (serve_version), then retire it"
        )
    if not _has_run(state, name, version):
        raise ProjectionNotFound(
            f"version {version} of projection {name!r} has not run against this store, or "
            "was retired"
        )
    projection = versioned_name(name, version)
    units = _units(state, projection)
    if not wait and any(unit in state.leaders for unit in units):
        raise ProjectionRunning(projection)
    async with contextlib.AsyncExitStack() as stack:
        for unit in sorted(units):
            await stack.enter_async_context(wait_lead(state, unit, state.reset_waiting))
        for unit in _units(state, projection):
            state.checkpoints.pop(unit, None)
            state.dead_letters.pop(unit, None)
            state.projections.pop(unit, None)
        state.partitions.pop(projection, None)
    # Withdrawn for good: a host that still has it never runs it again, and it never takes
    # over on its own.
    state.withdrawn.setdefault(name, set()).add(version)


def switches(state: MemoryState, name: str) -> list[VersionSwitch]:
    """*name*'s switches, oldest first."""
    return [s for s in state.switches if s.name == name]


def _switch(
    state: MemoryState, name: str, version: int, reason: str, *, units: Sequence[str] = ()
) -> None:
    reached = [state.checkpoints[u] for u in units if u in state.checkpoints]
    state.switches.append(
        VersionSwitch(
            name=name,
            from_version=state.serving.get(name),
            to_version=version,
            position=max(reached, default=None),
            switched_at=now(),
            reason=reason,
        )
    )
    state.serving[name] = version
    state.versions_changed()


def _units(state: MemoryState, projection: str) -> list[str]:
    # Every unit of *projection* with anything recorded, of any partition count.
    known = state.checkpoints.keys() | state.projections.keys() | state.dead_letters.keys()
    return sorted(u for u in known if Unit.parse(u).projection == projection)


def _versions(state: MemoryState, name: str) -> set[int]:
    known = state.checkpoints.keys() | state.projections.keys() | state.partitions.keys()
    return {
        version
        for base, version in (split_versioned(Unit.parse(u).projection) for u in known)
        if base == name
    } | {s.to_version for s in switches(state, name)}


def _has_run(state: MemoryState, name: str, version: int) -> bool:
    projection = versioned_name(name, version)
    return bool(_units(state, projection)) or projection in state.partitions
