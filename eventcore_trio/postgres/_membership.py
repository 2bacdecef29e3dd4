"""The host registry on PostgreSQL: the ``hosts`` table, proven alive by advisory locks.

A balancing host holds a session advisory lock of its own (its membership lock, on a
dedicated connection, like a unit's) and writes a row naming that lock's session. A row
counts only while that session holds that lock, so a host that dies (kill -9, a lost
network) drops out of every view the moment the server ends its session, without a
heartbeat timeout. Rows of dead hosts are deleted by whoever sees them.

Whether a unit is led is read from ``pg_locks`` too, in the same statement (a granted lock
on its key), not from what hosts published, which may lag by a moment.

A row also says which units its host runs (``runs``, written once at registration: a host's
projectors do not change while it lives; NULL for a host of a version that did not say), so
that every host plans each unit over the hosts that can run it, and status can name the live
hosts that lack a unit.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from typing import final

import attrs
import trio

from .._errors import EventCoreError
from .._status import ClusterView, HostState, LeaderInfo, LiveHost
from ._bridge import Record
from ._fence import LOCK_HELD, SESSION_HOLDS_LOCK
from ._keys import host_lock_key, projector_lock_key
from ._leadership import LeadershipContext, PostgresLeadership, acquire_leadership
from ._listener import Listener
from ._pool import Pool, SessionOptions
from ._schema import channel_name


@final
@attrs.define(eq=False, slots=False, repr=False, kw_only=True)
class PostgresMembership:
    """A host's registration; obtained from ``PostgresStore.register_host``.

    .. versionadded:: 0.2
    """

    _pool: Pool
    _schema: str
    _host_id: str
    _leadership: PostgresLeadership
    _listener: Listener

    def __attrs_post_init__(self) -> None:
        schema = self._schema
        table = f'"{schema}".hosts'
        live = SESSION_HOLDS_LOCK.format(session="h.backend_pid", key="h.lock_key")
        # One statement: which units are held, and every listed host (whether alive or
        # not); the join keeps one row when no host is listed.
        self._sql_view = (
            f"SELECT ARRAY(SELECT k FROM pg_catalog.unnest($1::bigint[]) AS k "
            f"WHERE {LOCK_HELD.format(key='k')}) AS held, "
            f"h.host_id, h.leads, h.stands_by, h.runs, {live} AS live "
            f"FROM (SELECT 1) AS one LEFT JOIN {table} h ON true"
        )
        self._sql_forget = f"DELETE FROM {table} h WHERE host_id = ANY($1::text[]) AND NOT {live}"
        self._sql_publish = (
            f"WITH row AS (UPDATE {table} SET leads = $2, stands_by = $3, "
            "updated_at = now() WHERE host_id = $1 RETURNING 1) "
            "SELECT pg_notify($4, $1) FROM row"
        )

    @property
    def host_id(self) -> str:
        """This host's id."""
        return self._host_id

    @property
    def is_held(self) -> bool:
        """False once the membership lock's session ended."""
        return self._leadership.is_held

    async def publish(self, leading: frozenset[str], standing_by: frozenset[str]) -> None:
        """Record what this host leads and stands by for, and wake the other hosts."""
        await self._pool.execute(
            self._sql_publish,
            self._host_id,
            sorted(leading),
            sorted(standing_by),
            hosts_channel(self._schema),
        )

    async def view(self, units: Sequence[str]) -> ClusterView:
        """The live hosts and which of *units* are led, from one statement."""
        keys = {projector_lock_key(self._schema, unit): unit for unit in units}
        rows = await self._pool.fetch(self._sql_view, list(keys))
        listed = [row for row in rows if row["host_id"] is not None]
        dead = [row["host_id"] for row in listed if not row["live"]]
        if dead:
            await self._pool.execute(self._sql_forget, dead)
        return ClusterView(
            hosts={row["host_id"]: _host_state(row) for row in listed if row["live"]},
            held=frozenset(keys[key] for key in rows[0]["held"]),
        )

    async def wait_changed(self) -> None:
        """Return at the next NOTIFY on the hosts channel (or a LISTEN reconnect)."""
        await self._listener.wait()


def _host_state(row: Record) -> HostState:
    runs = row["runs"]
    return HostState(
        frozenset(row["leads"]),
        frozenset(row["stands_by"]),
        None if runs is None else frozenset(runs),
    )


async def live_hosts(pool: Pool, schema: str) -> list[LiveHost]:
    """Every live host: who it is and what it published, oldest first (host id breaks ties).

    Rows of dead hosts are skipped, not deleted: an operator's read changes nothing (the
    hosts' own views delete them).
    """
    live = SESSION_HOLDS_LOCK.format(session="h.backend_pid", key="h.lock_key")
    rows = await pool.fetch(
        f"SELECT h.host_id, h.joined_at, h.leads, h.stands_by, h.runs, h.pid, h.hostname, "
        f'h.application FROM "{schema}".hosts h WHERE {live} ORDER BY h.joined_at, h.host_id'
    )
    return [
        LiveHost(
            host_id=row["host_id"],
            process=LeaderInfo(
                pid=row["pid"] or 0,
                host=row["hostname"] or "",
                application_name=row["application"] or "",
            ),
            joined_at=row["joined_at"],
            state=_host_state(row),
        )
        for row in rows
    ]


def hosts_channel(schema: str) -> str:
    """The channel on which hosts announce joins, departures and publications."""
    return channel_name(schema, "_hosts")


@asynccontextmanager
async def register_host(
    *,
    pool: Pool,
    schema: str,
    options: SessionOptions,
    context: LeadershipContext,
    listener: Listener,
    runs: Collection[str] | None = None,
) -> AsyncIterator[PostgresMembership]:
    """Take a membership lock, list the host with the units it *runs*, and unlist it when
    the block ends."""
    host_id = uuid.uuid4().hex
    table = f'"{schema}".hosts'
    async with acquire_leadership(
        options.session_dsn,
        name=f"host {host_id}",
        key=host_lock_key(schema, host_id),
        context=context,
        application_name=f"{options.application_name} host",
        connect_timeout=options.connect_timeout,
        wait=False,
    ) as leadership:
        await pool.execute(
            f"INSERT INTO {table} (host_id, backend_pid, lock_key, pid, hostname, application, "
            "runs) VALUES ($1, $2, $3, $4, $5, $6, $7::text[])",
            host_id,
            leadership.backend_pid,
            leadership.lock_key,
            os.getpid(),
            socket.gethostname(),
            options.application_name,
            None if runs is None else sorted(runs),
        )
        try:
            await pool.execute("SELECT pg_notify($1, $2)", hosts_channel(schema), host_id)
            yield PostgresMembership(
                pool=pool,
                schema=schema,
                host_id=host_id,
                leadership=leadership,
                listener=listener,
            )
        finally:
            # Best effort: a row left behind (the database is gone) is ignored by everyone
            # once the lock is, and deleted by the next host that sees it.
            with trio.move_on_after(5, shield=True), contextlib.suppress(EventCoreError):
                await pool.execute(
                    f"WITH gone AS (DELETE FROM {table} WHERE host_id = $1 RETURNING 1) "
                    "SELECT pg_notify($2, $1) FROM gone",
                    host_id,
                    hosts_channel(schema),
                )
