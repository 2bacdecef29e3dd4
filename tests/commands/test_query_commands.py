"""Commands over a query (dynamic consistency boundaries, issue 28): a unique username and a
course capacity, decided under concurrency, on both stores (`QueryCommandContract`)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator

import attrs
import pytest
import trio

from eventcore_trio import (
    ConfigurationError,
    EventDecodeError,
    EventQuery,
    EventRegistry,
    InvalidArgument,
    NewEvent,
    QueryItem,
    RecordedEvent,
    RetriesExhausted,
    RetryPolicy,
    execute,
    open_memory_store,
)
from eventcore_trio.memory import MemoryStore
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.testing import PostgresHarness

TaggedStore = MemoryStore | PostgresStore


class UsernameTaken(Exception):
    pass


class ClaimUsername:
    def __init__(self, user: str, name: str) -> None:
        self.user, self.name = user, name

    def query(self) -> EventQuery:
        return EventQuery.of(types=["UsernameClaimed"], tags=[f"username:{self.name}"])

    def initial_state(self) -> bool:
        return False

    def evolve(self, taken: bool, event: RecordedEvent) -> bool:
        return True

    def decide(self, taken: bool) -> list[NewEvent]:
        if taken:
            raise UsernameTaken(self.name)
        return [NewEvent("UsernameClaimed", {"user": self.user}, tags=[f"username:{self.name}"])]


CAPACITY = 10


class CourseFull(Exception):
    pass


@attrs.frozen
class Subscribe:
    student: str
    course: str

    def query(self) -> EventQuery:
        return EventQuery([QueryItem(types=["StudentSubscribed"], tags=[f"course:{self.course}"])])

    def initial_state(self) -> int:
        return 0

    def evolve(self, count: int, event: RecordedEvent) -> int:
        return count + 1

    def decide(self, count: int) -> list[NewEvent]:
        if count >= CAPACITY:
            raise CourseFull(self.course)
        return [
            NewEvent(
                "StudentSubscribed",
                {"student": self.student, "course": self.course},
                tags=[f"course:{self.course}", f"student:{self.student}"],
            )
        ]


registry = EventRegistry()


@registry.register("NicknameChosen")
@attrs.frozen
class NicknameChosen:
    nickname: str


@attrs.frozen
class ChooseNickname:
    nickname: str

    def query(self) -> EventQuery:
        return EventQuery.of(tags=[f"nickname:{self.nickname}"])

    def stream_id(self) -> str:
        return "profiles"

    def initial_state(self) -> list[object]:
        return []

    def evolve(self, seen: list[object], event: RecordedEvent) -> list[object]:
        return [*seen, registry.decode(event)]

    def decide(self, seen: list[object]) -> list[NewEvent]:
        if seen:
            return []
        return [
            registry.new_event(NicknameChosen(self.nickname), tags=[f"nickname:{self.nickname}"])
        ]


async def test_a_condition_that_keeps_failing_exhausts_the_retries(store: MemoryStore) -> None:
    """A writer that always gets in first: RetriesExhausted after the policy's attempts,
    nothing written by the command."""

    class Racer(ClaimUsername):
        def decide(self, taken: bool) -> list[NewEvent]:
            # Someone else writes a matching event between every read and append.
            decisions.append(1)
            return super().decide(False)

    decisions: list[int] = []
    real = store.append_tagged

    async def interfering(*args: object, **kwargs: object) -> object:
        await real([NewEvent("UsernameClaimed", {"user": "other"}, tags=["username:bob"])])
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    store.append_tagged = interfering  # type: ignore[method-assign, assignment]
    with pytest.raises(RetriesExhausted):
        await execute(store, Racer("me", "bob"), retry=RetryPolicy(max_attempts=3))
    assert len(decisions) == 3
    read = await store.read_query(ClaimUsername("", "bob").query())
    assert [e.data["user"] for e in read.events] == ["other"] * 3


async def test_a_store_without_queries_is_a_configuration_error() -> None:
    """A store that does not implement TaggedEventStore: a clear error, nothing written."""

    class StreamsOnly:
        def __init__(self, inner: MemoryStore) -> None:
            self.append_atomic = inner.append_atomic
            self.read_stream = inner.read_stream
            self.append = inner.append

    async with open_memory_store() as inner:
        with pytest.raises(ConfigurationError, match="does not read queries"):
            await execute(StreamsOnly(inner), ClaimUsername("u", "x"))
        assert await inner.last_position() is None


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    async with open_memory_store() as store:
        yield store


async def test_a_query_that_is_not_an_event_query_is_refused(store: MemoryStore) -> None:
    """query() must return an EventQuery: a typed error naming the command, nothing written."""

    class Sloppy(ClaimUsername):
        def query(self) -> EventQuery:
            return "username:ada"  # type: ignore[return-value]

    with pytest.raises(InvalidArgument, match=r"Sloppy.query\(\) returned str"):
        await execute(store, Sloppy("u", "ada"))
    assert await store.last_position() is None


async def test_an_undecodable_matching_event_is_an_error_not_a_gap(store: MemoryStore) -> None:
    """A matching event that does not decode (a foreign writer's) fails the read, as
    read_events does by default: a decision never reads past it as if it were not there."""
    store.admin.store_undecodable("foreign")
    with pytest.raises(EventDecodeError):
        await store.read_query(EventQuery([QueryItem()]))


class QueryCommandContract:
    """Query commands on a store; subclasses give the store."""

    async def test_sixteen_claims_of_one_username_give_one_claim_each_time(
        self, store: TaggedStore
    ) -> None:
        """Sixteen tasks claim the same username at once, over many usernames: exactly one
        claim each; the others meet the claim on their retry and are refused by decide."""
        for name in [f"name-{n}" for n in range(20)]:
            won: list[str] = []
            refused: list[str] = []

            async def claim(
                user: str, name: str = name, won: list[str] = won, refused: list[str] = refused
            ) -> None:
                try:
                    await execute(store, ClaimUsername(user, name))
                except UsernameTaken:
                    refused.append(user)
                else:
                    won.append(user)

            async with trio.open_nursery() as nursery:
                for n in range(16):
                    nursery.start_soon(claim, f"user-{n}")
            assert len(won) == 1
            assert len(refused) == 15
            read = await store.read_query(ClaimUsername("", name).query())
            assert [e.data["user"] for e in read.events] == won

    async def test_forty_students_never_overfill_a_course(self, store: TaggedStore) -> None:
        """Forty students subscribe at once to three courses each (of five, capacity 10): no
        course ever holds more than 10, a course refuses only once it is full, and every
        subscription a full course did not refuse is there."""
        rng = random.Random(28)
        wishes = [
            (f"student-{n}", course)
            for n in range(40)
            for course in rng.sample([f"c{c}" for c in range(5)], 3)
        ]
        refused: list[tuple[str, str]] = []

        async def subscribe(student: str, course: str) -> None:
            try:
                await execute(
                    store, Subscribe(student, course), retry=RetryPolicy(max_attempts=100)
                )
            except CourseFull:
                refused.append((student, course))

        async with trio.open_nursery() as nursery:
            for student, course in wishes:
                nursery.start_soon(subscribe, student, course)
        subscribed = Counter(
            e.data["course"]
            for e in (await store.read_query(EventQuery.of(types=["StudentSubscribed"]))).events
        )
        demand = Counter(course for _, course in wishes)
        for course, wanted in demand.items():
            assert subscribed[course] == min(wanted, CAPACITY)
        assert len(refused) == sum(max(0, wanted - CAPACITY) for wanted in demand.values())

    async def test_typed_events_metadata_and_a_stream(self, store: TaggedStore) -> None:
        """A query command writes typed events with tags, to its own stream, stamped with the
        correlation id; a decision to write nothing appends nothing."""
        first = await execute(
            store, ChooseNickname("ada"), registry=registry, correlation_id="corr-1"
        )
        assert first.append is not None
        [(stream, (event,))] = first.events.items()
        assert stream == "profiles"
        assert event.tags == ("nickname:ada",)
        assert event.metadata["correlation_id"] == "corr-1"
        again = await execute(store, ChooseNickname("ada"), registry=registry)
        assert again.append is None
        [recorded] = await store.read_stream("profiles")
        assert registry.decode(recorded) == NicknameChosen("ada")


class TestMemoryQueryCommands(QueryCommandContract):
    """On the memory store."""

    @pytest.fixture
    async def store(self) -> AsyncIterator[MemoryStore]:
        async with open_memory_store() as store:
            yield store


class TestPostgresQueryCommands(QueryCommandContract):
    """On PostgreSQL: the guard locks, not one task at a time, keep the decisions apart."""

    @pytest.fixture
    async def store(self, postgres_dsn: str) -> AsyncIterator[PostgresStore]:
        async with PostgresHarness(postgres_dsn).open_store() as store:
            yield store


async def test_a_command_with_both_a_query_and_streams_is_refused(store: MemoryStore) -> None:
    """query() and streams() on one class: refused, naming both, before anything is read."""

    class Both(ClaimUsername):
        def streams(self) -> list[str]:
            return ["users"]

    with pytest.raises(InvalidArgument, match=r"both query\(\) and streams\(\)"):
        await execute(store, Both("u", "ada"))
    assert await store.last_position() is None


async def test_decide_returning_a_mapping_is_refused(store: MemoryStore) -> None:
    """A QueryCommand's decide returns a list (a stream command's habit of a mapping is a
    clear error, not a decision written under its keys)."""

    class Mapped(ClaimUsername):
        def decide(self, taken: bool) -> list[NewEvent]:
            return {"users": super().decide(taken)}  # type: ignore[return-value]

    with pytest.raises(InvalidArgument, match="must return a list of events"):
        await execute(store, Mapped("u", "ada"))
    assert await store.last_position() is None
