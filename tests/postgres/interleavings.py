"""An interleaving explorer: real sessions, run statement by statement, in every order.

A scenario is a few *actors*, each an async function that runs statements on a session of
its own and calls ``await step(label)`` before each one. The explorer runs the scenario
again and again, one schedule at a time: at every point where several actors wait at a
step, it lets exactly one of them run its statement and waits until that statement has
finished (the actor is at its next step) or is waiting for a lock that another session
holds (the actor is *blocked*, and runs on by itself once the lock is granted). It visits
every such choice sequence (a depth-first search over schedules, re-running the scenario
from the start for each, as stateless model checkers do) and calls the scenario's check
after each one.

Whether a statement waits for a lock is read from ``pg_locks`` on a separate session, so
a schedule in which one writer waits for another's stream lock is explored as PostgreSQL
runs it, not as the driver imagines it.

This is the second of the three proofs of docs/postgres.md ("How the read horizon is
proven"); `tests/postgres/test_interleavings.py` holds the scenarios.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, final

import attrs
import trio

from eventcore_trio.postgres._bridge import Connection

Step = Callable[[str], Awaitable[None]]


class ActorBody(Protocol):
    """An actor: runs its statements, calling ``await step(label)`` before each."""

    def __call__(self, step: Step, session: Session) -> Awaitable[None]: ...


@final
class Session:
    """What an actor tells the explorer about itself: the server session it runs on."""

    def __init__(self) -> None:
        self.backend_pids: set[int] = set()

    def uses(self, connection: Connection) -> Connection:
        """Record that the actor's statements now run on *connection*; returns it."""
        self.backend_pids.add(connection.backend_pid)
        return connection


@attrs.frozen
class Actor:
    """One participant of a scenario.

    Attributes:
        name: shown in schedules.
        body: what it does.
        twin_of: the index of an earlier, identical actor: schedules in which this one
            starts before its twin are mirror images of explored ones and are skipped.
    """

    name: str
    body: ActorBody
    twin_of: int | None = None


@attrs.frozen
class Exploration:
    """What an exploration did: how many schedules, the longest one's length, and the
    first schedule in which an actor waited for another's lock (None: no actor ever did)."""

    schedules: int
    steps: int
    first_wait: str | None = None


class ScheduleFailed(AssertionError):
    """A schedule broke the scenario's check; the message names the schedule."""


@final
class _Running:
    def __init__(self, actor: Actor) -> None:
        self.actor = actor
        self.session = Session()
        self.arrived = trio.Event()
        self.go = trio.Event()
        self.label: str | None = None
        self.done = False
        self.steps_taken = 0
        self.blocked = False

    async def step(self, label: str) -> None:
        self.label = label
        self.arrived.set()
        await self.go.wait()
        self.go = trio.Event()
        self.steps_taken += 1

    async def run(self) -> None:
        try:
            await self.actor.body(self.step, self.session)
        finally:
            self.done = True
            self.label = None
            self.arrived.set()

    @property
    def ready(self) -> bool:
        return not self.done and not self.blocked and self.arrived.is_set()


async def _waits_for_lock(monitor: Connection, pids: set[int]) -> bool:
    return bool(
        await monitor.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted AND pid = ANY($1::int[]))",
            sorted(pids),
        )
    )


async def _settle(monitor: Connection, actor: _Running) -> None:
    """Wait until *actor* is at a step, finished, or waiting for a lock (blocked)."""
    while True:
        with trio.move_on_after(0.002):
            await actor.arrived.wait()
        if actor.arrived.is_set():
            actor.blocked = False
            return
        if await _waits_for_lock(monitor, actor.session.backend_pids):
            actor.blocked = True
            return


async def _run_schedule(
    monitor: Connection, actors: Sequence[Actor], prefix: Sequence[int]
) -> tuple[list[int], list[list[int]], set[str]]:
    """Run one schedule: *prefix*'s choices first, then the first ready actor each time.

    Returns the choices made, for each the actors that were ready then, and the names of
    the actors that waited for a lock.
    """
    running = [_Running(actor) for actor in actors]
    choices: list[int] = []
    options: list[list[int]] = []
    waited: set[str] = set()
    async with trio.open_nursery() as nursery:
        for actor in running:
            nursery.start_soon(actor.run)
        for actor in running:
            await _settle(monitor, actor)
        while not all(actor.done for actor in running):
            ready = [
                i
                for i, actor in enumerate(running)
                if actor.ready
                and not (
                    actor.actor.twin_of is not None
                    and actor.steps_taken == 0
                    and running[actor.actor.twin_of].steps_taken == 0
                )
            ]
            if not ready:
                blocked = [a.actor.name for a in running if a.blocked]
                raise ScheduleFailed(f"deadlock after {choices}: {blocked} all wait for locks")
            chosen = prefix[len(choices)] if len(choices) < len(prefix) else ready[0]
            assert chosen in ready, (chosen, ready, prefix, choices)
            choices.append(chosen)
            options.append(ready)
            actor = running[chosen]
            actor.arrived = trio.Event()
            actor.go.set()
            await _settle(monitor, actor)
            # The statement may have released locks that others wait for.
            for other in running:
                if other.blocked:
                    await _settle(monitor, other)
            waited.update(a.actor.name for a in running if a.blocked)
    return choices, options, waited


def _next_prefix(choices: list[int], options: list[list[int]]) -> list[int] | None:
    """The next schedule to explore after one that made *choices*: depth first."""
    for depth in range(len(choices) - 1, -1, -1):
        ready = options[depth]
        at = ready.index(choices[depth])
        if at + 1 < len(ready):
            return [*choices[:depth], ready[at + 1]]
    return None


def describe(actors: Sequence[Actor], choices: Sequence[int]) -> str:
    """A schedule in words: which actor ran each step."""
    return " ".join(actors[i].name for i in choices)


async def explore(
    monitor: Connection,
    make_actors: Callable[[int], Sequence[Actor]],
    check: Callable[[int, str], Awaitable[None]],
    *,
    max_schedules: int | None = None,
) -> Exploration:
    """Run every schedule of the scenario built by *make_actors* (given a schedule number,
    so that each schedule can use fresh stream names), calling *check* with the schedule
    number and its description after each.

    Raises:
        ScheduleFailed: *check* failed (its assertion is chained), or the actors deadlocked.
    """
    prefix: list[int] | None = []
    schedules = 0
    longest = 0
    first_wait: str | None = None
    while prefix is not None and (max_schedules is None or schedules < max_schedules):
        actors = make_actors(schedules)
        choices, options, waited = await _run_schedule(monitor, actors, prefix)
        description = describe(actors, choices)
        if waited and first_wait is None:
            first_wait = f"schedule {schedules + 1} ({description}): {sorted(waited)} waited"
        try:
            await check(schedules, description)
        except AssertionError as exc:
            raise ScheduleFailed(
                f"schedule {schedules + 1} ({description}) broke the check: {exc}"
            ) from exc
        schedules += 1
        longest = max(longest, len(choices))
        prefix = _next_prefix(choices, options)
    return Exploration(schedules=schedules, steps=longest, first_wait=first_wait)
