"""Projectors for the command-line tests (``eventcore-trio run tests.cli_projectors:ALL``)."""

from eventcore_trio import RecordedEvent
from eventcore_trio.projection import Failure, FailureStrategy, ProjectionContext, projector

# Set by tests to make "picky" accept everything on replay.
ACCEPT_ALL = {"value": False}


def _skip(failure: Failure) -> FailureStrategy:
    return FailureStrategy.SKIP


@projector("counter")
async def counter(event: RecordedEvent, ctx: ProjectionContext) -> None:
    await ctx.db.execute("CREATE TABLE IF NOT EXISTS cli_counted (event_id uuid PRIMARY KEY)")
    await ctx.db.execute("INSERT INTO cli_counted VALUES ($1)", event.event_id)


@projector("picky", on_error=_skip)
async def picky(event: RecordedEvent, ctx: ProjectionContext) -> None:
    if event.data.get("bad") and not ACCEPT_ALL["value"]:
        raise ValueError("bad event")


ALL = [counter, picky]


@projector("spread", partitions=3)
async def spread(event: RecordedEvent, ctx: ProjectionContext) -> None:
    pass


@projector("tally", partitions=4)
async def tally(event: RecordedEvent, ctx: ProjectionContext) -> None:
    # The test creates the table, without a key: an event applied twice shows up as two rows
    # (tests/postgres/test_pgbouncer.py).
    await ctx.db.execute("INSERT INTO cli_tally VALUES ($1, $2)", event.stream_id, event.event_id)


TALLY = [tally]


@projector("brittle")
async def brittle(event: RecordedEvent, ctx: ProjectionContext) -> None:
    # FATAL by default: the host stops it and logs the traceback once (--log-format json).
    raise RuntimeError("brittle cannot apply anything")


WITH_A_FAILURE = [counter, brittle]

# Targets that name something other than projectors (tests/test_cli.py).
NOT_A_PROJECTOR = "counter"
MIXED = [counter, 3]


def failing_factory() -> list[object]:
    raise RuntimeError("the factory needs a setting that is missing")
