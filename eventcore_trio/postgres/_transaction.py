"""Appends in the caller's transaction (the outbox pattern): `PostgresStore.transaction`.

The application writes its own rows and appends events in one transaction it controls.
Readers never skip those events, however long the transaction held an id before appending:
at READ COMMITTED its appends take the path of a writer that had an id before it announced
itself; at a stricter level it announces itself when it begins (docs/postgres.md, "The read
horizon"), and holds readers back from then on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, Literal, TypeVar, final

from .._errors import DatabaseError, InvalidArgument
from .._events import AppendResult, StreamAppend
from .._protocols import OneStreamAppend
from ._appends import AppendStatement, append_result
from ._bridge import Connection, Record
from ._pool import Pool

T = TypeVar("T")

Isolation = Literal["read committed", "repeatable read", "serializable"]
_ISOLATIONS: Final = ("read committed", "repeatable read", "serializable")


@final
class PostgresTransaction(OneStreamAppend):
    """One transaction of the application's, with appends: from `PostgresStore.transaction`.

    Run your own statements (``execute``, ``fetch``, …) and appends (``append``,
    ``append_atomic``, with expected versions as on the store) in any order; everything
    commits when the ``async with`` block ends, or nothing does. A statement that fails
    (a `VersionConflict`, say) leaves the transaction unusable: PostgreSQL refuses the rest,
    and the block ends with the error even if you caught it, since nothing can commit.

    .. versionadded:: 0.3
    """

    def __init__(self, connection: Connection, append_statement: AppendStatement) -> None:
        self._connection = connection
        self._append_statement = append_statement
        self._failure: BaseException | None = None
        self._appended = False

    async def _run(self, call: Callable[..., Any], *args: Any) -> Any:
        if self._failure is not None:
            raise DatabaseError(
                "an earlier statement of this transaction failed, so it can only roll back; "
                f"end the block (the failure: {self._failure!r})"
            ) from self._failure
        try:
            return await call(*args)
        except BaseException as exc:
            self._failure = exc
            raise

    async def execute(self, sql: str, *args: object) -> str:
        """Run a statement of your own; return its status tag."""
        result: str = await self._run(self._connection.execute, sql, *args)
        return result

    async def executemany(self, sql: str, args: Iterable[Sequence[object]]) -> None:
        """Run a statement once per argument tuple (pipelined)."""
        await self._run(self._connection.executemany, sql, args)

    async def fetch(self, sql: str, *args: object) -> list[Record]:
        """Run a query; every row."""
        rows: list[Record] = await self._run(self._connection.fetch, sql, *args)
        return rows

    async def fetchrow(self, sql: str, *args: object) -> Record | None:
        """Run a query; its first row, or None."""
        row: Record | None = await self._run(self._connection.fetchrow, sql, *args)
        return row

    async def fetchval(self, sql: str, *args: object) -> Any:
        """Run a query; the first column of its first row."""
        return await self._run(self._connection.fetchval, sql, *args)

    async def append_atomic(self, appends: Sequence[StreamAppend]) -> AppendResult:
        """Append to several streams in this transaction (see `EventStore.append_atomic`);
        `append` for one stream.

        The result's position is where the events will be once the transaction commits.

        Raises:
            VersionConflict: a stream's version is not its expected version; the
                transaction can then only roll back.
        """
        # Personal fields sealed first, their subjects' keys made in transactions of their
        # own (a key must outlive this transaction's rollback: another may use it).
        sql, args = self._append_statement(await self._append_statement.seal(appends))
        row = await self._run(self._connection.fetchrow, sql, *args)
        self._appended = True
        return append_result(row, args)


@asynccontextmanager
async def open_transaction(
    pool: Pool,
    schema: str,
    append_statement: AppendStatement,
    on_appended: Callable[[], None],
    isolation: Isolation,
) -> AsyncIterator[PostgresTransaction]:
    """A transaction on a pooled connection for the block (see `PostgresStore.transaction`)."""
    if isolation not in _ISOLATIONS:
        raise InvalidArgument(
            f"isolation must be one of {', '.join(_ISOLATIONS)}; got {isolation!r}"
        )
    async with pool.acquire() as connection:
        await connection.execute(f"BEGIN ISOLATION LEVEL {isolation.upper()}")
        transaction = PostgresTransaction(connection, append_statement)
        try:
            if isolation != "read committed":
                # No fresh snapshot later: announce the writer now, before any id (the
                # writer lock, and a mark of this transaction that only the schema's own
                # function can make: see announce_writer in _schema).
                await connection.execute(f'SELECT "{schema}".announce_writer()')
            yield transaction
        except BaseException:
            await connection.rollback()
            raise
        if transaction._failure is not None:
            await connection.rollback()
            raise DatabaseError(
                "the transaction was rolled back, since one of its statements failed "
                f"({transaction._failure!r}); nothing was committed"
            ) from transaction._failure
        try:
            await connection.commit()
        except BaseException:
            # The server may have committed before the error reached us (a cancellation
            # that lands on the COMMIT, a connection lost after it ran): the outcome is in
            # doubt, so readers are woken all the same (a wake-up for nothing costs a read).
            # After the rollback, which is shielded and comes back only once the server has
            # ended the transaction: woken before, a reader could read while the commit was
            # still finishing (a synchronous-replication wait being cancelled), find
            # nothing, and sleep until its next poll (seen under load in CI).
            await connection.rollback()
            if transaction._appended:
                on_appended()
            raise
    if transaction._appended:
        on_appended()
