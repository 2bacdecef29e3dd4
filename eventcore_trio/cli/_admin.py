"""The commands that look after a store: ``migrate``, ``reset``, ``run`` and ``dead-letters``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import trio

from .._errors import (
    ConfigurationError,
    DeadLetterNotFound,
    EventCoreError,
    PartitionsMismatch,
    ProjectionNotFound,
    UnsupportedPooling,
)
from .._status import ProjectionState
from .._versions import versioned_name
from ..projection import check_projector
from ._options import EXIT_FAILED, EXIT_OK, SCHEMA_VARIABLE, StoreOptions
from ._projectors import load_projectors
from ._status import printable

if TYPE_CHECKING:
    from ..postgres import PostgresStore

#: The host's logger (`run_host` logs there too): the warning below comes in its voice.
logger = logging.getLogger("eventcore_trio.host")


async def migrate(options: StoreOptions, grant: str | None, partitions: list[int]) -> int:
    from ..postgres import LATEST_SCHEMA_VERSION, partition_index_advice

    async with options.open(migrate=True) as store:
        print(f"schema {options.schema!r} is at version {LATEST_SCHEMA_VERSION}")
        # Only the counts asked for: the projections table is the runtime role's to write,
        # so its counts are not the owner's to build (an index per invented count would slow
        # every append); recorded counts without their index are named instead.
        for count in sorted(set(partitions)):
            if not await store.admin.build_partition_index(count):
                print(
                    f"eventcore-trio: this role may not build the index of {count} partitions "
                    f"(only the owner of {options.schema}.events may): run "
                    f"`{partition_index_advice(options.schema, count)}` as the schema's owner",
                    file=sys.stderr,
                )
                return EXIT_FAILED
            print(f"partition index for {count} partitions: ready")
        missing = await store.admin.fetch(
            f'SELECT DISTINCT p.partitions FROM "{options.schema}".projections AS p '
            "WHERE p.partitions > 1 AND pg_catalog.to_regclass(pg_catalog.format("
            "'%I.events_partition_%s_idx', $1::text, p.partitions)) IS NULL "
            "ORDER BY 1",
            options.schema,
        )
        for row in missing:
            print(
                f"projections run as {row['partitions']} partitions without their read index: "
                f"`{partition_index_advice(options.schema, row['partitions'])}` builds it"
            )
        if grant is not None:
            statements = await store.admin.grant_runtime_role(grant)
            print(f"granted {grant!r} the rights of a runtime role ({len(statements)} statements)")
    return EXIT_OK


def confirm_reset(name: str, yes: bool) -> bool:
    """Whether to reset *name*: *yes* (``--yes``), else the answer at the terminal.

    Raises:
        ConfigurationError: no ``--yes`` and no terminal to ask at.
    """
    if yes:
        return True
    if not sys.stdin.isatty():
        raise ConfigurationError(
            f"resetting {name!r} makes it rebuild from the beginning; confirm with --yes"
        )
    answer = input(f"Reset projection {name!r} (it will rebuild)? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        print("not reset")
        return False
    return True


async def reset(options: StoreOptions, name: str, follow: bool) -> None:
    async with options.open() as store:
        await store.reset_projection(name)
        print(f"projection {name!r} reset: its next run rebuilds it from the beginning", flush=True)
        if not follow:
            return
        print("waiting for a host to rebuild it (start your hosts; Ctrl-C stops waiting)…")
        total: int | None = None
        live = sys.stdout.isatty()
        last_line = 0.0
        while True:
            units = [
                r
                for r in await store.projection_status()
                if r.name == name and r.state is not ProjectionState.AWAITING_SPLIT
            ]
            lag = sum(r.lag_events for r in units)
            if total is None or lag > total:
                total = lag
            done = total - lag
            if all(r.checkpoint is not None for r in units) and lag == 0:
                print(f"\rrebuilt: {total:,} events applied{' ' * 30}", flush=True)
                return
            fraction = done / total if total else 0.0
            bar = "#" * int(fraction * 30)
            states = Counter(r.state.value for r in units)
            state = ", ".join(f"{n} {v}" if len(units) > 1 else v for v, n in states.items())
            line = f"[{bar:<30}] {fraction:6.1%}  {done:,}/{total:,} events  ({state})"
            now = trio.current_time()
            if live:
                print(f"\r{line}", end="", flush=True)
            elif now - last_line >= 2:
                print(line, flush=True)
                last_line = now
            await trio.sleep(0.2)


async def run(options: StoreOptions, projectors: list[Any]) -> int:
    from ..projection import run_host

    # Versioned names (a version above 1 runs as "name@vN"), as status shows them.
    names = ", ".join(check_projector(p) for p in projectors)
    # First, before the store opens (and anything is logged): what runs where.
    print(f"hosting {names} on {options.describe()}; SIGINT or SIGTERM stops", flush=True)
    looked = False

    @asynccontextmanager
    async def open_store() -> AsyncIterator[PostgresStore]:
        nonlocal looked
        async with options.open(migrate=True) as store:
            # Once, at the first open that succeeds (the database may be down at first).
            if not looked:
                looked = True
                await warn_if_no_events(store, options)
            yield store

    try:
        return await run_host(
            open_store,
            projectors,
            on_ready=lambda: print(
                "ready: the store is open and the projectors started", flush=True
            ),
            on_stop=lambda received: print(f"received {received.name}; stopping", flush=True),
        )
    except UnsupportedPooling as exc:
        # The host registers with a session lock of its own before it leads anything.
        raise UnsupportedPooling(f"cannot host {names}: {exc}") from exc


#: How many other stores' schemas `warn_if_no_events` looks into, at most: a hint, not a
#: survey of a database that holds thousands of schemas.
_SCHEMAS_LOOKED_INTO: Final = 20

# The other schemas of this database that hold a store (an events table next to a table of
# migrations) this role may read.
_OTHER_STORES: Final = (
    "SELECT n.nspname FROM pg_catalog.pg_class AS c "
    "JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace "
    "WHERE c.relname = 'events' AND c.relkind IN ('r', 'p') AND n.nspname <> $1 "
    "AND pg_catalog.to_regclass(pg_catalog.format('%I.schema_migrations', n.nspname)) "
    "IS NOT NULL "
    "AND pg_catalog.has_schema_privilege(n.oid, 'USAGE') "
    "AND pg_catalog.has_table_privilege(c.oid, 'SELECT') "
    "ORDER BY n.nspname LIMIT $2"
)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def warn_if_no_events(store: PostgresStore, options: StoreOptions) -> None:
    """Log one WARNING when the store's schema holds no events, naming the schemas of the
    same database that do (``did you mean --schema X?``).

    `run` migrates, so a mistyped or forgotten ``--schema`` (``EVENTCORE_SCHEMA``) used to
    create an empty schema and host the projectors over nothing, without a word. Only a
    warning: starting hosts before the first event is written is a normal deployment."""
    schema = options.schema
    try:
        if await store.admin.fetchval(f"SELECT EXISTS (SELECT FROM {_quoted(schema)}.events)"):
            return
        found = []
        for row in await store.admin.fetch(_OTHER_STORES, schema, _SCHEMAS_LOOKED_INTO):
            other = row["nspname"]
            if await store.admin.fetchval(f"SELECT EXISTS (SELECT FROM {_quoted(other)}.events)"):
                found.append(other)
    except EventCoreError as exc:
        # A hint must never keep a host from running: the store itself opened fine.
        logger.debug("could not look for events in other schemas: %s", exc)
        return
    where = options.describe()
    hint = ""
    if found:
        also = f" ({', '.join(repr(o) for o in found[1:])} too)" if found[1:] else ""
        hint = (
            f"; schema {found[0]!r} of this database has events{also}: did you mean "
            f"--schema {found[0]} (or {SCHEMA_VARIABLE}={found[0]})?"
        )
    logger.warning(
        "no events in %s: the projectors have nothing to apply until events are written there%s",
        where,
        printable(hint),
    )


async def list_letters(options: StoreOptions, name: str, as_json: bool) -> None:
    async with options.open() as store:
        letters = await store.dead_letters(name)
        # A projection's name, a version's ("name@v2", as status prints it) or a unit's.
        known = {
            known_name
            for r in await store.projection_status()
            for known_name in (r.name, versioned_name(r.name, r.version), r.unit)
        }
        if not letters and name not in known:
            # As `reset` says: a name that never ran is more likely a typo than a clean record.
            raise ProjectionNotFound(f"no projection named {name!r} has run against this store")
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "id": str(d.id),
                        "position": str(d.position),
                        "stream_id": d.event.stream_id,
                        "type": d.event.type,
                        "error_type": d.error_type,
                        "error_message": d.error_message,
                        "retries": d.retries,
                        "recorded_at": d.recorded_at.isoformat(),
                    }
                    for d in letters
                ],
                indent=2,
            )
        )
        return
    p = printable
    for d in letters:
        print(
            f"{d.position}  {p(d.event.stream_id)}  {p(d.event.type)}  "
            f"{p(d.error_type)}: {p(d.error_message)}"
        )
    print(f"{len(letters)} dead letter(s) for {name!r}")


async def replay_letters(options: StoreOptions, name: str, target: str) -> int:
    from ..projection import replay_dead_letters

    chosen = [p for p in load_projectors(target) if getattr(p, "name", None) == name]
    if not chosen:
        raise ConfigurationError(f"{target} defines no projector named {name!r}")
    async with options.open() as store:
        try:
            result = await replay_dead_letters(store, chosen[0])
        except PartitionsMismatch as exc:
            # Advice in terms of this command line; nothing was replayed.
            raise ConfigurationError(
                f"{target} defines {name!r} with partitions={exc.given}, but the projection "
                f"runs as {exc.recorded} partition(s), so nothing was replayed: point "
                "--projectors at the projectors its hosts run"
            ) from exc
        except DeadLetterNotFound as exc:
            print(f"eventcore-trio: {exc}", file=sys.stderr)
            return EXIT_FAILED
    print(f"replayed {result.replayed}, failed again {result.failed}")
    if result.failed:
        print(
            f"{result.failed} dead letter(s) of {name!r} failed again and were kept; see "
            f"`eventcore-trio dead-letters list {name}`",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def print_grants(args: argparse.Namespace) -> int:
    # No database: what the schema's owner would run for the role (docs/operations.md).
    from ..postgres import runtime_grants

    if args.grant is None:
        raise ConfigurationError("--print prints what --grant ROLE runs: give --grant ROLE")
    for statement in runtime_grants(args.grant, schema=args.schema):
        print(statement)
    return EXIT_OK
