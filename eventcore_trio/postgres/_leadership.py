"""Leadership on PostgreSQL: a session advisory lock on a dedicated connection.

Connection lifetime = lock lifetime. The lock is a *session* lock taken with
``pg_try_advisory_lock`` on a connection opened for it alone (never a pooled one, which could
hand the session, and so the lock, to unrelated work). The lock ends exactly when the session
ends: on release, on a crash of this process (the server notices the closed socket), on
``pg_terminate_backend``, and, when the host vanishes from the network, once the server-side
TCP keepalives below give up (about 15 s).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final, final

import trio

from .._concurrency import background
from .._errors import LeadershipLost, LeadershipUnavailable, StoreConnectionError
from ._bridge import Connection, connect

# Server-side TCP keepalives on the lock connection: idle 5 s, then 3 probes 3 s apart. A
# leader whose machine drops off the network loses its lock after about 14 s.
KEEPALIVE_SETTINGS: Final = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "3",
    "tcp_keepalives_count": "3",
}
# The client-side check: a ping this often, each bounded by PING_TIMEOUT, so a lost lock is
# noticed within about a second even when the server never closes the socket.
PING_INTERVAL: Final = 0.5
PING_TIMEOUT: Final = 1.0


@final
class PostgresLeadership:
    """Leadership of a name, held as a session advisory lock on a dedicated connection.

    Obtained only from ``PostgresStore.try_acquire``. `is_held` turns False, and `wait_lost`
    returns, within about a second of the session ending for any reason.

    .. versionadded:: 0.1
    """

    def __init__(self, name: str, key: int, connection: Connection) -> None:
        self._name = name
        self._key = key
        # The lock-holding session; closing it releases the lock. Owned by try_acquire.
        self._connection = connection
        # Serialises use of the connection between the keepalive and work done under the lock.
        self._connection_lock = trio.Lock()
        # Set once, when the lock is known to be lost or has been released. Never cleared.
        self._lost = trio.Event()

    @property
    def name(self) -> str:
        """The name this leadership was acquired for."""
        return self._name

    @property
    def lock_key(self) -> int:
        """The bigint advisory-lock key held (see `eventcore_trio.postgres` for its derivation)."""
        return self._key

    @property
    def backend_pid(self) -> int:
        """The server process id of the lock-holding session."""
        return self._connection.backend_pid

    @property
    def is_held(self) -> bool:
        """False once the lock is known to be lost or has been released."""
        return not self._lost.is_set()

    async def wait_lost(self) -> None:
        """Return once the lock is lost (the session ended) or released."""
        await self._lost.wait()

    @asynccontextmanager
    async def _use(self) -> AsyncIterator[Connection]:
        # For work that must run on the lock-holding session (fencing: a dead session cannot
        # commit). Raises LeadershipLost instead of running on a session that is gone.
        async with self._connection_lock:
            if not self.is_held:
                raise LeadershipLost(
                    f"leadership of {self._name!r} was lost; nothing more may be committed"
                )
            yield self._connection

    def _mark_lost(self) -> None:
        self._lost.set()

    async def _keepalive(self) -> None:
        while self.is_held:
            await trio.sleep(PING_INTERVAL)
            if self._connection_lock.locked():
                # Work is running on the session; the termination listener still fires.
                continue
            async with self._connection_lock:
                alive = False
                with trio.move_on_after(PING_TIMEOUT):
                    try:
                        alive = await self._connection.fetchval("SELECT 1") == 1
                    except StoreConnectionError:
                        alive = False
            if not alive or self._connection.is_closed():
                self._mark_lost()


@asynccontextmanager
async def acquire_leadership(
    dsn: str,
    *,
    name: str,
    key: int,
    application_name: str,
    connect_timeout: float,
) -> AsyncIterator[PostgresLeadership]:
    """Open a dedicated connection, try the lock once, and hold it for the block."""
    connection = await connect(
        dsn,
        application_name=application_name,
        connect_timeout=connect_timeout,
        server_settings=KEEPALIVE_SETTINGS,
    )
    leadership: PostgresLeadership | None = None
    try:
        acquired = await connection.fetchval("SELECT pg_try_advisory_lock($1)", key)
        if not acquired:
            raise LeadershipUnavailable(name)
        leadership = PostgresLeadership(name, key, connection)
        connection.add_termination_listener(leadership._mark_lost)
        async with background(leadership._keepalive):
            yield leadership
    finally:
        if leadership is not None:
            leadership._mark_lost()
        # Closing ends the session, which releases the lock; shielded and bounded.
        await connection.close()
