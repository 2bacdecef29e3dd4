"""The peer: the same work done with pyeventsourcing (``eventsourcing`` 9.5 on psycopg 3), the
Python library most users would otherwise pick.

Runs in a process of its own (``python -m benchmarks._peer FUNCTION``, the arguments as JSON
on stdin), like the baselines, and only with the ``peer`` dependency group installed
(``--peer``). Each function is written the way pyeventsourcing's documentation teaches: an
`Application` saving an `Aggregate` whose methods trigger events, and a `Projection` whose
materialised view (a `PostgresTrackingRecorder`) writes its row and its tracking record in one
transaction per event, run by a `ProjectionRunner` that follows the application through
LISTEN/NOTIFY.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresTrackingRecorder
from eventsourcing.projection import Projection, ProjectionRunner
from psycopg.sql import SQL, Identifier


class Account(Aggregate):
    """One stream: each deposit is one event."""

    def __init__(self) -> None:
        self.total = 0

    @event("Deposited")
    def deposit(self, amount: int) -> None:
        self.total += amount


class Bank(Application[uuid.UUID]):
    """The application whose events the peer appends and projects."""


def _env(dsn: str, schema: str, pool_size: int = 5) -> dict[str, str]:
    url = urllib.parse.urlsplit(dsn)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": url.path.lstrip("/") or "postgres",
        "POSTGRES_HOST": url.hostname or "localhost",
        "POSTGRES_PORT": str(url.port or 5432),
        "POSTGRES_USER": urllib.parse.unquote(url.username or "postgres"),
        "POSTGRES_PASSWORD": urllib.parse.unquote(url.password or ""),
        "POSTGRES_SCHEMA": schema,
        "POSTGRES_POOL_SIZE": str(pool_size),
        "CREATE_TABLE": "y",
        # The default, made explicit: the view's rows and tracking commit together.
        "POSTGRES_SINGLE_ROW_TRACKING": "y",
    }


def _create_schema(dsn: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SQL("CREATE SCHEMA IF NOT EXISTS {}").format(Identifier(schema)))


@contextmanager
def _bank(dsn: str, schema: str, pool_size: int = 5) -> Iterator[Bank]:
    """A `Bank` application on *schema*, created if missing; closed on exit."""
    _create_schema(dsn, schema)
    app = Bank(env=_env(dsn, schema, pool_size))
    try:
        yield app
    finally:
        app.close()


def append_single_sequential(dsn: str, schema: str, count: int) -> float:
    """One event per save; events/s."""
    with _bank(dsn, schema) as app:
        account = Account()
        app.save(account)
        started = time.perf_counter()
        for _ in range(count):
            account.deposit(1)
            app.save(account)
        return count / (time.perf_counter() - started)


def append_single_concurrent(dsn: str, schema: str, count: int, tasks: int) -> float:
    """The same from *tasks* threads, one aggregate each (pyeventsourcing is thread-based);
    events/s."""
    with _bank(dsn, schema, pool_size=tasks) as app:
        per_task = count // tasks
        accounts = [Account() for _ in range(tasks)]
        app.save(*accounts)
        barrier = threading.Barrier(tasks + 1)

        def worker(account: Account) -> None:
            barrier.wait()
            for _ in range(per_task):
                account.deposit(1)
                app.save(account)

        threads = [threading.Thread(target=worker, args=(a,)) for a in accounts]
        for thread in threads:
            thread.start()
        barrier.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        return per_task * tasks / (time.perf_counter() - started)


def append_batch(dsn: str, schema: str, count: int, size: int) -> float:
    """*size* events per save; events/s."""
    with _bank(dsn, schema) as app:
        account = Account()
        app.save(account)
        started = time.perf_counter()
        for _ in range(count // size):
            for n in range(size):
                account.deposit(n)
            app.save(account)
        return (count // size) * size / (time.perf_counter() - started)


def execute_short_stream(dsn: str, schema: str, count: int, length: int) -> float:
    """A deposit command on its own aggregate of *length* events each (as ours and the
    baseline): get the aggregate from the repository (no aggregate cache, no snapshots: it
    reads and replays the events), call the method, save (the version is checked by the
    unique index). Commands/s."""
    with _bank(dsn, schema) as app:
        # One more aggregate than timed commands, for the untimed warm-up command.
        accounts = [Account() for _ in range(count + 1)]
        for account in accounts:
            for _ in range(length - 1):
                account.deposit(1)
        for start in range(0, len(accounts), 100):
            app.save(*accounts[start : start + 100])
        ids = [account.id for account in accounts]

        def deposit(account_id: uuid.UUID) -> None:
            account: Account = app.repository.get(account_id)
            account.deposit(1)
            app.save(account)

        deposit(ids[-1])
        started = time.perf_counter()
        for account_id in ids[:count]:
            deposit(account_id)
        return count / (time.perf_counter() - started)


class Balances(PostgresTrackingRecorder):
    """The materialised view: one total per account."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        table = SQL("{}.balances").format(Identifier(self.datastore.schema))
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {} (account text PRIMARY KEY, total bigint NOT NULL)"
            ).format(table)
        )
        self._upsert = SQL(
            "INSERT INTO {0} (account, total) VALUES (%(account)s, %(amount)s) "
            "ON CONFLICT (account) DO UPDATE SET total = {0}.total + excluded.total"
        ).format(table)

    def add(self, account: str, amount: int, tracking: Tracking) -> None:
        """The upsert and the tracking record, in one transaction."""
        with self.datastore.transaction(commit=True) as curs:
            self._insert_tracking(curs, tracking)
            curs.execute(self._upsert, {"account": account, "amount": amount}, prepare=True)


class BalancesProjection(Projection[Balances]):
    """Adds each deposit to its account's total."""

    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        if isinstance(domain_event, Account.Deposited):  # type: ignore[attr-defined]
            self.view.add(str(domain_event.originator_id), domain_event.amount, tracking)
        else:
            self.view.insert_tracking(tracking)


def catch_up_transactional(dsn: str, schema: str, count: int) -> float:
    """Rebuild the balances view over *count* deposits on 100 accounts; events/s."""
    with _bank(dsn, schema) as app:
        accounts = [Account() for _ in range(100)]
        app.save(*accounts)
        per_save = 1000
        for chunk in range(0, count, per_save):
            account = accounts[(chunk // per_save) % 100]
            for _ in range(min(per_save, count - chunk)):
                account.deposit(1)
            app.save(account)
        last = app.recorder.max_notification_id()
    started = time.perf_counter()
    with ProjectionRunner(
        application_class=Bank,
        projection_class=BalancesProjection,
        view_class=Balances,
        env=_env(dsn, schema),
    ) as runner:
        runner.wait(last, timeout=600)
        elapsed = time.perf_counter() - started
    # 100 AccountCreated events are projected too (tracking only); count the deposits.
    return count / elapsed


class Pinger(Aggregate):
    """Each ping is one event, carrying the key the latency is measured by."""

    @event("Pinged")
    def ping(self, key: str) -> None:
        pass


_SENT: dict[str, float] = {}
_LATENCIES: list[float] = []


class PingProjection(Projection[PostgresTrackingRecorder]):
    """Records when each ping reaches the projection, then tracks it."""

    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        key = getattr(domain_event, "key", None)
        if key in _SENT:
            _LATENCIES.append((time.perf_counter() - _SENT[key]) * 1000)
        self.view.insert_tracking(tracking)


class Pings(Application[uuid.UUID]):
    """The application the latency benchmark pings through."""


def latency(dsn: str, schema: str, count: int, interval: float) -> list[float]:
    """Save one ping at a time; the runner's projection sees it; latencies in ms."""
    _create_schema(dsn, schema)
    env = _env(dsn, schema)
    with ProjectionRunner(
        application_class=Pings,
        projection_class=PingProjection,
        view_class=PostgresTrackingRecorder,
        env=env,
    ) as runner:
        pinger = Pinger()
        runner.app.save(pinger)
        for n in range(count):
            key = f"k{n}"
            _SENT[key] = time.perf_counter()
            pinger.ping(key)
            runner.app.save(pinger)
            time.sleep(interval)
        last = runner.app.recorder.max_notification_id()
        runner.wait(last, timeout=60)
    return list(_LATENCIES)


if __name__ == "__main__":
    function = globals()[sys.argv[1]]
    arguments = json.loads(sys.stdin.read())
    print(json.dumps(function(*arguments)))
