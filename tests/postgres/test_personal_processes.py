"""A forget while other processes use the subject's personal data (issue 29, "Concurrency"),
with real processes and connections: the in-process version is the personal-data contract's
``test_a_forget_during_a_catch_up_and_a_command``.

Process P runs a projection over the subject's events and others' (tests/postgres/
personal_process.py, ``project``), process C command loops that fold the subject's streams
and append its personal data (``decide``); this process forgets the subject once P is
half-way through its catch-up (P holds that batch until the forget has returned), C has
committed commands, and C holds a transaction open with an append of the subject's data.
Synchronised by lines on the processes' pipes and by queries, never by sleeps.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from eventcore_trio import SUBJECT_FORGOTTEN, ForgetRecord, Position
from eventcore_trio._personal._fields import forgotten_stream
from eventcore_trio._personal._keys import KEY_ENCRYPTION_KEY_VARIABLE
from eventcore_trio.postgres import DSN_ENVIRONMENT_VARIABLE, PostgresStore
from eventcore_trio.testing import EmbeddedPostgres, PostgresHarness, read_all

from ..conftest import oldest_server_param
from ..helpers import eventually
from .personal_process import BATCH_SIZE, NAME, CustomerRegistered, PlanChanged, registry
from .test_personal import dump

# Two processes and a few seconds, and nothing in it that differs between server versions:
# one server (see conftest.oldest_server_param).
pytestmark = [
    pytest.mark.trio,
    pytest.mark.parametrize("postgres_server", [oldest_server_param()], indirect=True),
]

PROCESS = Path(__file__).parent / "personal_process.py"
#: Streams per customer, each with a command loop in C (for the subject) and events per
#: stream before the processes start, appended in rounds so the customers' events interleave.
STREAMS, ROUNDS, PER_ROUND = 4, 6, 10
#: P holds the batch in which it has applied this many of the subject's events.
HALT_AFTER = STREAMS * ROUNDS * PER_ROUND // 3
#: C's commands on the subject committed before the forget, at least.
COMMITTED_FIRST = 8


@attrs.frozen
class Customer:
    """A customer of the test, with values unique to this run (no other data holds them)."""

    id: str = attrs.field(factory=lambda: f"customer-{uuid.uuid4().hex[:8]}")
    email: str = attrs.field(factory=lambda: f"{uuid.uuid4().hex}@example.org")
    name: str = attrs.field(factory=lambda: f"name-{uuid.uuid4().hex}")

    def streams(self) -> list[str]:
        """Its streams with a command loop."""
        return [f"{self.id}.{k}" for k in range(STREAMS)]

    @property
    def held(self) -> str:
        """The stream of the append that C holds open while the forget starts."""
        return f"{self.id}.held"


@attrs.define
class Child:
    """A process of this test: its stdout's lines as they come, its stdin, its stderr's file."""

    process: trio.Process
    stderr: Path
    lines: list[str] = attrs.field(factory=list)
    _arrived: trio.Event = attrs.field(factory=trio.Event)
    _closed: bool = False

    async def read(self) -> None:
        """Collect the lines of stdout until it closes."""
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            *complete, buffer = (buffer + chunk).split(b"\n")
            self.lines.extend(line.decode() for line in complete)
            self._arrived.set()
            self._arrived = trio.Event()
        self._closed = True
        self._arrived.set()

    async def until(self, predicate: Callable[[list[str]], bool], *, within: float = 30) -> None:
        """Wait until *predicate* holds of the lines so far."""
        with trio.fail_after(within):
            while not predicate(self.lines):
                assert not self._closed, f"{self.said()}\nexited early: {self.lines[-5:]}"
                await self._arrived.wait()

    async def send(self, line: str) -> None:
        """Write *line* to its stdin."""
        assert self.process.stdin is not None
        await self.process.stdin.send_all(f"{line}\n".encode())

    async def exited(self, *, within: float = 30) -> int:
        """Its exit code, once it has exited."""
        with trio.fail_after(within):
            return await self.process.wait()

    def said(self) -> str:
        """Its stderr so far."""
        return self.stderr.read_text()


@asynccontextmanager
async def child(
    nursery: trio.Nursery, args: list[str], env: dict[str, str], stderr: Path
) -> AsyncIterator[Child]:
    """Run `PROCESS` with *args*; killed and reaped on the way out if still running."""
    with stderr.open("wb") as errors:
        process = await trio.lowlevel.open_process(
            [sys.executable, str(PROCESS), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            env=env,
        )
        running = Child(process, stderr)
        nursery.start_soon(running.read)
        try:
            yield running
        finally:
            with trio.CancelScope(shield=True):
                process.kill()
                await process.wait()
                assert process.stdin is not None
                await process.stdin.aclose()


async def _seed(store: PostgresStore, customers: list[Customer]) -> None:
    # Rounds over every stream of every customer: the subject's events spread over the log.
    for n in range(ROUNDS):
        for k in range(STREAMS):
            for customer in customers:
                events: list[object] = [
                    PlanChanged(customer.id, f"seed-{n}-{p}", customer.email)
                    for p in range(PER_ROUND)
                ]
                if n == 0:
                    events[0] = CustomerRegistered(
                        customer.id, "basic", customer.email, customer.name
                    )
                await store.append(customer.streams()[k], [registry.new_event(e) for e in events])


async def _app_schema(store: PostgresStore) -> str:
    # The projection's tables (see personal_process.Mail).
    app = f"app_{uuid.uuid4().hex[:10]}"
    await store.admin.execute(
        f'CREATE SCHEMA "{app}"; '
        f'CREATE TABLE "{app}".mail (customer text PRIMARY KEY, email text NOT NULL); '
        f'CREATE TABLE "{app}".applied (position text PRIMARY KEY, batch int NOT NULL, '
        "customer text NOT NULL, type text NOT NULL, plain boolean NOT NULL, "
        "forgotten text NOT NULL)"
    )
    return app


def _outcomes(lines: list[str], stream_ids: list[str]) -> list[tuple[str, str, str]]:
    # C's lines about *stream_ids*: (outcome, stream, position or subject).
    outcomes = []
    for line in lines:
        if line == "holding":
            continue
        outcome, stream, detail = line.split()
        assert outcome in ("ok", "refused"), line
        if stream in stream_ids:
            outcomes.append((outcome, stream, detail))
    return outcomes


async def _waiting_for_the_forget_lock(store: PostgresStore, subject: str) -> bool:
    # Whether a session waits to take the lock of the subject's forget stream exclusively
    # (an advisory lock of two int keys: the second, the stream's hash, is objid).
    return bool(
        await store.admin.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND mode = 'ExclusiveLock' AND objsubid = 2 "
            "AND objid::text::bigint = hashtext($1)::bigint & 4294967295 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            forgotten_stream(subject),
        )
    )


def _no_errors(process: Child, code: int) -> None:
    said = process.said()
    assert code == 0, said
    assert not [line for line in said.splitlines() if "Error" in line or "Traceback" in line]


async def test_a_forget_while_a_process_projects_and_one_decides(
    postgres_server: EmbeddedPostgres | str, postgres_dsn: str, tmp_path: Path
) -> None:
    """The subject is forgotten while P catches up over its events (half-way, a page read)
    and C's commands fold its streams and append its personal data. No process crashes;
    the forget waits for C's append under way, which commits first; each of C's commands
    committed before the forget (its events read back forgotten) or was refused with
    `SubjectForgottenError`, and nothing of the subject was committed after it; P read the
    subject's events plain before the forget and forgotten in every page it read after, ran
    to the last event and erased what it derived; a dump of the database holds none of the
    subject's values, while the other customers' events and snapshots read back plain."""
    kek = os.urandom(32)
    harness = PostgresHarness(postgres_dsn, key_encryption_key=kek)
    subject, other, bystander = Customer(), Customer(), Customer()
    env = {
        **os.environ,
        DSN_ENVIRONMENT_VARIABLE: postgres_dsn,
        KEY_ENCRYPTION_KEY_VARIABLE: base64.b64encode(kek).decode(),
    }
    async with harness.open_store() as store:
        app = await _app_schema(store)
        await _seed(store, [subject, other, bystander])
        schema = store.schema
        async with (
            trio.open_nursery() as nursery,
            child(
                nursery,
                ["project", schema, app, subject.id, str(HALT_AFTER)],
                env,
                tmp_path / "p.err",
            ) as p,
            child(
                nursery,
                ["decide", schema, subject.id, other.id, *subject.streams()],
                env,
                tmp_path / "c.err",
            ) as c,
        ):
            await p.until(lambda lines: any(line.startswith("halfway") for line in lines))
            # Until the forget every command commits: these lines are commits.
            await c.until(lambda lines: len(_outcomes(lines, subject.streams())) >= COMMITTED_FIRST)
            # An append of the subject's data under way as the forget starts: the forget
            # waits for it (the lock of the subject's forget stream, which the append holds
            # shared), and it commits first.
            await c.send("hold")
            await c.until(lambda lines: "holding" in lines)
            records: list[ForgetRecord] = []
            forgot = trio.Event()

            async def forget() -> None:
                records.append(await store.forget(subject.id))
                forgot.set()

            nursery.start_soon(forget)

            async def forget_waits() -> bool:
                assert not forgot.is_set(), "the forget did not wait for the append under way"
                return await _waiting_for_the_forget_lock(store, subject.id)

            await eventually(forget_waits)
            await c.send("release")
            with trio.fail_after(30):
                await forgot.wait()
            [record] = records
            await p.send("go")
            await c.send("forgotten")
            c_code = await c.exited()
            head = await store.last_position()

            async def projected() -> bool:
                [status] = [s for s in await store.projection_status() if s.name == NAME]
                return status.checkpoint == head

            await eventually(projected, within=30)
            await p.send("stop")
            p_code = await p.exited()
        _no_errors(p, p_code)
        _no_errors(c, c_code)
        [halfway] = [line for line in p.lines if line.startswith("halfway")]
        halted = int(halfway.split()[1])
        assert head is not None

        # C: each command on the subject committed before the forget or was refused; each loop
        # was refused, cached state and folded anew, and the other customer's commands go on.
        outcomes = _outcomes(c.lines, [*subject.streams(), subject.held])
        committed = Counter(s for o, s, _ in outcomes if o == "ok")
        late = [x for o, _, x in outcomes if o == "ok" and Position.parse(x) > record.position]
        assert not late, f"committed after the forget ({record.position})"
        assert all(committed[s] > 0 for s in subject.streams()), committed
        assert committed[subject.held] == 1
        refused = [(s, x) for o, s, x in outcomes if o == "refused"]
        assert sorted(refused) == sorted([(s, subject.id) for s in subject.streams()] * 2)
        others = _outcomes(c.lines, other.streams())
        assert all(o == "ok" for o, _, _ in others)
        assert max(Position.parse(x) for _, _, x in others) > record.position

        # The store: the subject's events are those seeded and those of C's committed commands,
        # all before its SubjectForgotten event and read back forgotten; the others' plain.
        events = await read_all(store, page_size=1000)
        mine = [e for e in events if e.subject == subject.id]
        [forgotten] = [e for e in mine if e.type == SUBJECT_FORGOTTEN]
        assert forgotten.position == record.position
        for stream in subject.streams():
            versions = [e.stream_version for e in mine if e.stream_id == stream]
            assert versions == list(range(1, ROUNDS * PER_ROUND + committed[stream] + 1))
        assert [e.stream_version for e in mine if e.stream_id == subject.held] == [1]
        assert all(e.position < record.position for e in mine if e is not forgotten)
        for event in mine:
            if event is not forgotten:
                assert not {"email", "name"} & event.data.keys()
                assert event.forgotten == tuple(event.personal) != ()
        for customer in (other, bystander):
            theirs = [e for e in events if e.subject == customer.id]
            assert theirs
            assert all(e.data["email"] == customer.email for e in theirs)
            assert all(e.forgotten == () for e in theirs)
        # Snapshots (C's state, at every command): the subject's gone, the other's plain.
        for stream in subject.streams():
            assert await store.read_snapshot(stream, "Customer") is None
        for stream in other.streams():
            snapshot = await store.read_snapshot(stream, "Customer")
            assert snapshot is not None
            assert snapshot.data["email"] == other.email

        # P: every event applied once, to the last; the subject's plain in the pages read before
        # the forget (the held batch and the one read ahead meanwhile are either), forgotten in
        # every page read after it; its derived row erased, the others' kept.
        rows = await store.admin.fetch(f'SELECT * FROM "{app}".applied ORDER BY batch')
        assert sorted(r["position"] for r in rows) == sorted(str(e.position) for e in events)
        assert max(Position.parse(r["position"]) for r in rows) == head
        subjects = [
            r for r in rows if r["customer"] == subject.id and r["type"] != SUBJECT_FORGOTTEN
        ]
        assert all(r["plain"] and not r["forgotten"] for r in subjects if r["batch"] <= halted)
        after = [r for r in subjects if r["batch"] > halted + 1]
        assert len(after) >= 2 * BATCH_SIZE, "too few of the subject's events read after the forget"
        assert not [r["position"] for r in after if r["plain"]], "read plain after the forget"
        assert all(r["forgotten"] for r in after)
        mail = {
            r["customer"]: r["email"]
            for r in await store.admin.fetch(f'SELECT customer, email FROM "{app}".mail')
        }
        assert mail == {other.id: other.email, bystander.id: bystander.email}

        # Nothing plain of the subject is stored, where the others' values are.
        text = await dump(postgres_server, postgres_dsn, schema, app)
        for value in (subject.email, subject.name):
            assert value not in text
        assert other.email in text  # in the read model, as the dump shows it
        assert bystander.email in text
        assert subject.id in text
