"""A projection and a command loop over a data subject's personal events, each in a process
of its own, for the test of a forget between them (tests/postgres/test_personal_processes.py).

Usage (the DSN in EVENTCORE_DSN, the key-encryption key in EVENTCORE_KEY_ENCRYPTION_KEY):

``python personal_process.py project SCHEMA APP SUBJECT HALT_AFTER``
    Runs `Mail` continuously: per customer the email it derives, in ``APP.mail``, erased on
    ``SubjectForgotten``; every event it applies in ``APP.applied``, with its batch and
    whether its email read back plain (never the email itself). The first batch by whose
    end it has applied HALT_AFTER events of SUBJECT prints ``halfway BATCH`` and waits, its
    transaction open, for the line ``go`` on stdin; the line ``stop`` (or the end of stdin)
    stops it, exit 0.

``python personal_process.py decide SCHEMA SUBJECT OTHER STREAM...``
    Runs one command loop per STREAM (each a stream of SUBJECT's): fold the stream (a
    `StateCache` keeps the state) and append a ``PlanChanged`` carrying the folded email,
    until a command is refused with `SubjectForgottenError`, then one more command folded
    without the cache; or until a command that started after the line ``forgotten`` came on
    stdin has committed. Beside them a loop on OTHER's streams of the same names, until every
    loop of SUBJECT has ended, and once more after. Prints one line per command, ``ok STREAM
    POSITION`` or ``refused STREAM SUBJECT`` (the subject the error names). On the line
    ``hold``, a transaction appends a ``PlanChanged`` of SUBJECT (the email read from its
    first stream) to ``SUBJECT.held``, prints ``holding``, and commits on the line
    ``release`` (then prints ``ok``). Exits 0 once all this has ended and the line
    ``forgotten`` has come.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import trio

from eventcore_trio import (
    SUBJECT_FORGOTTEN,
    EventFilter,
    EventRegistry,
    RecordedEvent,
    SubjectForgottenError,
    open_postgres_store,
)
from eventcore_trio._tools._processes import run_program
from eventcore_trio.commands import StateCache, execute
from eventcore_trio.projection import ProjectionConfig, ProjectionContext, run_projection

NAME = "mail"
BATCH_SIZE = 20
#: Commands per loop before it gives up waiting for the refusal (exit 1).
MAX_COMMANDS = 20_000

# The customers' domain, as in the personal-data contract's (eventcore_trio.testing's
# _customers), which these processes do not import: it brings pytest and Hypothesis, seconds
# of start-up on a busy machine.
registry = EventRegistry()


@registry.register("CustomerRegistered", subject="customer", personal=["email", "name"])
@attrs.frozen
class CustomerRegistered:
    """A customer's first event on each of its streams."""

    customer: str
    plan: str
    email: str | None = None
    name: str | None = None


@registry.register("PlanChanged", subject="customer", personal=["email"])
@attrs.frozen
class PlanChanged:
    """A plan change, confirmed to the customer's email (copied from the folded state)."""

    customer: str
    plan: str
    email: str | None = None


@registry.state("Customer", snapshot_every=1)
@attrs.frozen
class Customer:
    """A customer's stream folded (snapshotted at every event, so snapshots are written
    while the subject is forgotten)."""

    email: str | None = None
    plan: str | None = None

    def evolve(self, event: object) -> Customer:
        """Fold one typed event."""
        if isinstance(event, CustomerRegistered):
            return Customer(event.email, event.plan)
        assert isinstance(event, PlanChanged)
        return attrs.evolve(self, plan=event.plan)


def customer_of(event: RecordedEvent) -> str:
    """The customer an event is about (``SubjectForgotten`` names it ``subject``)."""
    field = "subject" if event.type == SUBJECT_FORGOTTEN else "customer"
    return str(event.data[field])


@attrs.define
class Mail:
    """The projection: each customer's email, erased when the customer is forgotten."""

    app: str
    subject: str
    halt_after: int
    go: trio.Event
    name: str = NAME
    filter: EventFilter = attrs.field(
        factory=lambda: EventFilter(
            event_types=["CustomerRegistered", "PlanChanged", SUBJECT_FORGOTTEN]
        )
    )
    batches: int = 0
    of_subject: int = 0
    halted: bool = False

    async def apply(self, event: RecordedEvent, ctx: ProjectionContext) -> None:
        """One event (the runtime applies one at a time only to isolate a failure)."""
        await self.apply_batch([event], ctx)

    async def apply_batch(self, events: Sequence[RecordedEvent], ctx: ProjectionContext) -> None:
        """A batch, in its transaction: the read model, and the record of what it read."""
        self.batches += 1
        mail, applied = f'"{self.app}".mail', f'"{self.app}".applied'
        for event in events:
            customer = customer_of(event)
            if event.type == SUBJECT_FORGOTTEN:
                await ctx.db.execute(f"DELETE FROM {mail} WHERE customer = $1", customer)
            elif "email" in event.data:
                await ctx.db.execute(
                    f"INSERT INTO {mail} VALUES ($1, $2) "
                    "ON CONFLICT (customer) DO UPDATE SET email = EXCLUDED.email",
                    customer,
                    event.data["email"],
                )
        await ctx.db.executemany(
            f"INSERT INTO {applied} VALUES ($1, $2, $3, $4, $5, $6)",
            [
                (
                    str(e.position),
                    self.batches,
                    customer_of(e),
                    e.type,
                    "email" in e.data,
                    ",".join(e.forgotten),
                )
                for e in events
            ],
        )
        self.of_subject += sum(customer_of(e) == self.subject for e in events)
        if not self.halted and self.of_subject >= self.halt_after:
            # Mid-way through the subject's events, with this batch's page read (and the
            # next one being read ahead): the test forgets the subject now.
            self.halted = True
            print(f"halfway {self.batches}", flush=True)
            await self.go.wait()


async def _listen(signals: Mapping[str, trio.Event]) -> None:
    # Lines on stdin set the events of their names; its end sets them all (the test is gone).
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        buffer = b""
        while chunk := await stdin.receive_some():
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in lines:
                signals[line.decode()].set()
    for event in signals.values():
        event.set()


async def project(dsn: str, schema: str, app: str, subject: str, halt_after: int) -> int:
    """The ``project`` mode (see the module's docstring)."""
    go, stop = trio.Event(), trio.Event()
    config = ProjectionConfig(continuous=True, batch_size=BATCH_SIZE, poll_interval=0.05)
    async with (
        open_postgres_store(dsn, schema=schema, migrate=False) as store,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(_listen, {"go": go, "stop": stop})
        nursery.start_soon(run_projection, store, Mail(app, subject, halt_after, go), config)
        await stop.wait()
        nursery.cancel_scope.cancel()
    return 0


@attrs.frozen
class Confirm:
    """Change a customer's plan on one of its streams, confirmed to the folded email."""

    stream: str
    customer: str
    plan: str

    def streams(self) -> Mapping[str, type[Any]]:
        """The one stream."""
        return {self.stream: Customer}

    def decide(self, states: Mapping[str, Any]) -> Mapping[str, Sequence[object]]:
        """A `PlanChanged` carrying the state's email (personal)."""
        state: Customer = states[self.stream]
        return {self.stream: [PlanChanged(self.customer, self.plan, state.email)]}


async def decide(dsn: str, schema: str, subject: str, other: str, streams: list[str]) -> int:
    """The ``decide`` mode (see the module's docstring)."""
    cache = StateCache()
    async with open_postgres_store(dsn, schema=schema, migrate=False) as store:

        async def command(stream: str, customer: str, n: int, *, cold: bool = False) -> bool:
            # One command; prints its outcome and returns whether it was refused.
            try:
                result = await execute(
                    store,
                    Confirm(stream, customer, f"plan-{n}"),
                    registry=registry,
                    cache=None if cold else cache,
                )
            except SubjectForgottenError as refused:
                print(f"refused {stream} {refused.subject}", flush=True)
                return True
            assert result.append is not None
            print(f"ok {stream} {result.append.position}", flush=True)
            return False

        async def until_refused(stream: str) -> None:
            for n in range(MAX_COMMANDS):
                # A command that starts once the test has said the forget returned must be
                # refused: if it commits, its line shows it, and the loop ends.
                told = forgotten.is_set()
                if await command(stream, subject, n):
                    await command(stream, subject, n + 1, cold=True)
                    return
                if told:
                    return
            raise RuntimeError(f"{stream}: no command was refused")

        async def others(done: trio.Event) -> None:
            for n in range(MAX_COMMANDS):
                finished = done.is_set()
                for stream in streams:
                    if await command(stream.replace(subject, other, 1), other, n):
                        raise RuntimeError(f"{other} was refused")
                if finished:
                    return

        async def hold() -> None:
            await held.wait()
            [first, *_] = await store.read_stream(streams[0])
            stream = f"{subject}.held"
            event = PlanChanged(subject, "held", first.data["email"])
            async with store.transaction() as tx:
                result = await tx.append(stream, [registry.new_event(event)])
                print("holding", flush=True)
                await release.wait()
            print(f"ok {stream} {result.position}", flush=True)

        forgotten, done, held, release = (trio.Event() for _ in range(4))
        signals = {"forgotten": forgotten, "hold": held, "release": release}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_listen, signals)
            async with trio.open_nursery() as work:
                work.start_soon(hold)
                work.start_soon(others, done)
                async with trio.open_nursery() as loops:
                    for stream in streams:
                        loops.start_soon(until_refused, stream)
                done.set()
            # Exit only once told (the test's line would find the pipe closed).
            await forgotten.wait()
            nursery.cancel_scope.cancel()
    return 0


if __name__ == "__main__":
    dsn = os.environ["EVENTCORE_DSN"]
    mode, schema, *rest = sys.argv[1:]
    if mode == "project":
        app, subject, halt_after = rest
        sys.exit(run_program(project, dsn, schema, app, subject, int(halt_after)))
    subject, other, *streams = rest
    sys.exit(run_program(decide, dsn, schema, subject, other, streams))
