"""The balancing rule, by hand: hosts acting on their plans converge and then stay put."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventcore_trio._status import ClusterView, HostState
from eventcore_trio.projection._balance import plan, targets


class Cluster:
    """Locks with FIFO waiters, and hosts that do what their plans say, one round at a time."""

    def __init__(self, units: list[str]) -> None:
        self.units = units
        self.leader: dict[str, str] = {}
        self.waiting: dict[str, list[str]] = {u: [] for u in units}
        self.hosts: list[str] = []
        # What a host runs, when not every unit (see runs_of).
        self.runs: dict[str, list[str]] = {}
        self.moves = 0

    def runs_of(self, host: str) -> list[str]:
        return self.runs.get(host, self.units)

    def view(self) -> ClusterView:
        return ClusterView(
            hosts={
                h: HostState(
                    leading=frozenset(u for u, lead in self.leader.items() if lead == h),
                    standing_by=frozenset(u for u, w in self.waiting.items() if h in w),
                    runs=frozenset(self.runs_of(h)),
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
            p = plan(view, host, self.runs_of(host))
            assert p.wanted <= set(self.runs_of(host)), "a host plans only units it runs"
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


# Hosts that run different sets (two services sharing a schema, a rolling deploy).


def _check_optimal(cluster: Cluster) -> None:
    """Every unit some host runs is led by a host that runs it, the loads are as even as
    the sets allow (compared with every possible assignment), and standbys are bounded."""
    runnable = {u for h in cluster.hosts for u in cluster.runs_of(h)}
    assert set(cluster.leader) == runnable, "every runnable unit led, and no other"
    for unit, host in cluster.leader.items():
        assert unit in cluster.runs_of(host), f"{unit} led by {host}, which does not run it"
    best = min(
        sorted(Counter(choice).values(), reverse=True) + [0] * len(cluster.hosts)
        for choice in itertools.product(
            *([h for h in cluster.hosts if u in cluster.runs_of(h)] for u in sorted(runnable))
        )
    )
    loads = sorted(cluster.loads(), reverse=True)
    assert loads == best[: len(loads)], (loads, best)
    standbys = sum(len(w) for w in cluster.waiting.values())
    assert standbys <= len(runnable), standbys
    for unit, waiters in cluster.waiting.items():
        assert all(unit in cluster.runs_of(h) for h in waiters), (unit, waiters)


def test_disjoint_sets_are_spread_within_each_set() -> None:
    """Two services on one schema: each spreads its own units over its own hosts."""
    a_units = [f"a{i}" for i in range(4)]
    b_units = [f"b{i}" for i in range(6)]
    cluster = Cluster(a_units + b_units)
    for host, runs in [("h1", a_units), ("h2", b_units), ("h3", a_units), ("h4", b_units)]:
        cluster.hosts.append(host)
        cluster.runs[host] = runs
        cluster.settle()
    _check_optimal(cluster)
    assert cluster.loads() == [2, 3, 2, 3]


def test_a_host_that_starts_first_does_not_take_the_others_units() -> None:
    """The issue's case: a host with six projectors starts first, one with two others joins;
    the two are led by the host that has them, at once."""
    cluster = Cluster([f"a{i}" for i in range(6)] + ["audit", "billing"])
    cluster.hosts.append("big")
    cluster.runs["big"] = [f"a{i}" for i in range(6)]
    cluster.settle()
    cluster.hosts.append("small")
    cluster.runs["small"] = ["audit", "billing"]
    cluster.round()
    assert cluster.leader["audit"] == cluster.leader["billing"] == "small"
    cluster.settle()
    _check_optimal(cluster)


@pytest.mark.parametrize("first", ["full", "lacking"])
def test_one_host_lacking_a_unit(first: str) -> None:
    """A host without "audit" leads only units it has; audit is led by one that has it."""
    units = ["audit", "u1", "u2", "u3"]
    cluster = Cluster(units)
    cluster.runs = {"full": units, "lacking": ["u1", "u2", "u3"]}
    for host in [first, *({"full", "lacking"} - {first})]:
        cluster.hosts.append(host)
        cluster.settle()
    _check_optimal(cluster)
    assert cluster.leader["audit"] == "full"
    assert cluster.loads() == [2, 2]
    cluster.kill("full")
    cluster.settle()
    assert "audit" not in cluster.leader, "nobody left that can run it"
    assert cluster.loads() == [3]


def test_overlapping_sets_need_a_chain_of_hand_offs() -> None:
    """a leads p and s, b leads q, c (runs q only) leads nothing: no single hand-off evens
    this out, a chain does (p to b, q to c): 1-1-1."""
    cluster = Cluster(["p", "q", "s"])
    cluster.hosts = ["a", "b", "c"]
    cluster.runs = {"a": ["p", "s"], "b": ["p", "q"], "c": ["q"]}
    cluster.leader = {"p": "a", "s": "a", "q": "b"}
    cluster.settle()
    _check_optimal(cluster)
    assert cluster.leader == {"s": "a", "p": "b", "q": "c"}


def test_overlapping_sets_settle_and_stay_put() -> None:
    """Hosts running overlapping sets settle as evenly as the sets allow, then never move."""
    xs = [f"x{i}" for i in range(6)]
    ys = [f"y{i}" for i in range(3)]
    cluster = Cluster(xs + ys + ["z"])
    cluster.runs = {"a": xs, "b": xs + ys, "c": [*ys, "z"], "d": ["z", "x0"]}
    for host in ["a", "b", "c", "d"]:
        cluster.hosts.append(host)
        cluster.settle()
        _check_optimal(cluster)
    moves = cluster.moves
    for _ in range(10):
        assert not cluster.round()
    assert cluster.moves == moves


def test_a_unit_no_host_runs_is_planned_by_nobody() -> None:
    """A unit no live host runs is wanted by no host and disturbs nothing else."""
    cluster = Cluster(["ghost", "u1", "u2"])
    cluster.runs = {"a": ["u1", "u2"], "b": ["u1", "u2"]}
    cluster.hosts = ["a", "b"]
    cluster.settle()
    _check_optimal(cluster)
    assert "ghost" not in cluster.leader
    assert cluster.waiting["ghost"] == []
    decided = plan(cluster.view(), "a", ["u1", "u2"])
    assert "ghost" not in decided.wanted


def test_a_host_that_has_not_said_runs_only_what_it_leads_or_stands_by_for() -> None:
    """A host of an older version (runs unknown) is given only units it already has."""
    view = ClusterView(
        hosts={
            "old": HostState(leading=frozenset({"u1", "u2"})),
            "new": HostState(runs=frozenset({"u1", "u2", "u3"})),
        },
        held=frozenset({"u1", "u2"}),
    )
    decided = plan(view, "new", ["u1", "u2", "u3"])
    # u3 is new's (old cannot run it), and no hand-off: old leads 2, new 1 is even.
    assert decided.targets == {"new": 1, "old": 2}
    assert "u3" in decided.wanted
    assert decided.release == frozenset()


@settings(max_examples=150, deadline=None)
@given(
    loads=st.lists(st.integers(0, 6), min_size=1, max_size=5),
    free=st.integers(0, 8),
)
def test_the_same_set_everywhere_gives_the_even_targets(loads: list[int], free: int) -> None:
    """When every host runs every unit, the plan's targets are `targets`: even, the extra
    units with the hosts that lead most now (as before hosts said what they run)."""
    hosts = [f"h{i}" for i in range(len(loads))]
    leader = {f"u{h}-{n}": h for h, load in zip(hosts, loads, strict=True) for n in range(load)}
    units = sorted(leader) + [f"free{i}" for i in range(free)]
    view = ClusterView(
        hosts={
            h: HostState(
                leading=frozenset(u for u, lead in leader.items() if lead == h),
                runs=frozenset(units),
            )
            for h in hosts
        },
        held=frozenset(leader),
    )
    expected = targets(dict(zip(hosts, loads, strict=True)), len(units))
    for host in hosts:
        assert plan(view, host, units).targets == expected


@settings(max_examples=150, deadline=None)
@given(
    runs=st.lists(
        st.sets(st.sampled_from([f"u{i}" for i in range(7)]), min_size=1),
        min_size=1,
        max_size=4,
    ),
    deaths=st.lists(st.integers(0, 3), max_size=2),
)
def test_any_sets_converge_as_evenly_as_they_allow(runs: list[set[str]], deaths: list[int]) -> None:
    """Hosts with any sets, joining one by one and dying: after each change the cluster
    settles with every runnable unit led by a host that has it, as evenly as possible."""
    cluster = Cluster([f"u{i}" for i in range(7)])
    for i, units in enumerate(runs):
        host = f"h{i}"
        cluster.runs[host] = sorted(units)
        cluster.hosts.append(host)
        cluster.settle()
        _check_optimal(cluster)
    for n in deaths:
        if len(cluster.hosts) > 1:
            cluster.kill(cluster.hosts[n % len(cluster.hosts)])
            cluster.settle()
            _check_optimal(cluster)
