"""The store's connection pool, kept on the Trio side.

Handing out a connection is Trio bookkeeping (a semaphore and a list), so a pooled statement
costs exactly one crossing into asyncio: the statement itself. asyncpg's own pool, reached
through trio-asyncio, spent several asyncio scheduler passes per statement on its acquire and
release (its queue, its timeout, its reset), and each pass is dear under trio-asyncio:
measured here, a pooled ``SELECT 1`` ran at 2,200/s through it and at 3,700/s this way.

A connection goes back to the pool only when its session is known to be idle and outside
any transaction. An error the server reported leaves that known. After any other interrupted
use (a cancellation mid-statement, an error raised by the caller's code, a lost connection)
one more statement settles it first: asyncpg makes it wait for the server to finish cancelling, so
the session's state is then known. A session that cannot prove itself idle is terminated
and a new one opened on demand; connections the server closed while idle are replaced.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Concatenate, Final, ParamSpec, TypeVar, final

import attrs
import trio

from .._errors import EventCoreError, StoreClosed, StoreConnectionError
from ._bridge import Connection, Record, connect

P = ParamSpec("P")
T = TypeVar("T")

#: Seconds a connection returned after an interrupted use may take to prove itself idle.
SETTLE_TIMEOUT: Final = 5.0


@attrs.frozen
class SessionOptions:
    """How a store opens connections of its own: where, under which name, how patiently.

    Said once when the store opens and handed to each object that connects (the pool, the
    LISTEN sessions, leaderships, index builds, `PostgresAdmin.connection`).
    """

    #: Where the pool connects (possibly through a transaction-pooling proxy).
    dsn: str
    application_name: str
    connect_timeout: float
    #: asyncpg's prepared-statement cache on pooled connections (0 behind a pooling proxy).
    statement_cache_size: int = 100
    #: Where connections that need a server session of their own connect: past any proxy.
    session_dsn: str = attrs.field(default=attrs.Factory(lambda self: self.dsn, takes_self=True))

    async def connect(self, application_name: str | None = None) -> Connection:
        """A connection to `dsn` opened as the pool's are (named *application_name* when
        given)."""
        return await connect(
            self.dsn,
            application_name=self.application_name
            if application_name is None
            else application_name,
            connect_timeout=self.connect_timeout,
            statement_cache_size=self.statement_cache_size,
        )

    async def connect_session(self, role: str) -> Connection:
        """A dedicated session on `session_dsn`, named after the store and its *role*."""
        return await connect(
            self.session_dsn,
            application_name=f"{self.application_name} {role}",
            connect_timeout=self.connect_timeout,
        )


@final
class Pool:
    """Up to *max_size* connections to one DSN; each statement method acquires one, runs one
    statement (one crossing) and gives it back.

    Safe for any number of Trio tasks: a task that finds every connection in use waits for
    one. Obtain one with `open_pool`.
    """

    def __init__(self, options: SessionOptions, *, max_size: int) -> None:
        self._options = options
        self._slots = trio.Semaphore(max_size)
        # Most recently returned last: the warmest session is reused first, and the others
        # may idle.
        self._idle: list[Connection] = []
        self._closed = False

    async def _take(self) -> Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.is_closed():
                return connection
        return await self._options.connect()

    async def _give_back(self, connection: Connection, exc: BaseException | None) -> None:
        # An error the server sent (a conflict, a constraint, a timeout it enforced) came
        # with its ReadyForQuery: the session's state is known, no settling needed.
        interrupted = exc is not None and (
            not isinstance(exc, EventCoreError)
            or isinstance(exc, StoreConnectionError | StoreClosed)
        )
        if interrupted and not connection.is_closed():
            # A statement may have been cancelled in flight (asyncpg then asks the server to
            # cancel it) or a BEGIN may be unacknowledged: is_in_transaction() would describe
            # the state before it. One more statement waits for any cancellation to finish
            # and proves the session idle, so the check below sees its real state.
            with trio.move_on_after(SETTLE_TIMEOUT, shield=True) as settling:
                try:
                    await connection.execute("SELECT 1")
                except EventCoreError:
                    connection.terminate()
            if settling.cancelled_caught:
                connection.terminate()
        if self._closed or connection.is_closed() or connection.in_transaction():
            connection.terminate()
        else:
            self._idle.append(connection)

    async def _check_out(self) -> Connection:
        # A free slot is taken without a scheduling round: the statement's crossing is the
        # call's checkpoint, and a round here cost a pooled statement a sixth of its rate. A
        # slot is free only when nobody waits for one (Trio's semaphore hands a released
        # slot to its first waiter), so taking it at once is as fair as queueing. An already
        # cancelled caller still stops here, before it takes a connection that would then
        # need settling.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            return await self._take()
        except BaseException:
            self._slots.release()
            raise

    async def _check_in(self, connection: Connection, exc: BaseException | None) -> None:
        try:
            await self._give_back(connection, exc)
        finally:
            self._slots.release()

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Connection]:
        """Hold one connection for the block (for several statements in a row).

        Raises:
            StoreConnectionError: no idle connection, and a new one cannot be opened.
        """
        connection = await self._check_out()
        try:
            yield connection
        except BaseException as exc:
            await self._check_in(connection, exc)
            raise
        await self._check_in(connection, None)

    async def _one(
        self,
        statement: Callable[Concatenate[Connection, str, P], Awaitable[T]],
        sql: str,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        # `acquire` around one statement, without a context manager's own cost (a few
        # microseconds of a pooled statement's hundred and fifty).
        connection = await self._check_out()
        try:
            result = await statement(connection, sql, *args, **kwargs)
        except BaseException as exc:
            await self._check_in(connection, exc)
            raise
        await self._check_in(connection, None)
        return result

    async def fill(self, count: int) -> None:
        """Open connections until *count* are idle (the pool's minimum)."""
        while len(self._idle) < count:
            self._idle.append(await self._options.connect())

    async def close(self) -> None:
        """Close the idle connections gracefully (shielded, bounded); connections still in
        use are terminated when they come back."""
        self._closed = True
        idle, self._idle = self._idle, []
        async with trio.open_nursery() as nursery:
            for connection in idle:
                # Connection.close never raises: it terminates what it cannot close.
                nursery.start_soon(connection.close)

    async def fetch(self, sql: str, *args: object) -> list[Record]:
        """Run *sql* on a pooled connection and return all rows."""
        return await self._one(Connection.fetch, sql, *args)

    async def fetchrow(self, sql: str, *args: object) -> Record | None:
        """Run *sql* on a pooled connection and return the first row."""
        return await self._one(Connection.fetchrow, sql, *args)

    async def fetchval(self, sql: str, *args: object) -> Any:
        """Run *sql* on a pooled connection and return the first column of the first row."""
        return await self._one(Connection.fetchval, sql, *args)

    async def execute(self, sql: str, *args: object) -> str:
        """Run *sql* on a pooled connection (several statements when there are no
        arguments)."""
        return await self._one(Connection.execute, sql, *args)


@asynccontextmanager
async def open_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    application_name: str,
    connect_timeout: float,
    statement_cache_size: int = 100,
) -> AsyncIterator[Pool]:
    """Open a pool with *min_size* connections for the block; closed on exit.

    *statement_cache_size* 0 turns asyncpg's prepared-statement cache off, as a
    transaction-pooling proxy requires.

    Raises:
        StoreConnectionError: the first connections cannot be opened (or a more specific
            `AuthenticationFailed`, `DatabaseNotFound`).
    """
    options = SessionOptions(dsn, application_name, connect_timeout, statement_cache_size)
    async with open_pool_for(options, min_size=min_size, max_size=max_size) as pool:
        yield pool


@asynccontextmanager
async def open_pool_for(
    options: SessionOptions, *, min_size: int, max_size: int
) -> AsyncIterator[Pool]:
    """`open_pool` for connections opened as *options* say."""
    pool = Pool(options, max_size=max_size)
    try:
        await pool.fill(min_size)
        yield pool
    finally:
        with trio.CancelScope(shield=True):
            await pool.close()
