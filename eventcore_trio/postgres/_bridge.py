"""The one place where asyncio, asyncpg and trio-asyncio live.

Everything above this module is plain Trio. Each method here is one crossing into asyncio:
one unit of work (a statement, a connect, a close), with asyncpg's errors translated into the
library's tree on the way back, chained with ``raise ... from``. A crossing costs tens of
microseconds, so callers shape their work as one statement per call wherever they can. The
calling Trio task steps the asyncio coroutine itself (`_Crossing`), rather than handing it
to an asyncio Task as ``trio_asyncio.aio_as_trio`` would: two fewer passes through
trio-asyncio's loop per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import socket
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, ParamSpec, TypeVar, final

import asyncpg
import trio
import trio_asyncio

from .._errors import (
    AppendConditionFailed,
    AuthenticationFailed,
    ConfigurationError,
    DatabaseError,
    DatabaseNotFound,
    DuplicateEventId,
    EventCoreError,
    InvalidArgument,
    StoreClosed,
    StoreConnectionError,
    SubjectForgottenError,
    UnsupportedPooling,
    VersionConflict,
)
from .._util import raise_single

P = ParamSpec("P")
T = TypeVar("T")

# SQLSTATE raised by the append function for an expected-version mismatch; its DETAIL is a
# JSON object {"stream_id", "expected", "actual"}. Class "EV" is not used by PostgreSQL.
VERSION_CONFLICT_SQLSTATE: Final = "EV001"
# A conditional append found events matching its query after the read (migration 8); its
# DETAIL is their positions, "tx:position,...". And a decision refused at an isolation
# level whose snapshot predates its locks.
CONDITION_FAILED_SQLSTATE: Final = "EV005"
STALE_SNAPSHOT_SQLSTATE: Final = "EV006"
# A decision's position is ahead of everything the store has written (migration 8): from
# another store, or made up.
POSITION_AHEAD_SQLSTATE: Final = "EV008"
# An append carried personal fields of a forgotten subject (migration 9); DETAIL: the subject.
SUBJECT_FORGOTTEN_SQLSTATE: Final = "EV007"

Record = Mapping[str, Any]

#: The frontend's Terminate message ('X', length 4): what asyncpg's close sends first.
_TERMINATE_MESSAGE: Final = b"X\x00\x00\x00\x04"

# asyncio's record of each loop's current task, which a crossing joins while it steps its
# coroutine (see _Crossing).
_enter_task: Final = asyncio.tasks._enter_task
_leave_task: Final = asyncio.tasks._leave_task

#: Seconds a closing store's loop waits for the crossings still in flight to end, once
#: cancelled, before it closes all the same.
DRAIN_TIMEOUT: Final = 5.0


_CONNECTION_SQLSTATE_CLASSES: Final = ("08", "57", "53")
# Class 57 is "operator intervention": mostly a session that the server is ending, but
# 57014 is a statement cancelled on a live session (statement_timeout, pg_cancel_backend),
# which is no reason to reconnect.
_QUERY_CANCELED: Final = "57014"
# asyncpg's statement cache names prepared statements per session; behind a transaction
# pooler the statements of one client land on several server sessions, where the names are
# missing (26000) or already taken by another client (42P05).
_PREPARED_STATEMENT_SQLSTATES: Final = ("26000", "42P05")


def translate_error(exc: BaseException) -> BaseException:
    """Map an asyncpg, asyncio or OS error onto the library's error tree."""
    if isinstance(exc, EventCoreError):
        return exc
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return AuthenticationFailed(
            f"PostgreSQL refused the credentials: {exc}. Check the user and password in the DSN."
        )
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return DatabaseNotFound(
            f"{exc}. Create it (createdb NAME) or fix the database name in the DSN."
        )
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or ""
        if sqlstate == VERSION_CONFLICT_SQLSTATE:
            detail = json.loads(getattr(exc, "detail", None) or "{}")
            return VersionConflict(detail["stream_id"], detail["expected"], detail["actual"])
        if sqlstate == CONDITION_FAILED_SQLSTATE:
            return AppendConditionFailed(tuple((getattr(exc, "detail", None) or "").split(",")))
        if sqlstate == SUBJECT_FORGOTTEN_SQLSTATE:
            return SubjectForgottenError(getattr(exc, "detail", None) or "")
        if sqlstate == POSITION_AHEAD_SQLSTATE:
            return InvalidArgument(
                f"{getattr(exc, 'message', exc)}: pass the position of a read_query of this "
                "store (QueryResult.position), or None"
            )
        if sqlstate == STALE_SNAPSHOT_SQLSTATE:
            return ConfigurationError(
                f"{exc}: the session runs at a stricter isolation than READ COMMITTED "
                "(default_transaction_isolation?); decisions over a query need READ COMMITTED, "
                "set it for this role or database"
            )
        if isinstance(exc, asyncpg.UniqueViolationError) and "event_id" in (
            getattr(exc, "constraint_name", None) or ""
        ):
            return DuplicateEventId(
                f"an appended event reuses a stored event id ({getattr(exc, 'detail', '')}); "
                "nothing was written",
            )
        if sqlstate == _QUERY_CANCELED:
            return DatabaseError(
                f"PostgreSQL cancelled the statement: {exc} (SQLSTATE {sqlstate}), because of "
                "statement_timeout or pg_cancel_backend(); the session is still usable. Raise "
                "statement_timeout for this role or database if the statement is legitimate.",
                sqlstate=sqlstate,
            )
        if sqlstate in _PREPARED_STATEMENT_SQLSTATES and "__asyncpg_" in str(exc):
            return UnsupportedPooling(
                f"{exc} (SQLSTATE {sqlstate}): a transaction-pooling proxy (PgBouncer "
                "pool_mode = transaction) moved this connection's prepared statements to "
                "another server session. Open the store with statement_cache_size=0 for such "
                "a pool, and connect lock sessions directly or through session pooling "
                "(session_dsn=...)."
            )
        if sqlstate == "08P01" and "startup parameter" in str(exc):
            return ConfigurationError(
                f"the server or a proxy in front of it refused a connection setting: {exc}. "
                "For PgBouncer, list the parameter in ignore_startup_parameters or remove it "
                "from the DSN's options."
            )
        if sqlstate[:2] in _CONNECTION_SQLSTATE_CLASSES:
            return StoreConnectionError(
                f"the PostgreSQL session ended or the server is unavailable: {exc} "
                f"(SQLSTATE {sqlstate}). The call did not complete; retry when the server is back."
            )
        return DatabaseError(f"PostgreSQL error {sqlstate}: {exc}", sqlstate=sqlstate)
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        # Seen when the server ends a session (pg_terminate_backend, shutdown) between two
        # statements: asyncpg has read the FATAL message but not yet the closed socket, so the
        # next statement meets "another operation is in progress". The statement was not sent.
        return StoreConnectionError(
            f"the PostgreSQL session is ending and cannot take a statement ({exc}); the call "
            "did not run. Retry on a new connection."
        )
    if isinstance(
        exc,
        OSError
        | asyncio.TimeoutError
        | asyncpg.InterfaceError
        | asyncpg.exceptions.ConnectionDoesNotExistError,
    ):
        return StoreConnectionError(
            f"cannot talk to PostgreSQL: {exc or type(exc).__name__}. Check that the server "
            "is running and reachable at the DSN's host and port; the call did not complete."
        )
    return exc


@final
class _Crossing:
    """One crossing in flight: an asyncio coroutine stepped from the Trio task that awaits it.

    ``trio_asyncio.aio_as_trio`` runs each call in an `asyncio.Task`, which costs three
    passes through trio-asyncio's loop: its first step, its wake-up and its done callback,
    each a handle taken off the loop's queue in a Trio scheduling round of its own. Here
    the calling task sends to the coroutine itself and sleeps on the asyncio future the
    coroutine waits on, woken by that future's done callback (one pass): what
    ``Task.__step`` and ``Task.__wakeup`` do, without the hops between them. A ``SELECT 1``
    on one connection took 7 scheduling rounds that way, and takes 5.

    To asyncio code this object is the current task while it steps (``asyncio.timeout``,
    which asyncpg uses in connect, close and after a cancelled statement, needs one): it
    offers the part of `asyncio.Task` that code uses, `cancel`, `cancelling` and
    `uncancel`, with Task's semantics. Trio cancellation cancels the asyncio side once, as
    ``aio_as_trio`` does: the future the coroutine waits on is cancelled (asyncpg then asks
    the server to cancel the statement), and once the coroutine has ended in
    `asyncio.CancelledError`, Trio's own exception (`trio.Cancelled`, or KeyboardInterrupt)
    is raised in its place.
    """

    __slots__ = (
        "_cancelled_once",
        "_cancels",
        "_loop",
        "_must_cancel",
        "_raise_cancel",
        "_running",
        "_task",
        "_waiter",
        "drained",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._task = trio.lowlevel.current_task()
        # The asyncio future the coroutine waits on, until its done callback has run
        # (None while it waits on a bare yield, asyncio's "let the others run").
        self._waiter: asyncio.Future[Any] | None = None
        # Task._num_cancels_requested and Task._must_cancel: a cancellation not yet thrown
        # into the coroutine because the future it waited on was already done.
        self._cancels = 0
        self._must_cancel = False
        # Whether the asyncio side was cancelled on Trio's or a draining loop's behalf:
        # that happens once, as aio_as_trio cancels its Task once (later requests wait
        # for the coroutine to end as it will).
        self._cancelled_once = False
        # Trio's exception for a crossing it cancelled, raised once the coroutine has ended
        # in asyncio.CancelledError.
        self._raise_cancel: Callable[[], object] | None = None
        self._running = True
        #: Set when a closing loop cancelled this crossing (see `_Crossings.drain`).
        self.drained = False

    # -- asyncio.Task's cancellation interface, for asyncio code on this crossing --

    def cancel(self, msg: object = None) -> bool:
        """Request cancellation of the asyncio side, as `asyncio.Task.cancel` does."""
        if not self._running:
            return False
        self._cancels += 1
        waiter = self._waiter
        if waiter is not None and waiter.cancel(msg=msg):
            return True
        self._must_cancel = True
        return True

    def cancelling(self) -> int:
        """The number of cancellation requests not yet withdrawn (`asyncio.Task.cancelling`)."""
        return self._cancels

    def uncancel(self) -> int:
        """Withdraw one cancellation request (`asyncio.Task.uncancel`)."""
        if self._cancels > 0:
            self._cancels -= 1
        return self._cancels

    # -- the Trio side --

    def _wake(self, _future: object = None) -> None:
        # Runs as an asyncio callback, on the loop's task.
        trio.lowlevel.reschedule(self._task)

    def cancel_once(self) -> None:
        """Cancel the asyncio side, unless that was done already (see `_abort`, `drain`)."""
        if not self._cancelled_once:
            self._cancelled_once = True
            self.cancel()

    def _abort(self, raise_cancel: Callable[[], object]) -> trio.lowlevel.Abort:
        if not self._cancelled_once:
            self._raise_cancel = raise_cancel
            self.cancel_once()
        # The asyncio side decides how the call ends; _wake reschedules this task.
        return trio.lowlevel.Abort.FAILED

    async def run(self, awaitable: Awaitable[T]) -> T:
        """Step *awaitable* to its end; return or raise its outcome. Always a checkpoint."""
        loop = self._loop
        # asyncio's own record of the loop's current task (it takes any object).
        self_as_task: Any = self
        coro: Any = awaitable if inspect.iscoroutine(awaitable) else awaitable.__await__()
        exc: BaseException | None = None
        waited = False
        try:
            # Already cancelled: raise before the first step, so that no statement starts
            # (an asyncio Task cancelled before its first step never runs its coroutine).
            try:
                await trio.lowlevel.checkpoint_if_cancelled()
            except BaseException:
                coro.close()
                raise
            while True:
                if self._must_cancel:
                    self._must_cancel = False
                    if not isinstance(exc, asyncio.CancelledError):
                        exc = asyncio.CancelledError()
                _enter_task(loop, self_as_task)
                try:
                    yielded = coro.send(None) if exc is None else coro.throw(exc)
                except StopIteration as stop:
                    result: T = stop.value
                    break
                finally:
                    _leave_task(loop, self_as_task)
                exc = None
                if getattr(yielded, "_asyncio_future_blocking", False):
                    yielded._asyncio_future_blocking = False
                    if yielded.get_loop() is not loop:
                        exc = RuntimeError(f"a crossing awaited {yielded!r} of another loop")
                        continue
                    self._waiter = yielded
                    yielded.add_done_callback(self._wake)
                    if self._must_cancel and yielded.cancel():
                        self._must_cancel = False
                elif yielded is None:
                    loop.call_soon(self._wake)
                else:
                    exc = RuntimeError(f"a crossing's coroutine yielded {yielded!r}")
                    continue
                waited = True
                await trio.lowlevel.wait_task_rescheduled(self._abort)
                waiter, self._waiter = self._waiter, None
                if waiter is not None:
                    try:
                        waiter.result()
                    except BaseException as error:  # thrown in, as Task.__wakeup does
                        exc = error
            if self._must_cancel:
                # Cancelled in its last step, too late to throw in: cancelled all the same.
                raise asyncio.CancelledError
            if not waited:
                # Done without waiting for anything: still a checkpoint.
                await trio.lowlevel.cancel_shielded_checkpoint()
            return result
        except asyncio.CancelledError:
            if self._raise_cancel is not None:
                self._raise_cancel()
            raise
        finally:
            self._running = False


@final
class _Crossings:
    """The crossings in flight on one trio-asyncio loop that `asyncio_loop` opened.

    The loop must not close under a crossing: its asyncio future would never resolve, and a
    cancellation arriving later would hand it to a closed loop (``RuntimeError: Event loop is
    closed`` inside Trio's deadline handling, a `trio.TrioInternalError`). So the loop's
    owner drains them first (`drain`), and a crossing asked for after that is refused.
    """

    def __init__(self) -> None:
        # The crossings in flight; each removes itself when it ends.
        self._running: set[_Crossing] = set()
        self._idle = trio.Event()
        self._idle.set()
        # Set by drain: no new crossing starts.
        self.closed = False

    def add(self, crossing: _Crossing) -> None:
        """Count *crossing* in flight until `discard`; refused once the loop is draining."""
        if self.closed:
            raise StoreClosed(_LOOP_CLOSED)
        if not self._running and self._idle.is_set():
            self._idle = trio.Event()
        self._running.add(crossing)

    def discard(self, crossing: _Crossing) -> None:
        """*crossing* has ended."""
        self._running.discard(crossing)
        if not self._running:
            self._idle.set()

    async def drain(self) -> None:
        """Refuse new crossings, cancel those in flight, and wait until every one has
        ended."""
        self.closed = True
        for crossing in list(self._running):
            crossing.drained = True
            crossing.cancel_once()
        await self._idle.wait()


_LOOP_CLOSED: Final = (
    "the store that opened this connection has closed (its asyncio loop is gone); open a new store"
)
_LOOP_CLOSED_IN_FLIGHT: Final = (
    "the store closed while this call was in flight; it may or may not have completed"
)

# Per trio-asyncio loop: its crossings (loops opened by an application are not tracked).
_crossings: weakref.WeakKeyDictionary[object, _Crossings] = weakref.WeakKeyDictionary()


# KI-protected too (see _protect_asyncio_side): an interrupt that lands while a crossing's
# own frame runs is delivered at the main task's next checkpoint, not raised inside the
# library in the caller's task. The asyncio code it steps inherits the protection.
@trio.lowlevel.enable_ki_protection
async def _cross(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    loop = trio_asyncio.current_loop.get()
    if loop is None or loop.is_closed():
        raise StoreClosed(_LOOP_CLOSED)
    tracked = _crossings.get(loop)
    crossing = _Crossing(loop)
    if tracked is not None:
        tracked.add(crossing)
    try:
        return await crossing.run(fn(*args, **kwargs))
    except (
        TimeoutError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.exceptions.InternalClientError,
        OSError,
    ) as exc:
        raise translate_error(exc) from exc
    except asyncio.CancelledError as exc:
        if crossing.drained:
            raise StoreClosed(_LOOP_CLOSED_IN_FLIGHT) from exc
        # Cancelled on the asyncio side, not by Trio (which would have raised
        # trio.Cancelled): no asyncio cancellation reaches Trio code.
        raise StoreConnectionError(
            "the connection's asyncio side cancelled this call (the connection is "
            "closing or being reset); it did not complete. Retry on a new connection."
        ) from exc
    finally:
        if tracked is not None:
            tracked.discard(crossing)


logger = logging.getLogger("eventcore_trio.postgres")


def _protect_asyncio_side() -> None:
    # Trio raises KeyboardInterrupt wherever SIGINT lands unless the running frame is
    # KI-protected (or the application passed restrict_keyboard_interrupt_to_checkpoints).
    # trio-asyncio runs every asyncio callback (asyncpg's protocol reading the socket, task
    # steps, future callbacks) inside its own loop tasks. An interrupt raised in the middle
    # of a callback left asyncpg's protocol half-updated and the process crashed later in
    # its C code (7 of 20 Ctrl-C runs of a plain trio.run embedding); one raised in the loop
    # task itself ended it, and with it every asyncio callback, so every call in flight
    # waited for ever (a hang). Protected, the interrupt is delivered at the main task's next
    # checkpoint instead, and the store shuts down in order. Marking code objects is Trio's
    # own mechanism (enable_ki_protection); every function and method trio-asyncio defines
    # is marked, and what they call (asyncio, asyncpg, the bridge's own coroutines on the
    # asyncio side) inherits it.
    from trio_asyncio import _adapter, _async, _base, _handles, _loop, _util

    for module in (_adapter, _async, _base, _handles, _loop, _util):
        for _name, member in inspect.getmembers(module):
            functions = [member] if inspect.isfunction(member) else []
            if inspect.isclass(member) and member.__module__.startswith("trio_asyncio"):
                functions = [
                    inspect.unwrap(getattr(value, "__func__", value))
                    for value in vars(member).values()
                    if inspect.isfunction(getattr(value, "__func__", value))
                ]
            for function in functions:
                # (trio-asyncio reports its public names as "trio_asyncio".)
                if function.__module__.startswith("trio_asyncio"):
                    trio.lowlevel.enable_ki_protection(function)


_protect_asyncio_side()


def _log_orphan_error(_loop: object, context: dict[str, Any]) -> None:
    logger.debug(
        "asyncio reported an error no caller awaited: %s",
        context.get("message", "unhandled error"),
        exc_info=context.get("exception"),
    )


@asynccontextmanager
async def asyncio_loop() -> AsyncIterator[None]:
    """Make sure a trio-asyncio loop runs for the duration of the block.

    Inside an application that already runs ``trio_asyncio.open_loop()`` this reuses its loop;
    inside a plain ``trio.run`` it opens one.
    """
    if trio_asyncio.current_loop.get() is not None:
        yield
        return
    try:
        async with trio_asyncio.open_loop() as loop:
            # trio-asyncio's default handler re-raises every error that asyncio reports
            # without a caller to give it to ("Future exception was never retrieved", e.g.
            # from a connect that was cancelled half-way), which would tear the whole loop,
            # and the store, down. Such errors belong in the log.
            loop.set_exception_handler(_log_orphan_error)
            crossings = _crossings[loop] = _Crossings()
            try:
                yield
            finally:
                # No crossing outlives the loop: a task of an outer nursery may still be
                # in one (it inherited the loop from the task that started it).
                with trio.move_on_after(DRAIN_TIMEOUT, shield=True):
                    await crossings.drain()
    except BaseExceptionGroup as group:
        # The loop's nurseries wrap the block's own exception; callers want it bare.
        raise_single(group)


# Client-side TCP settings for every connection: keepalive probes after 5 s of silence, 3 s
# apart, 3 of them; and at most 15 s for sent data to be acknowledged. Without them a client
# whose network vanishes mid-statement waits for the kernel's defaults (2 hours of keepalive
# silence; about 15 minutes of retransmission), long after the server has given up on it.
CLIENT_KEEPALIVE: Final = {"idle": 5, "interval": 3, "count": 3, "user_timeout_ms": 15_000}


def _tune_socket(raw: asyncpg.Connection) -> None:
    # asyncpg opens the socket itself and offers no hook for options, so reach it through
    # the transport. Unix sockets have no TCP options to set.
    transport = getattr(raw, "_transport", None)
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", CLIENT_KEEPALIVE["idle"]),
        ("TCP_KEEPINTVL", CLIENT_KEEPALIVE["interval"]),
        ("TCP_KEEPCNT", CLIENT_KEEPALIVE["count"]),
        ("TCP_USER_TIMEOUT", CLIENT_KEEPALIVE["user_timeout_ms"]),
    ):
        option = getattr(socket, name, None)  # Linux has all four; others may not
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


#: Arrays of built-in types that asyncpg does not know until it asks the server, by array
#: OID: (array name, element OID, element name). PostgreSQL never changes these OIDs.
BUILTIN_ARRAYS: Final = {
    1000: ("_bool", 16, "bool"),
    1005: ("_int2", 21, "int2"),
    1007: ("_int4", 23, "int4"),
    1016: ("_int8", 20, "int8"),
    1021: ("_float4", 700, "float4"),
    1022: ("_float8", 701, "float8"),
    1231: ("_numeric", 1700, "numeric"),
    1015: ("_varchar", 1043, "varchar"),
    1182: ("_date", 1082, "date"),
    1115: ("_timestamp", 1114, "timestamp"),
    1185: ("_timestamptz", 1184, "timestamptz"),
    2951: ("_uuid", 2950, "uuid"),
    199: ("_json", 114, "json"),
    3807: ("_jsonb", 3802, "jsonb"),
}


def _preload_array_codecs(raw: asyncpg.Connection) -> None:
    # asyncpg decodes built-in scalars from a table, but learns most of their arrays (int[],
    # bigint[], uuid[], jsonb[]: every append's arguments) by introspection, per connection:
    # about four round trips and a catalog query that a new server process answers slowly,
    # 10-30 ms paid by the first such statement on each connection. On a standby that takes
    # over, that was its first statement as leader. The rows the introspection would return
    # for these types are fixed, so they are given to asyncpg as it would store them. This
    # reaches into asyncpg's internals: if they change, the connection simply introspects
    # as before.
    rows = [
        {
            "oid": oid,
            "ns": "pg_catalog",
            "name": name,
            "kind": b"b",
            "basetype": None,
            "elemtype": element,
            "elemdelim": ",",
            "range_subtype": None,
            "attrtypoids": None,
            "attrnames": None,
            "depth": 0,
            "basetype_name": None,
            "elemtype_name": element_name,
            "range_subtype_name": None,
        }
        for oid, (name, element, element_name) in BUILTIN_ARRAYS.items()
    ]
    with contextlib.suppress(Exception):
        raw._protocol.get_settings().register_data_types(rows)


def _server_settings(application_name: str, extra: Mapping[str, str]) -> dict[str, str]:
    # PostgreSQL truncates application_name to 63 bytes; cut on a character boundary ourselves.
    name = application_name.encode("utf-8")[:63].decode("utf-8", "ignore")
    return {"application_name": name, **extra}


class _Queries:
    """Statements on an asyncpg connection; each method is one statement and one crossing
    into asyncio."""

    _raw: asyncpg.Connection

    async def fetch(self, sql: str, *args: object) -> list[Record]:
        """Run *sql* and return all rows."""
        return await _cross(self._raw.fetch, sql, *args)

    async def fetchrow(self, sql: str, *args: object) -> Record | None:
        """Run *sql* and return the first row."""
        return await _cross(self._raw.fetchrow, sql, *args)

    async def fetchval(self, sql: str, *args: object) -> Any:
        """Run *sql* and return the first column of the first row."""
        return await _cross(self._raw.fetchval, sql, *args)

    async def execute(self, sql: str, *args: object) -> str:
        """Run *sql* (several statements when there are no arguments)."""
        return await _cross(self._raw.execute, sql, *args)


@final
class Connection(_Queries):
    """A single asyncpg connection, callable from Trio.

    Not safe for concurrent use: callers serialise their use of one connection.
    """

    def __init__(self, raw: asyncpg.Connection) -> None:
        self._raw = raw

    @property
    def backend_pid(self) -> int:
        """The process id the server announced at startup.

        Directly connected, this is the session's ``pg_backend_pid()``; a proxy such as
        PgBouncer announces a made-up one, which is how a proxy is recognised.
        """
        return int(self._raw.get_server_pid())

    def in_transaction(self) -> bool:
        """Whether the session was inside a transaction at the end of its last statement."""
        return not self.is_closed() and bool(self._raw.is_in_transaction())

    def is_closed(self) -> bool:
        """Whether asyncpg knows the connection to be closed."""
        try:
            return bool(self._raw.is_closed())
        except asyncpg.InterfaceError:
            # A pooled connection whose session ended has already been handed back to its
            # pool, which detaches it: every call on it raises. It is closed.
            return True

    def add_termination_listener(self, callback: Callable[[], None]) -> None:
        """Call *callback* (in the Trio thread) as soon as the connection closes."""
        self._raw.add_termination_listener(lambda _connection: callback())

    async def executemany(self, sql: str, args: Iterable[Sequence[object]]) -> None:
        """Run *sql* once per argument tuple, pipelined; one crossing."""
        await _cross(self._raw.executemany, sql, args)

    async def fetch_then_notify(
        self, sql: str, args: Sequence[object], channel: str
    ) -> tuple[list[Record], BaseException | None]:
        """Run *sql* (autocommit) and return its rows, then ``pg_notify(channel, '')`` as a
        transaction of its own: two statements, one crossing.

        Returns the rows and, if the notification failed, its (translated) error: *sql* has
        committed by then, so a failed notification must not read as a failed *sql*.
        """
        raw = self._raw

        async def run() -> tuple[list[Record], BaseException | None]:
            rows: list[Record] = await raw.fetch(sql, *args)
            try:
                await raw.execute("SELECT pg_notify($1, '')", channel)
            except (
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                asyncpg.exceptions.InternalClientError,
                OSError,
            ) as exc:
                return rows, translate_error(exc)
            return rows, None

        return await _cross(run)

    async def run_writes(self, groups: Sequence[tuple[str, Sequence[Sequence[object]]]]) -> None:
        """Run each ``(sql, rows)`` group in order: one statement, or one pipelined
        ``executemany`` for several rows. One crossing for all of them."""
        raw = self._raw

        async def run() -> None:
            for sql, rows in groups:
                if len(rows) == 1:
                    await raw.execute(sql, *rows[0])
                else:
                    await raw.executemany(sql, rows)

        await _cross(run)

    @asynccontextmanager
    async def listen(self, channel: str) -> AsyncIterator[trio.MemoryReceiveChannel[str]]:
        """LISTEN on *channel* for the block; yields a channel of notification payloads.

        Notifications arrive only while this connection lives; callers that must not miss
        progress poll as well (a lost connection loses its notifications).
        """
        send, receive = trio.open_memory_channel[str](math.inf)

        def on_notification(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            send.send_nowait(payload)

        await _cross(self._raw.add_listener, channel, on_notification)
        try:
            yield receive
        finally:
            with (
                trio.move_on_after(5, shield=True),
                contextlib.suppress(StoreConnectionError, StoreClosed),
            ):
                if not self.is_closed():
                    await _cross(self._raw.remove_listener, channel, on_notification)
            send.close()

    async def begin(self) -> None:
        """Start a transaction (one round trip); end it with `commit` or `rollback`."""
        await _cross(self._raw.execute, "BEGIN")

    async def commit(self) -> None:
        """Commit the open transaction."""
        await _cross(self._raw.execute, "COMMIT")

    async def rollback(self) -> None:
        """Roll back the open transaction, shielded from cancellation and bounded.

        If the rollback cannot complete (the session is gone or hangs) the connection is
        terminated, so it is never left inside an open transaction; `is_closed` then tells.
        """
        with (
            trio.move_on_after(5, shield=True),
            contextlib.suppress(StoreConnectionError, StoreClosed),
        ):
            await _cross(self._raw.execute, "ROLLBACK")
        if not self.is_closed() and self._raw.is_in_transaction():
            self.terminate()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """Run the block in a transaction: commit on success, roll back on any exception.

        The rollback runs shielded, with a timeout, so cancellation cannot leave the session
        inside an open transaction; if even that fails the connection is terminated.
        """
        await self.begin()
        try:
            yield self
        except BaseException:
            await self.rollback()
            raise
        else:
            await self.commit()

    async def close(self, grace: float = 5.0) -> None:
        """Close gracefully, shielded from cancellation; terminate after *grace* seconds."""
        with (
            trio.move_on_after(grace, shield=True),
            contextlib.suppress(StoreConnectionError, StoreClosed),
        ):
            await _cross(self._raw.close)
        if not self.is_closed():
            self.terminate()

    def terminate(self) -> None:
        """Close the socket at once, without telling the server (a session ends on its side)."""
        if not self.is_closed():
            self._raw.terminate()

    def end_now(self) -> None:
        """Ask the server to end the session now, without waiting: send the protocol's
        Terminate message ahead of anything else this connection would send.

        The server ends the session (and so releases its locks, rolling back an open
        transaction) as soon as it reads the message, after the statement it may be running;
        it then closes the socket, which `is_closed` and the termination listeners see, and
        which a later `close` waits for. A graceful `close` alone would first wait for a
        statement in flight to answer its cancellation, and for a rollback.
        """
        if self.is_closed():
            return
        # asyncpg keeps its transport in a private attribute; without it, the session ends
        # at the close, as before.
        transport = getattr(self._raw, "_transport", None)
        if transport is not None and not transport.is_closing():
            transport.write(_TERMINATE_MESSAGE)


async def connect(
    dsn: str,
    *,
    application_name: str,
    connect_timeout: float,
    statement_cache_size: int = 100,
) -> Connection:
    """Open a connection (the pool's, or a dedicated session); one crossing.

    Only ``application_name`` goes into the startup packet, since poolers refuse startup
    parameters they do not know (PgBouncer: "unsupported startup parameter"); callers apply
    other session settings with ``SET`` or ``set_config`` once connected.
    """
    raw = await _cross(
        asyncpg.connect,
        dsn,
        timeout=connect_timeout,
        server_settings=_server_settings(application_name, {}),
        statement_cache_size=statement_cache_size,
    )
    _tune_socket(raw)
    _preload_array_codecs(raw)
    return Connection(raw)
