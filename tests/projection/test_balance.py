"""The balancing rule, by hand: hosts acting on their plans converge and then stay put."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventcore_trio._hosts import ClusterView, HostState
from eventcore_trio.projection._balance import plan, targets


class Cluster:
    """Locks with FIFO waiters, and hosts that do what their plans say, one round at a time."""

    def __init__(self, units: list[str]) -> None:
        self.units = units
        self.leader: dict[str, str] = {}
        self.waiting: dict[str, list[str]] = {u: [] for u in units}
        self.hosts: list[str] = []
        self.moves = 0

    def view(self) -> ClusterView:
        return ClusterView(
            hosts={
                h: HostState(
                    leading=frozenset(u for u, lead in self.leader.items() if lead == h),
                    standing_by=frozenset(u for u, w in self.waiting.items() if h in w),
                )
                for h in self.hosts
            },
            held=frozenset(self.leader),
        )

    def grant(self) -> None:
        for unit, waiters in self.waiting.items():
            if unit not in self.leader and waiters:
                self.leader[unit] = waiters.pop(0)

    def round(self) -> bool:
        """Every host plans on the same view and acts; True if anything changed."""
        before = (dict(self.leader), {u: list(w) for u, w in self.waiting.items()})
        view = self.view()
        for host in self.hosts:
            p = plan(view, host, self.units)
            for unit in self.units:
                leads = self.leader.get(unit) == host
                waits = host in self.waiting[unit]
                if unit in p.release and leads:
                    del self.leader[unit]
                    self.moves += 1
                elif unit in p.wanted and not leads and not waits:
                    self.waiting[unit].append(host)
                elif unit not in p.wanted and waits:
                    self.waiting[unit].remove(host)
            self.grant()
        return (self.leader, self.waiting) != before

    def settle(self, rounds: int = 50) -> int:
        for n in range(rounds):
            if not self.round():
                return n
        raise AssertionError(f"no fixed point after {rounds} rounds: {self.leader}")

    def kill(self, host: str) -> None:
        self.hosts.remove(host)
        self.leader = {u: h for u, h in self.leader.items() if h != host}
        for waiters in self.waiting.values():
            if host in waiters:
                waiters.remove(host)
        self.grant()

    def loads(self) -> list[int]:
        counts = Counter(self.leader.values())
        return [counts[h] for h in self.hosts]


def _check_even(cluster: Cluster) -> None:
    assert set(cluster.leader) == set(cluster.units), "every unit led"
    loads = cluster.loads()
    assert max(loads) - min(loads) <= 1, loads
    # Bounded connections: at most about one standby per unit.
    standbys = sum(len(w) for w in cluster.waiting.values())
    assert standbys <= len(cluster.units), standbys


def test_targets_keep_the_extra_units_where_they_are() -> None:
    """7 units on 3 hosts: 3-2-2, the 3 going to the host that leads most."""
    assert targets({"a": 1, "b": 4, "c": 2}, 7) == {"b": 3, "c": 2, "a": 2}
    assert targets({"a": 3, "b": 2, "c": 2}, 7) == {"a": 3, "b": 2, "c": 2}


def test_first_host_does_not_keep_everything() -> None:
    """A host that starts first leads all; as others join, the spread evens out."""
    cluster = Cluster([f"p{i}" for i in range(6)] + [f"q[{i}/4]" for i in range(4)])
    cluster.hosts = ["h1"]
    cluster.settle()
    assert cluster.loads() == [10]
    cluster.hosts.append("h2")
    cluster.settle()
    _check_even(cluster)
    cluster.hosts.append("h3")
    cluster.settle()
    _check_even(cluster)
    assert sorted(cluster.loads()) == [3, 3, 4]
    moves = cluster.moves
    for _ in range(5):
        assert not cluster.round(), "a settled cluster stays put"
    assert cluster.moves == moves


def test_a_dead_hosts_units_go_to_their_backups_then_even_out() -> None:
    """Every unit of another host has a standby, so a death loses no unit for long."""
    cluster = Cluster([f"u{i}" for i in range(10)])
    cluster.hosts = ["a", "b", "c"]
    cluster.settle()
    busiest = max(cluster.hosts, key=lambda h: cluster.loads()[cluster.hosts.index(h)])
    cluster.kill(busiest)
    # Granted at once to the standbys that were waiting: no round needed.
    assert set(cluster.leader) == set(cluster.units)
    cluster.settle()
    _check_even(cluster)
    cluster.hosts.append("d")
    cluster.settle()
    _check_even(cluster)


@settings(max_examples=200, deadline=None)
@given(
    units=st.integers(1, 30),
    joins=st.lists(st.sampled_from(["join", "kill"]), min_size=1, max_size=8),
)
def test_any_sequence_of_joins_and_deaths_converges_evenly(units: int, joins: list[str]) -> None:
    """Whatever joins and dies, the cluster settles with max - min <= 1, every unit led."""
    cluster = Cluster([f"u{i}" for i in range(units)])
    cluster.hosts = ["h0"]
    cluster.settle()
    names = iter(f"h{i}" for i in range(1, 100))
    for step in joins:
        if step == "join" or len(cluster.hosts) == 1:
            cluster.hosts.append(next(names))
        else:
            cluster.kill(cluster.hosts[len(cluster.hosts) // 2])
        cluster.settle()
        _check_even(cluster)


@pytest.mark.parametrize("hosts", [2, 3, 4, 7])
def test_no_oscillation_when_hosts_do_not_divide_units(hosts: int) -> None:
    """Settled, nobody moves again, for any host count."""
    cluster = Cluster([f"u{i}" for i in range(10)])
    cluster.hosts = [f"h{i}" for i in range(hosts)]
    cluster.settle()
    _check_even(cluster)
    moves = cluster.moves
    for _ in range(10):
        cluster.round()
    assert cluster.moves == moves


def test_a_view_without_this_host_still_plans() -> None:
    """A host whose registration lapsed still plans: it takes the free unit and stands by
    for the one a session nobody claims holds (no division by zero hosts)."""
    view = ClusterView(hosts={}, held=frozenset({"u1"}))
    decided = plan(view, "me", ["u1", "u2"])
    assert decided.wanted == {"u1", "u2"}
    assert decided.release == frozenset()
