"""The proof that a lock session still owns its lock, checked by keepalives and commits.

A session advisory lock belongs to a *server* session. Connection lifetime = lock lifetime
holds only while the client's connection is that one session for its whole life, and that
can break in two ways that a dead-socket check never sees:

* a transaction-pooling proxy (PgBouncer ``pool_mode = transaction``) runs consecutive
  statements of one client connection on whichever server session is free, so the lock
  stays behind on one session while later statements, batches included, run on others;
* code running on the session (a projector through ``ctx.db``, or a library it calls) runs
  ``pg_advisory_unlock_all()``, which frees the lock while the session lives on.

Both are caught by one condition, evaluated in the server: the current session is the one
the lock was taken on (its ``pg_backend_pid()``) and it holds the lock (``pg_locks``).
"""

from __future__ import annotations

from typing import Final

import attrs

#: SQL: the bigint key of a pg_locks row of the bigint form of pg_advisory_lock (which
#: pg_locks splits into classid:objid).
LOCK_KEY: Final = "((classid::bigint << 32) | objid::bigint)"

#: SQL condition: server session {session} holds advisory lock {key}. Format both with SQL.
SESSION_HOLDS_LOCK: Final = (
    "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND granted "
    f"AND pid = {{session}} AND {LOCK_KEY} = {{key}})"
)

#: SQL condition: some session of this database holds advisory lock {key}.
LOCK_HELD: Final = (
    "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND granted "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    f"AND {LOCK_KEY} = {{key}})"
)

#: SQL condition: some session of this database holds or waits for one of the advisory locks
#: of the bigint array {keys}.
LOCKS_IN_USE: Final = (
    "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    f"AND {LOCK_KEY} = ANY({{keys}}))"
)

#: SQL condition: the current session is session {pid} and holds advisory lock {key}. Format
#: {pid} and {key} with parameter placeholders.
HOLDS_LOCK: Final = (
    "(pg_backend_pid() = {pid} AND "
    + SESSION_HOLDS_LOCK.format(session="pg_backend_pid()", key="{key}")
    + ")"
)

#: The check a keepalive (and a new leadership) runs: which session the statement ran on, and
#: whether that is the lock's session and it holds the lock. Arguments: pid, key.
CHECK_LOCK: Final = (
    "SELECT pg_backend_pid() AS pid, "
    + HOLDS_LOCK.format(pid="$1::int", key="$2::bigint")
    + " AS held"
)

#: SQL condition: the current session holds advisory locks already (so it is shared with
#: another client, or a pooler handed it over without resetting it).
HOLDS_ANY_ADVISORY_LOCK: Final = (
    "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())"
)

# The advice every UnsupportedPooling about lock sessions ends with; exported so that a tool
# (the CLI) can replace it with advice in its own terms.
POOLER_HINT: Final = (
    "the leadership connection goes through a transaction-pooling proxy (PgBouncer "
    "pool_mode = transaction?): connect lock sessions directly or through session pooling, "
    "with open_postgres_store(session_dsn=...)"
)


@attrs.frozen
class LockProof:
    """Which server session took which lock: what every keepalive and commit re-checks."""

    name: str
    key: int
    # pg_backend_pid() of the session that took the lock (not the pid announced at startup,
    # which a proxy makes up).
    backend_pid: int
    # True when a proxy sits between this process and the server.
    proxied: bool

    def describe_loss(self, backend_pid: int) -> str:
        """Why the lock is no longer ours, given the session a statement just ran on."""
        if backend_pid != self.backend_pid:
            return (
                f"the lock of {self.name!r} was taken on server session {self.backend_pid}, but "
                f"the lock connection's statements now run on session {backend_pid}: "
                f"{POOLER_HINT}"
            )
        reason = (
            f"the lock of {self.name!r} is no longer held by its session {self.backend_pid} "
            "although the session lives: something on it released the lock (a projector "
            "calling pg_advisory_unlock_all() or pg_advisory_unlock() through ctx.db?). Never "
            "release advisory locks on the lock session"
        )
        # Behind a proxy, a pooler that reset the session does the same.
        return f"{reason}; or {POOLER_HINT}" if self.proxied else reason


#: Takes every lock of the bigint array $1 that nobody holds or waits for, without waiting;
#: true when it took all of them. (Polymorphic built-ins are qualified: a look-alike of exact
#: argument types in a schema on the search path would win over pg_catalog's.)
TRY_LOCKS: Final = (
    "SELECT count(*) FILTER (WHERE pg_try_advisory_lock(k)) "
    "= pg_catalog.cardinality($1::bigint[]) FROM pg_catalog.unnest($1::bigint[]) AS k"
)
#: Whether the current session holds every lock of the bigint array $1.
HOLDS_LOCKS: Final = (
    "SELECT coalesce(bool_and("
    + SESSION_HOLDS_LOCK.format(session="pg_backend_pid()", key="k")
    + "), true) FROM pg_catalog.unnest($1::bigint[]) AS k"
)

#: Releases the locks of the bigint array $1 that the current session holds.
UNLOCK_HELD: Final = (
    "SELECT pg_advisory_unlock(k) FROM pg_catalog.unnest($1::bigint[]) AS k WHERE "
    + SESSION_HOLDS_LOCK.format(session="pg_backend_pid()", key="k")
)
