"""How a dedicated session takes, proves and gives back an advisory lock.

The leadership's session (see `_leadership`) is set up here: the settings that make a
vanished host lose its lock in seconds, the locking statement that refuses a shared session,
a standby's wait, the probe that tells session pooling from transaction pooling behind a
proxy, and the release of a lock left on a pooled server session.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import trio

from .._errors import DatabaseError, EventCoreError
from ._bridge import Connection, connect
from ._fence import CHECK_LOCK, HOLDS_ANY_ADVISORY_LOCK, SESSION_HOLDS_LOCK, LockProof

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

# How long one slice of a standby's wait lasts (see wait_for_lock).
STANDBY_WAIT_SLICE: Final = "2s"
LOCK_NOT_AVAILABLE: Final = "55P03"


def lock_session_settings(server_version: int) -> dict[str, str]:
    """Server settings for a lock session on a server of *server_version*, applied once
    connected."""
    settings = {**KEEPALIVE_SETTINGS, **LOCK_SESSION_TIMEOUTS}
    if server_version >= CONNECTION_CHECK_MINIMUM_VERSION:
        settings.update(CONNECTION_CHECK_SETTINGS)
    if server_version >= IDLE_SESSION_TIMEOUT_MINIMUM_VERSION:
        settings["idle_session_timeout"] = "0"
    if server_version >= TRANSACTION_TIMEOUT_MINIMUM_VERSION:
        settings["transaction_timeout"] = "0"
    return settings


_proxied_warned = False


def warn_proxied_once() -> None:
    """Behind a proxy one protection is the proxy's to give: say so once per process."""
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


async def prepare_lock_session(
    connection: Connection, settings: Mapping[str, str], key: int
) -> tuple[int, bool | None]:
    """Apply *settings*, and take lock *key* only if this session held no advisory lock
    before, in one round trip; return the server session's pid and whether it took the
    lock (None: the session already held locks, so it is shared)."""
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


async def wait_for_lock(connection: Connection, key: int) -> tuple[int, bool]:
    """Wait for lock *key* as a standby; return the pid the lock was granted on and False
    when that session already held locks (shared)."""
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
    #
    # The statement that is granted the lock also sets lock_timeout back to 0 (computed from
    # the lock function's row, so only once it is granted): no round trip of its own between
    # the grant and the new leader's first work.
    await connection.execute("SELECT set_config('lock_timeout', $1, false)", STANDBY_WAIT_SLICE)
    while True:
        try:
            row = await connection.fetchrow(
                f"SELECT pg_backend_pid() AS pid, CASE WHEN {HOLDS_ANY_ADVISORY_LOCK} "
                "THEN false ELSE (SELECT pg_catalog.set_config('lock_timeout', '0', false) "
                "IS NOT NULL FROM pg_catalog.pg_advisory_lock($1::bigint)) END AS acquired",
                key,
            )
        except DatabaseError as exc:
            if exc.sqlstate == LOCK_NOT_AVAILABLE:
                continue
            raise
        break
    assert row is not None
    if not row["acquired"]:
        await connection.execute("SELECT set_config('lock_timeout', '0', false)")
    return int(row["pid"]), bool(row["acquired"])


async def probe_pooling(
    dsn: str, proof: LockProof, application_name: str, connect_timeout: float
) -> bool:
    """Whether a second client through the same proxy lands on the lock's session
    (transaction pooling); the probe then releases the lock there."""
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


async def verify_pinned(connection: Connection, proof: LockProof) -> int | None:
    """The session the next statement ran on when it is not the lock's, or None."""
    # After taking the lock: does the next statement still run on the lock's session, which
    # holds it? Returns the session it ran on when it does not.
    row = await connection.fetchrow(CHECK_LOCK, proof.backend_pid, proof.key)
    assert row is not None
    return None if row["held"] else int(row["pid"])


# Unlocking statements that try to land on the lock's pooled session before that session is
# terminated instead. The pauses between them (doubling from the first) give a pooler's reset,
# late on a loaded machine, the chance to free the lock first.
RELEASE_ATTEMPTS: Final = 5
RELEASE_FIRST_PAUSE: Final = 0.01
RELEASE_LONGEST_PAUSE: Final = 0.2
# All a release may take, shielded (it runs as a leadership ends, cancelled or not).
RELEASE_TIMEOUT: Final = 10.0


async def release_proxied(
    connection: Connection, proof: LockProof, reconnect: Callable[[], Awaitable[Connection]]
) -> None:
    """Release the lock of *proof* on a pooled server session that may outlive the
    connection, and return once no server session holds it for *proof* (see below); a lock
    still held after `RELEASE_TIMEOUT` is logged as a warning."""
    # Behind a proxy, closing the client connection does not end the server session: under
    # transaction pooling the lock stays on a pooled session until the pooler resets it, after
    # it has answered the statement that took it (server_reset_query_always), or for good.
    # Unlock it where it is: a statement that runs on that session unlocks, one that runs
    # elsewhere only looks. If a few attempts, some time apart, still find it held, end that
    # session (which also ends whatever another client of the pool is running on it at that
    # moment), and go on looking until it has ended: the lock outlives pg_terminate_backend
    # until the backend acts on it, which a backend starved of CPU does late. Returning before
    # then reported a refusal (or the end of a leadership) while the lock was still held:
    # status showed a leader, and another instance could not take the lock.
    #
    # Only the first statement goes through the lock connection, which under session pooling
    # is the lock's session itself. Under transaction pooling its cached prepared statements
    # exist only on the server session that prepared them, until its reset, so later
    # statements go through a connection without that cache (and so does every statement once
    # the lock connection is gone: a proxy closes clients whose server session died).
    holds = SESSION_HOLDS_LOCK.format(session="$1::int", key="$2::bigint")
    unlock = (
        "SELECT CASE WHEN pg_backend_pid() = $1::int "
        f"THEN NOT pg_advisory_unlock($2::bigint) AND {holds} ELSE {holds} END"
    )
    terminate = f"SELECT CASE WHEN {holds} THEN pg_terminate_backend($1::int) ELSE false END"
    spare: Connection | None = None
    pause = RELEASE_FIRST_PAUSE
    failures = 0
    terminated = False
    with trio.move_on_after(RELEASE_TIMEOUT, shield=True):
        try:
            for attempt in itertools.count():
                if attempt:
                    await trio.sleep(pause)
                    pause = min(2 * pause, RELEASE_LONGEST_PAUSE)
                try:
                    if attempt == 0 and not connection.is_closed():
                        current = connection
                    else:
                        if spare is None or spare.is_closed():
                            spare = await reconnect()
                        current = spare
                    if attempt >= RELEASE_ATTEMPTS and not terminated:
                        ended = await current.fetchval(terminate, proof.backend_pid, proof.key)
                        terminated = True
                        if ended:
                            logger.warning(
                                "ended server session %d behind the proxy with "
                                "pg_terminate_backend: it still held the lock of %r after %d "
                                "attempts to release it there (transaction pooling?)",
                                proof.backend_pid,
                                proof.name,
                                RELEASE_ATTEMPTS,
                            )
                    elif not await current.fetchval(unlock, proof.backend_pid, proof.key):
                        return
                except EventCoreError as exc:
                    logger.debug("releasing the lock of %s: %s", proof.name, exc)
                    failures += 1
                    if failures > RELEASE_ATTEMPTS:
                        break
        finally:
            if spare is not None:
                await spare.close()
    logger.warning(
        "the lock of %r may still be held by server session %d behind the proxy: it could not "
        "be released; end that session (SELECT pg_terminate_backend(%d)) if it still holds it",
        proof.name,
        proof.backend_pid,
        proof.backend_pid,
    )
