"""Which units a host leads or stands by for: the pure rule every host applies to one view.

Every host publishes what it leads and what it stands by for; every host reads the same
view of the live hosts and applies the same rule, so they agree on a plan without talking
to each other (a stale view costs at most a wasted standby; locks decide who leads).

- **Targets.** With U units and H live hosts, every host leads U // H units and U % H of
  them one more. The extra ones go to the hosts that lead most now (ties by host id), so a
  spread that is as even as it can be is never disturbed: no oscillation when H does not
  divide U.
- **Hand-offs.** A host above its target hands off its surplus to hosts below theirs: the
  recipient stands by for that unit first; the holder releases it (after its batch in
  flight commits) only once the recipient says it is standing by, so the server grants
  the lock to the recipient at once.
- **Free units** (nobody holds the lock: a new projector, a host that died with no
  standby) go to hosts below their target.
- **Backups.** Every unit led by another host has one backup, the live host other than its
  leader that ranks highest for it by rendezvous hashing: the backup stands by, so when the
  leader dies the server hands the lock over at once, as before. Then the spread is evened
  out by hand-offs. A unit whose lock is held by a session no live host claims (a host on
  its way out) has a backup as well.

A host leads what its standbys are granted; it never takes a unit because a plan says so.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence

import attrs

from .._hosts import ClusterView, HostState


@attrs.frozen
class Plan:
    """What one host should do now.

    Attributes:
        wanted: units to lead or stand by for (standbys of other units should stop).
        release: units it leads and should hand off now (gracefully).
        targets: how many units each live host should lead.
    """

    wanted: frozenset[str]
    release: frozenset[str]
    targets: Mapping[str, int]


def _score(unit: str, host: str) -> bytes:
    # Rendezvous hashing: every host ranks the same way, and removing a host moves only the
    # units it ranked first.
    return hashlib.blake2b(f"{unit}\x00{host}".encode(), digest_size=8).digest()


def targets(loads: Mapping[str, int], units: int) -> dict[str, int]:
    """How many units each host should lead: even, the extra ones where they already are."""
    base, extra = divmod(units, len(loads))
    order = sorted(loads, key=lambda host: (-loads[host], host))
    return {host: base + (1 if i < extra else 0) for i, host in enumerate(order)}


def plan(view: ClusterView, me: str, units: Sequence[str]) -> Plan:
    """The plan for host *me*, which runs *units*, given *view* (which must include *me*)."""
    ours = set(units)
    # A view without this host (its registration lapsed a moment ago) still plans for it.
    hosts = {me: HostState(), **view.hosts}
    live = sorted(hosts)
    holder: dict[str, str] = {}
    for host in live:
        for unit in hosts[host].leading & ours:
            holder.setdefault(unit, host)
    loads = Counter(dict.fromkeys(live, 0))
    loads.update(holder.values())
    goal = targets(loads, len(ours))

    surplus: list[tuple[str, str]] = []
    for host in live:
        led = sorted((u for u, h in holder.items() if h == host), key=lambda u: _score(u, host))
        surplus += [(unit, host) for unit in led[goal[host] :]]
    free = sorted(u for u in ours if u not in view.held and u not in holder)
    slots = [host for host in live for _ in range(max(0, goal[host] - loads[host]))]
    # Free units fill the slots first (nobody leads them), then surplus hand-offs.
    recipient: dict[str, str] = {}
    giving = {unit for unit, _ in surplus}
    for unit, host in zip([*free, *(u for u, _ in surplus)], slots, strict=False):
        recipient[unit] = host

    wanted = {u for u, h in holder.items() if h == me}
    wanted |= {u for u, h in recipient.items() if h == me}
    # A unit whose lock is held by a session no live host owns up to (a host that is going
    # or has lost its registration, an operator's reset) gets a backup too.
    unclaimed = {u: "" for u in ours if u in view.held and u not in holder}
    for unit, leader in [*holder.items(), *unclaimed.items()]:
        if leader == me or unit in giving:
            continue
        others = [h for h in live if h != leader]
        if others and max(others, key=lambda h: _score(unit, h)) == me:
            wanted.add(unit)
    release = {
        unit
        for unit, host in surplus
        if host == me and unit in recipient and unit in hosts[recipient[unit]].standing_by
    }
    return Plan(wanted=frozenset(wanted), release=frozenset(release), targets=goal)
