"""Leadership on PostgreSQL: a session advisory lock on a dedicated connection.

Connection lifetime = lock lifetime. The lock is a *session* lock taken on a connection opened
for it alone (never a pooled one, which could hand the session, and so the lock, to unrelated
work). The lock ends exactly when the session ends: on release, on a crash of this process
(the server notices the closed socket), on ``pg_terminate_backend``, and, when the host
vanishes from the network, once the server-side TCP keepalives below give up (about 15 s),
also in the middle of a long statement (``client_connection_check_interval``, PostgreSQL 14+).

Batches run on this same session, which is what fences a deposed leader: a session that has
lost its lock is a dead session, and a dead session cannot commit.

That holds only if the connection *is* one server session for its whole life. A proxy in
between (PgBouncer) may break it: with transaction pooling, statements of one connection run
on whichever server session is free. So a lock connection proves what it is (see `_fence`):

1. the session it takes the lock on holds no advisory lock before (a session shared with
   another client, or not reset by a pooler, is refused), checked in the locking statement;
2. behind a proxy (the pid announced at startup is not ``pg_backend_pid()``), a probe
   connection through the same proxy must land on a *different* server session: under
   transaction pooling the just-freed lock session is handed straight to it, which proves the
   pooling mode (and the probe releases the lock on that session, in the same statement);
3. every keepalive and every commit re-checks, in the server, that the statement runs on the
   lock's session and that the session still holds the lock.

A connection found shared is refused with `UnsupportedPooling`, or loses leadership with
`LeadershipLost` naming the cause, and the lock it left on a pooled session is released (by
unlocking on that session, or by terminating it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Final, final

import attrs
import trio

from .._backend._leadership import LeadershipState
from .._errors import (
    DatabaseError,
    EventCoreError,
    LeadershipLost,
    LeadershipUnavailable,
    StoreClosed,
    StoreConnectionError,
    UnsupportedPooling,
)
from .._filters import EventFilter
from .._status import ProjectionState
from .._util import background
from ._appends import AppendStatement
from ._batch import PostgresBatch
from ._bridge import Connection, connect
from ._fence import (
    CHECK_LOCK,
    HOLDS_ANY_ADVISORY_LOCK,
    POOLER_HINT,
    SESSION_HOLDS_LOCK,
    LockProof,
)
from ._subscriptions import Subscriptions, report_arguments, report_statement

logger = logging.getLogger("eventcore_trio.postgres")

# Server-side TCP settings on the lock connection: keepalives (idle 5 s, then 3 probes 3 s
# apart) for a silent connection, and a 15 s limit for data the server sent to be
# acknowledged, since Linux sends no keepalives while sent data is unacknowledged (a reply
# the partition swallowed) and would otherwise retransmit for about 15 minutes. A leader
# whose machine drops off the network loses its lock after about 15 s either way. Behind a
# proxy these watch the proxy's connection, not this host's: the proxy's own keepalive
# settings (PgBouncer: tcp_keepidle, tcp_keepintvl, tcp_keepcnt, tcp_user_timeout) must
# then do that job (docs/operations.md, "Connection poolers").
KEEPALIVE_SETTINGS: Final = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "3",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "15000",
}
# PostgreSQL 14+: while a statement runs, check every 2 s that the client is still there. A
# backend busy in a long statement otherwise notices a vanished client (and frees the lock)
# only when the statement ends, keepalives or not.
CONNECTION_CHECK_SETTINGS: Final = {"client_connection_check_interval": "2s"}
CONNECTION_CHECK_MINIMUM_VERSION: Final = 140000
# Timeouts a role or database may set (ALTER DATABASE ... SET statement_timeout) that must not
# apply to a lock session: a standby waits in pg_advisory_lock for as long as the leader lives,
# and a session the server ends for idling (between keepalives, or in a slow handler's
# transaction) is a lost lock and a needless failover. The library ends its own transactions
# (rolled back, shielded, on any doubt), so the idle-in-transaction guard is not needed here;
# handlers bound their own work with cancel scopes or SET LOCAL statement_timeout.
LOCK_SESSION_TIMEOUTS: Final = {
    "statement_timeout": "0",
    "lock_timeout": "0",
    "idle_in_transaction_session_timeout": "0",
}
IDLE_SESSION_TIMEOUT_MINIMUM_VERSION: Final = 140000
TRANSACTION_TIMEOUT_MINIMUM_VERSION: Final = 170000

# How long one slice of a standby's wait lasts (see _wait_for_lock).
STANDBY_WAIT_SLICE: Final = "2s"
LOCK_NOT_AVAILABLE: Final = "55P03"

# The client-side check: a ping this often, each bounded by PING_TIMEOUT, so a lost lock is
# noticed within about a second even when the server never closes the socket.
PING_INTERVAL: Final = 0.5
PING_TIMEOUT: Final = 1.0


@attrs.frozen
class LeadershipContext:
    """What a leadership needs from its store: its tables and the server's version."""

    subscriptions: Subscriptions
    server_version: int = 0
    # The append statement, and what wakes readers after a batch that appended commits.
    append_statement: AppendStatement | None = None
    on_appended: Callable[[], None] | None = None

    @property
    def lock_session_settings(self) -> dict[str, str]:
        """Server settings for a lock session on this server, applied once connected."""
        settings = {**KEEPALIVE_SETTINGS, **LOCK_SESSION_TIMEOUTS}
        if self.server_version >= CONNECTION_CHECK_MINIMUM_VERSION:
            settings.update(CONNECTION_CHECK_SETTINGS)
        if self.server_version >= IDLE_SESSION_TIMEOUT_MINIMUM_VERSION:
            settings["idle_session_timeout"] = "0"
        if self.server_version >= TRANSACTION_TIMEOUT_MINIMUM_VERSION:
            settings["transaction_timeout"] = "0"
        return settings


@final
class PostgresLeadership(LeadershipState):
    """Leadership of a name, held as a session advisory lock on a dedicated connection.

    Obtained only from ``PostgresStore.try_acquire`` and ``wait_acquire``. `is_held` turns
    False, and `wait_lost` returns, within about a second of the session ending or of the
    lock no longer being provably this session's (see `lost_reason`).

    .. versionadded:: 0.1
    """

    def __init__(
        self, proof: LockProof, connection: Connection, context: LeadershipContext
    ) -> None:
        super().__init__(proof.name)
        # Which server session took the lock; re-checked by every keepalive and commit.
        self._proof = proof
        # The lock-holding session; closing it releases the lock. Owned by acquire_leadership.
        self._connection = connection
        self._context = context
        # Serialises use of the connection between the keepalive and work done under the lock.
        self._connection_lock = trio.Lock()

    @property
    def lock_key(self) -> int:
        """The bigint advisory-lock key held (see `projector_lock_key`)."""
        return self._proof.key

    @property
    def backend_pid(self) -> int:
        """The server process id of the lock-holding session (``pg_backend_pid()``)."""
        return self._proof.backend_pid

    @asynccontextmanager
    async def open_batch(self) -> AsyncIterator[PostgresBatch]:
        """Open a transaction on the lock-holding session; commit when the block ends.

        The commit is fenced: it happens only if this session still holds the lock.

        Raises:
            LeadershipLost: the lock was lost before the batch or while it ran (the
                transaction did not commit).
            BatchInterrupted: a statement of the batch was interrupted mid-flight; the
                batch rolled back.
        """
        async with self._use() as connection:
            batch = PostgresBatch(
                connection,
                self._proof,
                self._context.subscriptions,
                self.mark_lost,
                append_statement=self._context.append_statement,
                on_appended=self._context.on_appended,
            )
            try:
                try:
                    yield batch
                    await batch._commit()
                except BaseException:
                    await batch._rollback()
                    raise
            except Exception as exc:
                # Whatever failed (a statement through ctx.db, the projector, the commit): if
                # the session is gone, the lock is gone too, and that is what the caller must
                # hear. The rollback closes the connection when it cannot complete, so
                # is_closed() is reliable here. A live session that reported an error still
                # holds its lock: that error is the caller's to handle, not a lost lock.
                if connection.is_closed():
                    self.mark_lost()
                    raise LeadershipLost(
                        f"the lock session of {self.name!r} ended during a batch; the batch "
                        "did not commit and another instance may lead now"
                    ) from exc
                raise

    async def report(
        self,
        state: ProjectionState,
        *,
        error: str | None = None,
        filter: EventFilter | None = None,
    ) -> None:
        """Record this leader's state, identity and filter in ``subscriptions``."""
        async with self._use() as connection:
            await connection.execute(
                report_statement(self._context.subscriptions.table),
                *report_arguments(self.name, state, error, filter, self._proof.backend_pid),
            )

    @asynccontextmanager
    async def _use(self) -> AsyncIterator[Connection]:
        # For work that must run on the lock-holding session (fencing: a dead session cannot
        # commit). Raises LeadershipLost instead of running on a session that is gone.
        async with self._connection_lock:
            if not self.is_held:
                raise LeadershipLost(
                    self._lost_reason
                    or f"leadership of {self.name!r} was lost; nothing more may be committed"
                )
            yield self._connection

    async def _keepalive(self) -> None:
        proof = self._proof
        while self.is_held:
            await trio.sleep(PING_INTERVAL)
            if self._connection_lock.locked():
                # Work is running on the session; the termination listener still fires, and
                # the work's commit is fenced.
                continue
            async with self._connection_lock:
                row = None
                with trio.move_on_after(PING_TIMEOUT):
                    # StoreClosed: the store's loop closed under this leadership.
                    with contextlib.suppress(StoreConnectionError, StoreClosed):
                        row = await self._connection.fetchrow(
                            CHECK_LOCK, proof.backend_pid, proof.key
                        )
            if row is None or self._connection.is_closed():
                self.mark_lost()
            elif not row["held"]:
                self.mark_lost(proof.describe_loss(row["pid"]))


_proxied_warned = False


def _warn_proxied_once() -> None:
    # Behind a proxy one protection is the proxy's to give: say so once per process.
    global _proxied_warned
    if not _proxied_warned:
        _proxied_warned = True
        logger.warning(
            "lock sessions go through a proxy (a pooler such as PgBouncer): PostgreSQL's "
            "keepalives then watch the proxy, not this host, so a host that vanishes from the "
            "network keeps its locks until the proxy notices; set the proxy's TCP keepalives "
            "(PgBouncer: tcp_keepidle, tcp_keepintvl, tcp_keepcnt, tcp_user_timeout; see "
            "docs/operations.md)"
        )


async def _prepare_lock_session(
    connection: Connection, context: LeadershipContext, key: int
) -> tuple[int, bool | None]:
    # One round trip: the session settings, which server session this is, and the lock
    # itself, taken only if this session held no advisory lock before (else NULL).
    settings = context.lock_session_settings
    assignments = ", ".join(
        f"set_config(${i}, ${i + 1}, false)" for i in range(2, 2 * len(settings) + 2, 2)
    )
    row = await connection.fetchrow(
        f"SELECT pg_backend_pid() AS pid, {assignments}, "
        f"CASE WHEN {HOLDS_ANY_ADVISORY_LOCK} THEN NULL "
        "ELSE pg_catalog.pg_try_advisory_lock($1::bigint) END AS acquired",
        key,
        *[part for item in settings.items() for part in item],
    )
    assert row is not None
    return int(row["pid"]), row["acquired"]


async def _wait_for_lock(connection: Connection, key: int) -> tuple[int, bool]:
    # Standby: block in the server until the leader's session ends, which grants the lock at
    # once (fast failover). Cancellation cancels the query. Re-checks that the session is
    # not shared, in the same statement, for a proxy may have moved it.
    #
    # The wait comes in slices of STANDBY_WAIT_SLICE (lock_timeout), because a statement
    # holds a snapshot for as long as it runs: one waiting for hours would hold back
    # VACUUM's horizon all that time, and CREATE INDEX CONCURRENTLY anywhere in the
    # database waits for every older snapshot to go, so it would hang until the leader
    # died. Between slices the wait starts again at once; a lock released in that gap is
    # simply granted to the next slice.
    await connection.execute("SELECT set_config('lock_timeout', $1, false)", STANDBY_WAIT_SLICE)
    while True:
        try:
            row = await connection.fetchrow(
                f"SELECT pg_backend_pid() AS pid, CASE WHEN {HOLDS_ANY_ADVISORY_LOCK} "
                "THEN false ELSE (SELECT true FROM pg_catalog.pg_advisory_lock($1::bigint)) "
                "END AS acquired",
                key,
            )
        except DatabaseError as exc:
            if exc.sqlstate == LOCK_NOT_AVAILABLE:
                continue
            raise
        break
    assert row is not None
    await connection.execute("SELECT set_config('lock_timeout', '0', false)")
    return int(row["pid"]), bool(row["acquired"])


async def _probe_pooling(
    dsn: str, proof: LockProof, application_name: str, connect_timeout: float
) -> bool:
    # Behind a proxy: does a second client get the lock's server session? Under session
    # pooling never (that session is ours until we disconnect); under transaction pooling it
    # usually does, since PgBouncer hands out the most recently freed server session. If so,
    # the probe releases the lock there, in the same statement, before anyone else runs on it.
    probe = await connect(
        dsn,
        application_name=f"{application_name} probe",
        connect_timeout=connect_timeout,
        statement_cache_size=0,
    )
    try:
        row = await probe.fetchrow(
            "SELECT pg_backend_pid() = $1::int AS shared, CASE WHEN pg_backend_pid() = $1::int "
            "THEN pg_advisory_unlock($2::bigint) END AS released",
            proof.backend_pid,
            proof.key,
        )
    finally:
        await probe.close()
    return row is not None and bool(row["shared"])


async def _verify_pinned(connection: Connection, proof: LockProof) -> int | None:
    # After taking the lock: does the next statement still run on the lock's session, which
    # holds it? Returns the session it ran on when it does not.
    row = await connection.fetchrow(CHECK_LOCK, proof.backend_pid, proof.key)
    assert row is not None
    return None if row["held"] else int(row["pid"])


# Statements that try to land on the lock's pooled session before it is terminated instead.
RELEASE_ATTEMPTS: Final = 5


async def _release_proxied(
    connection: Connection, proof: LockProof, reconnect: Callable[[], Awaitable[Connection]]
) -> None:
    # Behind a proxy, closing the client connection does not end the server session: under
    # transaction pooling the lock would stay on a pooled session for good. Unlock it where it
    # is: a statement that runs on that session unlocks, one that runs elsewhere only looks.
    # If none of a few attempts lands there, end that session as a last resort (which also
    # ends whatever another client of the pool is running on it at that moment). The lock
    # connection itself may be gone (a proxy closes clients whose server session died), so
    # attempts go through a new connection then.
    holds = SESSION_HOLDS_LOCK.format(session="$1::int", key="$2::bigint")
    spare: Connection | None = None
    with trio.move_on_after(10, shield=True):
        try:
            for attempt in range(RELEASE_ATTEMPTS + 1):
                try:
                    if connection.is_closed() and (spare is None or spare.is_closed()):
                        spare = await reconnect()
                    current = spare if connection.is_closed() and spare is not None else connection
                    if attempt < RELEASE_ATTEMPTS:
                        sql = (
                            "SELECT CASE WHEN pg_backend_pid() = $1::int "
                            f"THEN NOT pg_advisory_unlock($2::bigint) AND {holds} "
                            f"ELSE {holds} END"
                        )
                    else:
                        sql = f"SELECT pg_terminate_backend($1::int) AND false WHERE {holds}"
                    if not await current.fetchval(sql, proof.backend_pid, proof.key):
                        return
                except EventCoreError as exc:
                    logger.debug("releasing the lock of %s: %s", proof.name, exc)
        finally:
            if spare is not None:
                await spare.close()


@asynccontextmanager
async def acquire_leadership(
    dsn: str,
    *,
    name: str,
    key: int,
    context: LeadershipContext,
    application_name: str,
    connect_timeout: float,
    wait: bool,
    on_standby: Callable[[], None] | None = None,
) -> AsyncIterator[PostgresLeadership]:
    """Open a dedicated connection, take the lock (or wait for it), hold it for the block.

    Raises:
        LeadershipUnavailable: another session holds the lock and *wait* is False.
        UnsupportedPooling: the connection does not own a server session of its own.
    """
    connection = await connect(
        dsn, application_name=application_name, connect_timeout=connect_timeout
    )
    leadership: PostgresLeadership | None = None
    proof: LockProof | None = None
    try:
        pid, acquired = await _prepare_lock_session(connection, context, key)
        proxied = pid != connection.backend_pid
        if acquired is None:
            raise UnsupportedPooling(
                f"cannot lead {name!r}: the server session behind the leadership connection "
                f"already holds advisory locks, so it is shared with another client; {POOLER_HINT}"
            )
        if not acquired:
            if not wait:
                raise LeadershipUnavailable(name)
            if on_standby is not None:
                on_standby()
            pid, acquired = await _wait_for_lock(connection, key)
            if not acquired:
                raise UnsupportedPooling(
                    f"cannot lead {name!r}: the standby's statement ran on a server session "
                    f"that already holds advisory locks; {POOLER_HINT}"
                )
        proof = LockProof(name=name, key=key, backend_pid=pid, proxied=proxied)
        if proxied:
            _warn_proxied_once()
            if await _probe_pooling(dsn, proof, application_name, connect_timeout):
                proof = None  # the probe released the lock on the shared session
                raise UnsupportedPooling(f"cannot lead {name!r}: {POOLER_HINT}")
            moved_to = await _verify_pinned(connection, proof)
            if moved_to is not None:
                raise UnsupportedPooling(f"cannot lead: {proof.describe_loss(moved_to)}")
        leadership = PostgresLeadership(proof, connection, context)
        connection.add_termination_listener(leadership.mark_lost)
        async with background(leadership._keepalive):
            yield leadership
    finally:
        if leadership is not None:
            leadership.mark_lost()
        if proof is not None and proof.proxied:
            await _release_proxied(
                connection,
                proof,
                functools.partial(
                    connect,
                    dsn,
                    application_name=application_name,
                    connect_timeout=connect_timeout,
                    statement_cache_size=0,
                ),
            )
        # Closing ends the session, which releases the lock; shielded and bounded.
        await connection.close()


# Takes every lock of the bigint array $1 that nobody holds or waits for, without waiting;
# true when it took all of them. (Polymorphic built-ins are qualified: a look-alike of exact
# argument types in a schema on the search path would win over pg_catalog's.)
_TRY_LOCKS: Final = (
    "SELECT count(*) FILTER (WHERE pg_try_advisory_lock(k)) "
    "= pg_catalog.cardinality($1::bigint[]) FROM pg_catalog.unnest($1::bigint[]) AS k"
)
# Whether the current session holds every lock of the bigint array $1.
_HOLDS_LOCKS: Final = (
    "SELECT coalesce(bool_and("
    + SESSION_HOLDS_LOCK.format(session="pg_backend_pid()", key="k")
    + "), true) FROM pg_catalog.unnest($1::bigint[]) AS k"
)

# Releases the locks of the bigint array $1 that the current session holds.
_UNLOCK_HELD: Final = (
    "SELECT pg_advisory_unlock(k) FROM pg_catalog.unnest($1::bigint[]) AS k WHERE "
    + SESSION_HOLDS_LOCK.format(session="pg_backend_pid()", key="k")
)


@asynccontextmanager
async def try_acquire_all(
    dsn: str,
    *,
    names: Sequence[str],
    keys: Sequence[int],
    context: LeadershipContext,
    application_name: str,
    connect_timeout: float,
) -> AsyncIterator[PostgresLeadership]:
    """Hold the locks *keys* (of the units *names*) on one dedicated session, all or none.

    Never waits for a lock, so it never enters a lock's queue: a lock that another session
    holds or waits for makes it give up at once, keeping none (closing the session releases
    any it took). The first lock is taken as `acquire_leadership` takes one (with its proof
    that the session is not shared), the others in one statement on the same session. Work
    that must commit only while every lock is held runs in `fenced_transaction`.

    Raises:
        LeadershipUnavailable: some lock is held or waited for by another session.
        UnsupportedPooling: the connection does not own a server session of its own.
    """
    async with acquire_leadership(
        dsn,
        name=names[0],
        key=keys[0],
        context=context,
        application_name=application_name,
        connect_timeout=connect_timeout,
        wait=False,
    ) as leadership:
        others = list(keys[1:])
        try:
            async with leadership._use() as connection:
                taken = await connection.fetchval(_TRY_LOCKS, others)
            if not taken:
                raise LeadershipUnavailable(", ".join(names))
            yield leadership
        finally:
            if leadership._proof.proxied and others:
                # Behind a proxy the server session may outlive the connection: release
                # the other locks where they are (acquire_leadership releases the first).
                with trio.move_on_after(5, shield=True), contextlib.suppress(EventCoreError):
                    async with leadership._use() as connection:
                        await connection.execute(_UNLOCK_HELD, others)


@asynccontextmanager
async def fenced_transaction(
    leadership: PostgresLeadership, keys: Sequence[int]
) -> AsyncIterator[Connection]:
    """A transaction on *leadership*'s session that commits only while that session holds
    every lock of *keys* (from `try_acquire_all`).

    The check runs inside the transaction, on the session that commits it: that session's
    locks are released only by itself or by its end, and its end aborts the transaction, so
    the locks are held from the check through the commit.

    Raises:
        LeadershipLost: the session no longer holds one of the locks; nothing is committed.
    """
    async with leadership._use() as connection, connection.transaction():
        if not await connection.fetchval(_HOLDS_LOCKS, list(keys)):
            raise LeadershipLost(
                f"the locks of {leadership.name!r} and the units taken with it are no longer "
                "all held by their session; nothing was committed"
            )
        yield connection
