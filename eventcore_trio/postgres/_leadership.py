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
unlocking on that session, or by terminating it) before either is raised: the refusal never
leaves a lock that status would show, or that would keep another instance from leading.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Final, final

import attrs
import trio

from .._backend._leadership import LeadershipState
from .._errors import (
    EventCoreError,
    LeadershipLost,
    LeadershipUnavailable,
    StoreClosed,
    StoreConnectionError,
    UnsupportedPooling,
)
from .._filters import EventFilter
from .._partitions import Unit
from .._status import ProjectionState
from .._util import background
from .._versions import read_model_schema_name, split_versioned
from ._appends import AppendStatement
from ._batch import PostgresBatch
from ._bridge import Connection, connect
from ._fence import CHECK_LOCK, HOLDS_LOCKS, POOLER_HINT, TRY_LOCKS, UNLOCK_HELD, LockProof
from ._keys import read_model_lock_key
from ._lock_session import (
    lock_session_settings,
    prepare_lock_session,
    probe_pooling,
    release_proxied,
    verify_pinned,
    wait_for_lock,
    warn_proxied_once,
)
from ._subscriptions import Subscriptions, report_arguments, report_statement
from ._versions import create_read_model_schema, search_path_begin

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
        return lock_session_settings(self.server_version)


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
        # Whether this leadership made sure its read-model schema exists: nothing drops it
        # while the lock is held (a reset or a retire takes the lock first).
        self._schema_ready = False

    def _read_model_schema(self) -> str:
        # The unit's projection gives the projector's name and the version.
        name, version = split_versioned(Unit.parse(self.name).projection)
        return read_model_schema_name(self._context.subscriptions.schema, name, version)

    @property
    def lock_key(self) -> int:
        """The bigint advisory-lock key held (see `projector_lock_key`)."""
        return self._proof.key

    @property
    def backend_pid(self) -> int:
        """The server process id of the lock-holding session (``pg_backend_pid()``)."""
        return self._proof.backend_pid

    @asynccontextmanager
    async def open_batch(self, *, read_model: bool = False) -> AsyncIterator[PostgresBatch]:
        """Open a transaction on the lock-holding session; commit when the block ends.

        The commit is fenced: it happens only if this session still holds the lock.

        Args:
            read_model: run the batch in the read-model schema of the unit's projection
                version (`read_model_schema_name`): the schema is created if missing (once
                per leadership), and the transaction puts it first on its ``search_path``,
                before the session's own, so that unqualified names in ``ctx.db`` land in
                it. It costs no extra round trip: the same one that sends BEGIN sets the
                path, and a batch that writes nothing through ``ctx.db`` sends neither.

        Raises:
            LeadershipLost: the lock was lost before the batch or while it ran (the
                transaction did not commit).
            BatchInterrupted: a statement of the batch was interrupted mid-flight; the
                batch rolled back.
            ConfigurationError: *read_model* and the schema is missing, and this role may
                not create it.

        .. versionchanged:: 0.4
           *read_model*.
        """
        async with self._use() as connection:
            begin = setup_lock = None
            if read_model:
                schema = self._read_model_schema()
                if not self._schema_ready:
                    await create_read_model_schema(connection, schema, self.name)
                    self._schema_ready = True
                begin = search_path_begin(schema)
                setup_lock = read_model_lock_key(self._context.subscriptions.schema, schema)
            batch = PostgresBatch(
                connection,
                self._proof,
                self._context.subscriptions,
                self.mark_lost,
                append_statement=self._context.append_statement,
                on_appended=self._context.on_appended,
                begin=begin,
                setup_lock=setup_lock,
            )
            try:
                async with batch:
                    yield batch
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

    async def record_report(
        self, state: ProjectionState, error: str | None, filter: EventFilter | None
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
                # A holder being cancelled (a stop) hears that, not the loss the stop caused:
                # the keepalive ends the session as the stop begins, and this task may have
                # been handed the connection in the same step.
                await trio.lowlevel.checkpoint_if_cancelled()
                raise LeadershipLost(
                    self._lost_reason
                    or f"leadership of {self.name!r} was lost; nothing more may be committed"
                )
            yield self._connection

    async def _keepalive(self) -> None:
        try:
            await self._ping_while_held()
        finally:
            self._end_session()

    def _end_session(self) -> None:
        # The keepalive ends when the holder's block does, or is cancelled with it (a host
        # stopping on SIGTERM): the lock session is told to end here, before the holder has
        # unwound (a statement in flight answering its cancellation, the batch's rollback,
        # the close and its reply), so that a standby takes over at once, as after a crash.
        # The server reads the message after the statement it may be running: a COMMIT
        # already sent completes first (its checkpoint with it), any other open transaction
        # rolls back, and nothing runs on the session after. Behind a proxy the server
        # session outlives the connection, and acquire_leadership releases the lock on it
        # instead.
        if not self._proof.proxied:
            self.mark_lost()
            self._connection.end_now()

    async def _ping_while_held(self) -> None:
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
        pid, acquired = await prepare_lock_session(connection, context.lock_session_settings, key)
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
            pid, acquired = await wait_for_lock(connection, key)
            if not acquired:
                raise UnsupportedPooling(
                    f"cannot lead {name!r}: the standby's statement ran on a server session "
                    f"that already holds advisory locks; {POOLER_HINT}"
                )
        proof = LockProof(name=name, key=key, backend_pid=pid, proxied=proxied)
        if proxied:
            warn_proxied_once()
            if await probe_pooling(dsn, proof, application_name, connect_timeout):
                proof = None  # the probe released the lock on the shared session
                raise UnsupportedPooling(f"cannot lead {name!r}: {POOLER_HINT}")
            moved_to = await verify_pinned(connection, proof)
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
            await release_proxied(
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
                taken = await connection.fetchval(TRY_LOCKS, others)
            if not taken:
                raise LeadershipUnavailable(", ".join(names))
            yield leadership
        finally:
            if leadership._proof.proxied and others:
                # Behind a proxy the server session may outlive the connection: release
                # the other locks where they are (acquire_leadership releases the first).
                with trio.move_on_after(5, shield=True), contextlib.suppress(EventCoreError):
                    async with leadership._use() as connection:
                        await connection.execute(UNLOCK_HELD, others)


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
        if not await connection.fetchval(HOLDS_LOCKS, list(keys)):
            raise LeadershipLost(
                f"the locks of {leadership.name!r} and the units taken with it are no longer "
                "all held by their session; nothing was committed"
            )
        yield connection
