"""Backend harnesses: how the contract suite opens a store and injects faults into it."""

from __future__ import annotations

import secrets
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol, final

import attrs

from .._events import NewEvent, StreamAppend
from .._protocols import Leadership, Store
from ..memory import MemoryLeadership, MemoryStore, open_memory_store
from ..postgres import (
    PostgresLeadership,
    PostgresStore,
    normalize_dsn,
    open_postgres_store,
    tool_connection,
    writer_lock_key,
)


class BackendHarness(Protocol):
    """What a backend supplies to run the contract suite against it.

    Every store that one harness opens shares the same underlying database, so two stores
    from one harness behave like two processes using one store.

    .. versionadded:: 0.1
    """

    def open_store(self) -> AbstractAsyncContextManager[Store]:
        """Open a store on the harness's (fresh, test-private) database."""
        ...

    async def end_leadership_session(self, store: Store, leadership: Leadership) -> None:
        """End the session behind *leadership* from outside, as a crash or an operator would.

        On PostgreSQL this is ``pg_terminate_backend`` on the lock-holding session.
        """
        ...

    def hold_commit(
        self, store: Store, stream_id: str, events: Sequence[NewEvent]
    ) -> AbstractAsyncContextManager[None]:
        """Append *events* in a transaction that commits only when the block exits.

        Positions are drawn on entry, so events appended inside the block by others get later
        positions but commit earlier: the late-commit hazard of DESIGN.md section 4.1.
        """
        ...

    async def store_undecodable(self, store: Store, stream_id: str) -> None:
        """Store an event whose data is not a JSON object, as a foreign writer could."""
        ...


@final
class MemoryHarness:
    """The harness of the in-memory backend (one `MemoryStore` shared by every open).

    .. versionadded:: 0.1
    """

    def __init__(self) -> None:
        self._store: MemoryStore | None = None

    @asynccontextmanager
    async def open_store(self) -> AsyncIterator[Store]:
        """Open (the first time) or share the harness's memory store."""
        if self._store is not None:
            yield self._store
            return
        async with open_memory_store() as store:
            self._store = store
            try:
                yield store
            finally:
                self._store = None

    async def end_leadership_session(self, store: Store, leadership: Leadership) -> None:
        """Revoke *leadership* as if its session had died."""
        assert isinstance(store, MemoryStore)
        assert isinstance(leadership, MemoryLeadership)
        store.admin.revoke_leadership(leadership.name)

    @asynccontextmanager
    async def hold_commit(
        self, store: Store, stream_id: str, events: Sequence[NewEvent]
    ) -> AsyncIterator[None]:
        """Memory appends are atomic and visible at once: append when the block exits."""
        yield
        await store.append(stream_id, events)

    async def store_undecodable(self, store: Store, stream_id: str) -> None:
        """Store an event whose data is a JSON array."""
        assert isinstance(store, MemoryStore)
        store.admin.store_undecodable(stream_id)


def dsn_with_credentials(dsn: str, user: str, password: str) -> str:
    """*dsn* with its user and password replaced: the same server, as another role.

    .. versionadded:: 0.3
    """
    parts = urllib.parse.urlsplit(normalize_dsn(dsn))
    host = parts.netloc.rpartition("@")[2]
    credentials = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{credentials}@{host}"))


# The roles made for each server (by its administrator's DSN), in this process.
_roles_by_server: dict[str, RuntimeRoles] = {}


@final
@attrs.frozen
class RuntimeRoles:
    """The two roles of a least-privilege deployment that a `PostgresHarness` made.

    Attributes:
        owner: the role that owns the schema and migrates it.
        owner_dsn: the server's DSN as *owner* (with its password).
        runtime: the role the harness's stores run as, with the grants of `runtime_grants`.
        runtime_dsn: the server's DSN as *runtime* (with its password).

    .. versionadded:: 0.3
    """

    owner: str
    owner_dsn: str
    runtime: str
    runtime_dsn: str


@final
class PostgresHarness:
    """The harness of the PostgreSQL backend: a fresh schema on a given server.

    Args:
        dsn: a server on which the harness may create schemas (a superuser is simplest).
        schema: the schema to use; by default a new, unique one.
        runtime_role: False (default): stores run as the role of *dsn*, which migrates. True:
            the least-privilege setup of docs/operations.md ("Roles and grants"). Two login
            roles with random passwords are made once per server and process (*dsn* must be
            allowed to create roles: a superuser is simplest): the owner creates and
            migrates the schema and grants the runtime role `runtime_grants`; every store
            then runs as the runtime role (`roles`). The roles stay on the server, like the
            schemas.
        store_options: more keyword arguments for `open_postgres_store` (for example
            ``session_dsn`` and ``statement_cache_size`` behind a connection pooler).

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       *store_options*.
    .. versionchanged:: 0.3
       *runtime_role*.
    """

    def __init__(
        self,
        dsn: str,
        schema: str | None = None,
        *,
        runtime_role: bool = False,
        **store_options: Any,
    ) -> None:
        self.dsn = dsn
        self.schema = schema or f"t_{uuid.uuid4().hex[:16]}"
        self.store_options: dict[str, Any] = {"max_pool_size": 4, **store_options}
        self._runtime_role = runtime_role
        self._roles: RuntimeRoles | None = None

    @property
    def roles(self) -> RuntimeRoles | None:
        """The owner and runtime roles, once a store opened with ``runtime_role=True``."""
        return self._roles

    def open_store(self) -> AbstractAsyncContextManager[PostgresStore]:
        """Open a store on the harness's schema (migrating it on first use)."""
        if not self._runtime_role:
            return open_postgres_store(self.dsn, schema=self.schema, **self.store_options)
        return self._open_as_runtime_role()

    @asynccontextmanager
    async def _open_as_runtime_role(self) -> AsyncIterator[PostgresStore]:
        roles = self._roles or await self._make_roles()
        options = dict(self.store_options)
        if options.get("session_dsn") is not None:
            options["session_dsn"] = dsn_with_credentials(
                options["session_dsn"], roles.runtime, _password(roles.runtime_dsn)
            )
        async with open_postgres_store(roles.runtime_dsn, schema=self.schema, **options) as store:
            yield store

    async def _make_roles(self) -> RuntimeRoles:
        # The roles are made once per server and process (for the suite's speed); each has a
        # password of its own, so they connect as themselves whatever authentication the
        # server asks for. The owner may create schemas in the database: it creates and
        # migrates this one, then grants the runtime role.
        roles = _roles_by_server.get(self.dsn)
        if roles is None:
            roles = await self._create_roles()
            _roles_by_server[self.dsn] = roles
        async with open_postgres_store(
            roles.owner_dsn, schema=self.schema, max_pool_size=1
        ) as store:
            await store.admin.grant_runtime_role(roles.runtime)
        self._roles = roles
        return roles

    async def _create_roles(self) -> RuntimeRoles:
        suffix = uuid.uuid4().hex[:12]
        owner, runtime = f"eventcore_owner_{suffix}", f"eventcore_runtime_{suffix}"
        owner_password, runtime_password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        async with tool_connection(
            self.dsn, application_name="eventcore-trio harness"
        ) as connection:
            database = await connection.fetchval("SELECT pg_catalog.current_database()")
            await connection.execute(
                f"CREATE ROLE {owner} LOGIN PASSWORD '{owner_password}';"
                f"CREATE ROLE {runtime} LOGIN PASSWORD '{runtime_password}';"
                f'GRANT CREATE ON DATABASE "{database}" TO {owner}'
            )
        return RuntimeRoles(
            owner=owner,
            owner_dsn=dsn_with_credentials(self.dsn, owner, owner_password),
            runtime=runtime,
            runtime_dsn=dsn_with_credentials(self.dsn, runtime, runtime_password),
        )

    async def end_leadership_session(self, store: Store, leadership: Leadership) -> None:
        """``pg_terminate_backend`` the lock-holding session, from a pooled connection."""
        assert isinstance(store, PostgresStore)
        assert isinstance(leadership, PostgresLeadership)
        terminated = await store.admin.fetchval(
            "SELECT pg_terminate_backend($1)", leadership.backend_pid
        )
        assert terminated, "the lock-holding session was already gone"

    async def store_undecodable(self, store: Store, stream_id: str) -> None:
        """Insert an event whose data is a JSON array, bypassing the append function.

        It announces itself as an event writer first (the writer lock, taken before the
        insert gives the statement a transaction id), as anything that inserts events must.
        """
        assert isinstance(store, PostgresStore)
        sql = (
            f'INSERT INTO "{store.schema}".events '
            "(stream_id, stream_version, event_id, type, data, metadata, stream_hash) "
            "SELECT $1, 1, gen_random_uuid(), 'Undecodable', '[1, 2, 3]', '{}', "
            f'"{store.schema}".stream_hash($1) '
            "FROM (SELECT pg_catalog.pg_advisory_xact_lock_shared($2::bigint)) AS announced"
        )
        if self._roles is None:
            await store.admin.execute(sql, stream_id, writer_lock_key(store.schema))
            return
        # Only the owner may insert events other than through the append functions.
        async with tool_connection(
            self._roles.owner_dsn, application_name="eventcore-trio harness"
        ) as connection:
            await connection.execute(sql, stream_id, writer_lock_key(store.schema))

    @asynccontextmanager
    async def hold_commit(
        self, store: Store, stream_id: str, events: Sequence[NewEvent]
    ) -> AsyncIterator[None]:
        """Run the append function in an open transaction on a dedicated connection."""
        assert isinstance(store, PostgresStore)
        async with (
            store.admin.connection("eventcore-trio test late commit") as connection,
            connection.transaction(),
        ):
            sql, args = store.admin.append_statement([StreamAppend(stream_id, events)])
            await connection.fetchrow(sql, *args)
            yield
        store.admin.notify_appended()


def _password(dsn: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(dsn).password or "")
