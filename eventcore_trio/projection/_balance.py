"""Which units a host leads or stands by for: the pure rule every host applies to one view.

Every host says which units it can run (when it registers) and publishes what it leads and
what it stands by for; every host reads the same view of the live hosts and applies the same
rule to all of it, so they agree on one plan without talking to each other (a stale view
costs at most a wasted standby; locks decide who leads). Hosts may run different sets (two
services sharing a schema, a rolling deploy that adds a projector): each unit is planned only
over the live hosts that can run it, and every unit some live host can run is planned. A
planned unit is led once the host it goes to is granted its lock; during a change of
partition count, units of the new count are held but apply nothing until the split, which
never takes a lock from the hosts of the old count (docs/scale-out.md, "Changing the
partition count").

- **Assignment.** Each unit goes to one live host that can run it. Led units start where
  they are; units nobody leads go, one at a time in name order, to the least loaded host
  that can run them. Then, while some host leads at least two more than a host it can reach
  by a chain of hand-offs (it hands a unit to a host that can run it, which hands one on to
  the next, and so on), the chain is applied. What is left has no such chain, which makes it
  as even as the sets allow: no assignment has a lower maximum or a lower sum of squares
  (the optimality condition of semi-matchings, Harvey, Ladner, Lovász and Tamir, 2006).
  When every host runs the same units every chain is one hand-off, and the result is the
  familiar one: U // H units each and U % H hosts one more.
- **Stability.** Ties go to the hosts that lead most now (then by host id): a spread that
  is as even as the sets allow has no chain and is never disturbed, so no oscillation.
  Which unit a host hands off is chosen by rendezvous hashing; a unit nobody leads goes to
  the host the assignment put it on, without a hand-off.
- **Hand-offs.** The recipient stands by for the unit first; the holder releases it (after
  its batch in flight commits) only once the recipient says it is standing by, so the
  server grants the lock at once to the recipient, unless another session queued for it
  earlier (an operator's waiting reset, or a backup not yet told to stop standing by: the
  next round then plans the unit where it landed).
- **Backups.** Every unit led by a live host has one backup, the other live host that can
  run it and ranks highest for it by rendezvous hashing: the backup stands by, so when the
  leader dies the server hands the lock over at once. A unit nobody leads (free, or held by
  a session no live host claims: a host on its way out, an operator's reset) is waited for
  by the host the assignment gives it to.

A host leads what its standbys are granted; it never takes a unit because a plan says so.
The rule is pure and deterministic: every host computes the same plan from the same view.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict, deque
from collections.abc import Mapping, Sequence

import attrs

from .._status import ClusterView, HostState

# The hosts that can run a unit, in host id order: units with the same hosts are alike to
# the assignment, which therefore works on counts per such class.
_Class = tuple[str, ...]


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
    """How many units each host should lead when every host runs the same *units*: even,
    the extra ones where they already are."""
    base, extra = divmod(units, len(loads))
    order = sorted(loads, key=lambda host: (-loads[host], host))
    return {host: base + (1 if i < extra else 0) for i, host in enumerate(order)}


@attrs.define
class _Counts:
    """The assignment as counts: how many units of each class each host gets."""

    # host -> class -> units of that class assigned to the host; never negative.
    of: dict[str, Counter[_Class]]
    # host -> units assigned to it (the sum over its classes).
    load: Counter[str]
    # host -> its place when loads tie: those leading most now first, then by host id.
    rank: dict[str, int]

    def move(self, host: str, to: str, cls: _Class) -> None:
        self.of[host][cls] -= 1
        self.of[to][cls] += 1
        self.load[host] -= 1
        self.load[to] += 1

    def chain(self, start: str) -> list[tuple[str, _Class, str]] | None:
        """A chain of hand-offs from *start* to a host leading at least two less, or None.

        Breadth-first over "hands a unit of a class the next host can run"; the end is the
        least loaded host reached (ties by rank), the chain a shortest one to it.
        """
        came: dict[str, tuple[str, _Class] | None] = {start: None}
        queue = deque([start])
        while queue:
            host = queue.popleft()
            for cls in sorted(c for c, n in self.of[host].items() if n > 0):
                for other in cls:
                    if other not in came:
                        came[other] = (host, cls)
                        queue.append(other)
        end = min(came, key=lambda h: (self.load[h], self.rank[h]))
        if self.load[start] - self.load[end] < 2:
            return None
        steps = []
        at = end
        while (step := came[at]) is not None:
            steps.append((step[0], step[1], at))
            at = step[0]
        return steps[::-1]

    def even_out(self) -> None:
        """Apply chains, most loaded host first (the one leading least now among equals),
        until there is none: each lowers the sum of squared loads, so this ends."""
        while True:
            for start in sorted(self.of, key=lambda h: (-self.load[h], -self.rank[h])):
                steps = self.chain(start)
                if steps is not None:
                    for host, cls, to in steps:
                        self.move(host, to, cls)
                    break
            else:
                return


def _assign(
    live: Sequence[str], eligible: Mapping[str, _Class], holder: Mapping[str, str]
) -> dict[str, str]:
    """Each unit of *eligible* to one of its hosts: as even as the sets allow, led units
    staying with their holders wherever that is even."""
    led = Counter(holder.values())
    rank = {host: i for i, host in enumerate(sorted(live, key=lambda h: (-led[h], h)))}
    counts = _Counts(of={host: Counter() for host in live}, load=Counter(), rank=rank)
    for unit, host in holder.items():
        counts.of[host][eligible[unit]] += 1
        counts.load[host] += 1
    pending = sorted(u for u in eligible if u not in holder)
    for unit in pending:
        host = min(eligible[unit], key=lambda h: (counts.load[h], rank[h]))
        counts.of[host][eligible[unit]] += 1
        counts.load[host] += 1
    counts.even_out()

    # Counts to units, class by class: each host keeps the led units that rank lowest for
    # it; the units nobody leads, then the others' surplus, fill the hosts that get more.
    assignment = dict(holder)
    by_class: dict[_Class, list[str]] = defaultdict(list)
    for unit in sorted(eligible):
        by_class[eligible[unit]].append(unit)
    for cls, units in by_class.items():
        surplus: list[str] = []
        slots: list[str] = []
        for host in cls:
            own = sorted((u for u in units if holder.get(u) == host), key=lambda u: _score(u, host))
            keep = counts.of[host][cls]
            surplus += own[keep:]
            slots += [host] * max(0, keep - len(own))
        free = [u for u in units if u not in holder]
        for unit, host in zip([*free, *surplus], slots, strict=True):
            assignment[unit] = host
    return assignment


def plan(view: ClusterView, me: str, units: Sequence[str]) -> Plan:
    """The plan for host *me*, which runs *units*, given *view* (which may lack *me*).

    Every unit some live host can run is planned over the live hosts that can run it;
    *wanted* and *release* name only units of *units*.
    """
    ours = frozenset(units)
    # A view without this host (its registration lapsed a moment ago) still plans for it,
    # and this host knows what it runs whatever it published.
    hosts = dict(view.hosts)
    hosts[me] = attrs.evolve(hosts.get(me, HostState()), runs=ours)
    live = sorted(hosts)
    can = {host: hosts[host].can_run for host in live}
    eligible: dict[str, _Class] = {}
    for unit in sorted(frozenset().union(*can.values())):
        eligible[unit] = tuple(host for host in live if unit in can[host])
    holder: dict[str, str] = {}
    for host in live:
        for unit in sorted(hosts[host].leading):
            holder.setdefault(unit, host)
    assignment = _assign(live, eligible, holder)

    moving = {u: h for u, h in assignment.items() if holder.get(u) != h}
    wanted = {u for u, h in holder.items() if h == me}
    wanted |= {u for u, h in moving.items() if h == me}
    for unit, leader in holder.items():
        if leader == me or unit in moving:
            continue
        others = [h for h in eligible[unit] if h != leader]
        if others and max(others, key=lambda h: _score(unit, h)) == me:
            wanted.add(unit)
    release = {
        unit
        for unit, host in moving.items()
        if holder.get(unit) == me and unit in hosts[host].standing_by
    }
    goal = Counter(assignment.values())
    return Plan(
        wanted=frozenset(wanted & ours),
        release=frozenset(release),
        targets={host: goal[host] for host in live},
    )
