"""State commands: the state cache, snapshots, and their failure modes, on both backends."""

from __future__ import annotations

import datetime as dt
import logging
import typing
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Literal

import attrs
import pytest
import trio

from eventcore_trio import (
    AppendResult,
    ConfigurationError,
    EventDecodeError,
    EventRegistry,
    InvalidArgument,
    NewEvent,
    RecordedEvent,
    Snapshot,
    SnapshotStore,
    StateCache,
    Store,
    StreamAppend,
    VersionConflict,
    execute,
    take_snapshot,
)
from eventcore_trio._typed import fields_fingerprint
from eventcore_trio.demo import (
    Account,
    InsufficientFunds,
    MoneyDeposited,
    MoneyWithdrawn,
    OpenAccount,
    Transfer,
    balance_after,
    registry,
)
from eventcore_trio.testing import BackendHarness, MemoryHarness, PostgresHarness

from .restore import backup, restore
from .transfer_process import run_in_process, transfers

counters = EventRegistry()


@counters.register("Added")
@attrs.frozen
class Added:
    n: int


@counters.state("Counter", version=2, snapshot_every=5)
@attrs.frozen
class Counter:
    total: int = 0
    events: int = 0

    def evolve(self, event: object) -> Counter:
        assert isinstance(event, Added)
        return Counter(self.total + event.n, self.events + 1)


@counters.state_upcaster("Counter", version=1)
def _counter_v1(data: dict[str, Any]) -> dict[str, Any]:
    # Version 1 kept only the total, under another name.
    return {"total": data["sum"], "events": data["count"]}


@attrs.frozen
class Add:
    """Adds n to a counter stream; the decision records the total it saw."""

    stream: str
    n: int

    def streams(self) -> Mapping[str, type[Counter]]:
        return {self.stream: Counter}

    def decide(self, states: Mapping[str, Counter]) -> Mapping[str, Sequence[Any]]:
        return {self.stream: [Added(self.n)]}


@attrs.frozen
class Peek:
    """Writes nothing; records the state it was given."""

    stream: str
    seen: list[Counter]

    def streams(self) -> Mapping[str, type[Counter]]:
        return {self.stream: Counter}

    def decide(self, states: Mapping[str, Counter]) -> Mapping[str, Sequence[Any]]:
        self.seen.append(states[self.stream])
        return {}


async def peek(store: Store, stream: str, cache: StateCache | None = None) -> Counter:
    seen: list[Counter] = []
    await execute(store, Peek(stream, seen), registry=counters, cache=cache)
    return seen[-1]


@attrs.frozen
class Audit:
    """Reads accounts with the bank's state and writes nothing."""

    accounts: tuple[str, ...]

    def streams(self) -> Mapping[str, type[Account]]:
        return dict.fromkeys(self.accounts, Account)

    def decide(self, states: Mapping[str, Account]) -> Mapping[str, Sequence[Any]]:
        return {}


wallets = EventRegistry()


@wallets.register("Credited")
@attrs.frozen
class Credited:
    amount: int


@wallets.register("Debited")
@attrs.frozen
class Debited:
    amount: int


class Overdrawn(Exception):
    pass


@wallets.state("Wallet", snapshot_every=3)
@attrs.frozen
class Wallet:
    balance: int = 0

    def evolve(self, event: object) -> Wallet:
        if isinstance(event, Credited):
            return Wallet(self.balance + event.amount)
        assert isinstance(event, Debited)
        return Wallet(self.balance - event.amount)


def credited(amount: int, key: uuid.UUID | None = None) -> NewEvent:
    """A credit, with the request's idempotency key as the event's id when given."""
    event = wallets.new_event(Credited(amount))
    return NewEvent(event.type, event.data, metadata=event.metadata, event_id=key)


@attrs.frozen
class Credit:
    """Credits a wallet; *key* is the request's idempotency key (the event's id)."""

    stream: str
    amount: int
    key: uuid.UUID | None = None

    def streams(self) -> Mapping[str, type[Wallet]]:
        return {self.stream: Wallet}

    def decide(self, states: Mapping[str, Wallet]) -> Mapping[str, Sequence[Any]]:
        return {self.stream: [credited(self.amount, self.key)]}


@attrs.frozen
class Debit:
    """Debits a wallet; refused when the balance would go below zero."""

    stream: str
    amount: int

    def streams(self) -> Mapping[str, type[Wallet]]:
        return {self.stream: Wallet}

    def decide(self, states: Mapping[str, Wallet]) -> Mapping[str, Sequence[Any]]:
        balance = states[self.stream].balance
        if balance < self.amount:
            raise Overdrawn(f"{self.stream} has {balance}")
        return {self.stream: [Debited(self.amount)]}


@attrs.frozen
class Look:
    """Reads a wallet and writes nothing."""

    stream: str

    def streams(self) -> Mapping[str, type[Wallet]]:
        return {self.stream: Wallet}

    def decide(self, states: Mapping[str, Wallet]) -> Mapping[str, Sequence[Any]]:
        return {}


async def wallet_balance(store: Store, stream: str) -> int:
    """A wallet's balance, folded from its stream."""
    state = Wallet()
    for event in await store.read_stream(stream):
        for item in wallets.decode_all(event):
            state = state.evolve(item)
    return state.balance


async def lost_and_retried(store: Store, cache: StateCache) -> RecordedEvent:
    """A restore loses a credit with an idempotency key and the credit before it; another
    writer's credit and the client's retry of the keyed request grow the stream back.

    Before the restore: v1 credit 10 (backed up), v2 credit 100, v3 credit 5 with key K, and
    *cache* and a snapshot (snapshot_every=3) hold 115 at v3, ending at event K. After it: v2
    is another writer's credit of 1 and v3 is K again, so the wallet holds 16. Returns the
    retried event.
    """
    key = uuid.uuid4()
    await execute(store, Credit("w", 10), registry=wallets, cache=cache)
    saved = await backup(store)
    await execute(store, Credit("w", 100), registry=wallets, cache=cache)
    await execute(store, Credit("w", 5, key), registry=wallets, cache=cache)
    await execute(store, Look("w"), registry=wallets, cache=cache)
    entry = cache.get(store, "Wallet", "w")
    assert entry is not None
    assert (entry.state, entry.version, entry.event_id) == (Wallet(115), 3, key)
    assert isinstance(store, SnapshotStore)
    snapshot = await store.read_snapshot("w", "Wallet")
    assert snapshot is not None
    assert (snapshot.stream_version, snapshot.event_id) == (3, key)
    lost = (await store.read_stream("w"))[2]
    await restore(store, saved)
    # Other writers, not state commands (nothing looks at the cache or the snapshot).
    await store.append("w", [credited(1)], expected_version=1)
    await store.append("w", [credited(5, key)], expected_version=2)
    retried = (await store.read_stream("w"))[2]
    assert (retried.stream_version, retried.event_id) == (3, key)
    # The same id at the same version; only when it was recorded tells the two apart.
    assert retried.recorded_at > lost.recorded_at
    assert await wallet_balance(store, "w") == 16
    return retried


async def balances(store: Store, *accounts: str) -> dict[str, int]:
    """Each account's balance, folded from its stream."""
    found = {}
    for account in accounts:
        balance = 0
        for event in await store.read_stream(account):
            balance = balance_after(balance, event)
        found[account] = balance
    return found


async def grow_back(store: Store) -> None:
    """Another writer (no cache, no snapshots) moves 95 from acc to other: both streams are
    at version 2 again, as before the restore, with other events."""
    await store.append_atomic(
        [
            StreamAppend(
                "acc", [registry.new_event(MoneyWithdrawn(95, "other"))], expected_version=1
            ),
            StreamAppend(
                "other", [registry.new_event(MoneyDeposited(95, "acc"))], expected_version=1
            ),
        ]
    )


def at(event: RecordedEvent) -> dict[str, Any]:
    """The Snapshot arguments that name *event* as the last one folded."""
    return {"event_id": event.event_id, "event_recorded_at": event.recorded_at}


def state_data(snapshot: Snapshot) -> dict[str, Any]:
    """A snapshot's state, without the fingerprint of its class's fields."""
    return {k: v for k, v in snapshot.data.items() if k != "@fields"}


def rewritten_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings state commands logged about rewritten streams."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "eventcore_trio.commands" and r.levelno == logging.WARNING
    ]


@attrs.frozen
class LimitSet:
    amount: int


def card_classes() -> tuple[type[Any], type[Any]]:
    """State "Card", version 1, before and after a field ``limit`` (folded from LimitSet
    events) was added without raising the version. New classes on every call, as two
    releases would have."""

    @attrs.frozen
    class CardBefore:
        balance: int = 0

        def evolve(self, event: object) -> CardBefore:
            if isinstance(event, Credited):
                return CardBefore(self.balance + event.amount)
            return self  # LimitSet: nothing folded it yet

    @attrs.frozen
    class Card:
        balance: int = 0
        limit: int = 0

        def evolve(self, event: object) -> Card:
            match event:
                case Credited(amount):
                    return attrs.evolve(self, balance=self.balance + amount)
                case LimitSet(amount):
                    return attrs.evolve(self, limit=amount)
            return self

    return CardBefore, Card


def card_registry(state: type[Any], *, version: int = 1) -> EventRegistry:
    """A registry with the card's events and *state* registered as "Card"."""
    registry = EventRegistry()
    registry.register("Credited")(Credited)
    registry.register("LimitSet")(LimitSet)
    registry.state("Card", version=version, snapshot_every=100)(state)
    return registry


@attrs.frozen
class Inspect:
    """Reads one stream as *state* and writes nothing; records the state it was given."""

    stream: str
    state: type[Any]
    seen: list[Any]

    def streams(self) -> Mapping[str, type[Any]]:
        return {self.stream: self.state}

    def decide(self, states: Mapping[str, Any]) -> Mapping[str, Sequence[Any]]:
        self.seen.append(states[self.stream])
        return {}


async def state_of(
    store: Store,
    registry: EventRegistry,
    state: type[Any],
    stream: str,
    cache: StateCache | None = None,
) -> Any:
    """The state a command that reads *stream* as *state* decides on."""
    seen: list[Any] = []
    await execute(store, Inspect(stream, state, seen), registry=registry, cache=cache)
    return seen[-1]


def fields_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings state commands logged about snapshots taken with other fields."""
    return [m for m in rewritten_warnings(caplog) if "other fields" in m]


class RacingStore:
    """A real store whose next append is preceded by another writer's append to a stream.

    It also records every read_stream call, to show from which version a retry reads.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self.reads: list[tuple[str, int]] = []
        self.race: list[tuple[str, NewEvent]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def read_stream(self, stream_id: str, *, after_version: int = 0) -> list[Any]:
        self.reads.append((stream_id, after_version))
        return await self._store.read_stream(stream_id, after_version=after_version)

    async def append_atomic(self, appends: Sequence[StreamAppend]) -> AppendResult:
        if self.race:
            stream_id, event = self.race.pop(0)
            await self._store.append(stream_id, [event])
        return await self._store.append_atomic(appends)


class StatesContract:
    """State commands on every backend."""

    @pytest.fixture
    async def store(self, harness: BackendHarness) -> AsyncIterator[Store]:
        async with harness.open_store() as store:
            yield store

    async def test_cache_reads_only_new_events(self, store: Store) -> None:
        """Once a state is cached, a command folds only the events written since."""
        cache = StateCache()
        for n in range(1, 21):
            await execute(store, Add("c", n), registry=counters, cache=cache)
        assert await peek(store, "c", cache) == Counter(210, 20)
        stats = cache.stats
        # Each command folds the one event the previous one wrote (the first: none).
        assert stats.events_folded == 20
        assert (stats.hits, stats.misses) == (20, 1)
        assert await peek(store, "c") == Counter(210, 20)  # no cache: folds everything

    async def test_conflict_refreshes_from_the_cached_version(self, store: Store) -> None:
        """A conflict re-reads only what follows the cached version, never from zero."""
        cache = StateCache()
        racing = RacingStore(store)  # the cache keeps states per store object
        for _ in range(10):
            await execute(racing, Add("c", 1), registry=counters, cache=cache)
        racing.reads.clear()
        racing.race.append(("c", counters.new_event(Added(100))))
        result = await execute(racing, Add("c", 1), registry=counters, cache=cache)
        assert result.attempts == 2
        # Cached at 9 (each read starts one event early, to prove the stream is that long);
        # after the conflict, at 10: never from zero.
        assert racing.reads == [("c", 8), ("c", 9)]
        assert await peek(store, "c") == Counter(111, 12)

    async def test_snapshots_spare_a_cold_process_the_fold(self, store: Store) -> None:
        """Every snapshot_every events a snapshot is kept; a cold cache starts from it."""
        assert isinstance(store, SnapshotStore)
        warm = StateCache()
        for _ in range(12):
            await execute(store, Add("c", 2), registry=counters, cache=warm)
        snapshot = await store.read_snapshot("c", "Counter")
        assert snapshot is not None
        assert (snapshot.state_version, snapshot.stream_version) == (2, 10)
        assert state_data(snapshot) == {"total": 20, "events": 10}
        assert warm.stats.snapshots_written == 2  # at 5 and at 10 folded events
        cold = StateCache()
        assert await peek(store, "c", cold) == Counter(24, 12)
        assert (cold.stats.snapshots_read, cold.stats.events_folded) == (1, 2)

    async def test_snapshot_of_an_older_state_version(self, store: Store) -> None:
        """An older snapshot is upcast when a state upcaster reads it, else ignored."""
        assert isinstance(store, SnapshotStore)
        for _ in range(3):
            await store.append("c", [counters.new_event(Added(1))])
        second = (await store.read_stream("c"))[1]
        # Version 1 with an upcaster: used (its made-up total shows it was).
        await store.write_snapshot(
            Snapshot("c", "Counter", 1, 2, {"sum": 50, "count": 2}, **at(second))
        )
        cache = StateCache()
        assert await peek(store, "c", cache) == Counter(51, 3)
        assert cache.stats.snapshots_read == 1
        # A version nothing reads, and data that no longer fits: ignored, folded from events.
        for version, data in ((3, {"total": 50, "events": 2}), (2, {"unknown": 1})):
            await store.delete_snapshots()
            await store.write_snapshot(Snapshot("c", "Counter", version, 2, data, **at(second)))
            cache = StateCache()
            assert await peek(store, "c", cache) == Counter(3, 3)
            assert (cache.stats.snapshots_read, cache.stats.events_folded) == (0, 3)

    async def test_deleting_snapshots_changes_nothing(self, store: Store) -> None:
        """The same states and decisions with snapshots, without, and after deleting them."""
        assert isinstance(store, SnapshotStore)
        for n in range(17):
            await execute(store, Add(f"s{n % 3}", n), registry=counters, cache=StateCache())
        with_snapshots = [await peek(store, f"s{i}", StateCache()) for i in range(3)]
        assert await store.delete_snapshots("s0") == 1
        assert await store.delete_snapshots() == 2
        assert await store.read_snapshot("s1", "Counter") is None
        without = [await peek(store, f"s{i}", StateCache()) for i in range(3)]
        folded = []
        for i in range(3):
            total = sum(e.data["n"] for e in await store.read_stream(f"s{i}"))
            folded.append(Counter(total, len(await store.read_stream(f"s{i}"))))
        assert with_snapshots == without == folded

    async def test_state_ahead_of_its_stream_is_folded_again(self, store: Store) -> None:
        """A snapshot claiming more events than the stream has (the events were restored
        from an older backup, say) is never used, even by a decision that writes nothing:
        the stream is folded from its first event and the snapshot is dropped."""
        assert isinstance(store, SnapshotStore)
        for _ in range(3):
            await store.append("c", [counters.new_event(Added(1))])
        lost = Snapshot(
            "c",
            "Counter",
            2,
            50,
            {"total": 99, "events": 50},
            event_id=uuid.uuid4(),
            event_recorded_at=dt.datetime.now(dt.UTC),
        )
        await store.write_snapshot(lost)
        assert await peek(store, "c") == Counter(3, 3)
        assert await store.read_snapshot("c", "Counter") is None
        await store.write_snapshot(lost)
        result = await execute(store, Add("c", 1), registry=counters, cache=StateCache())
        assert result.attempts == 1
        assert result.append is not None
        assert result.append.stream_versions == {"c": 4}
        assert await peek(store, "c") == Counter(4, 4)

    async def test_restored_stream_grown_back_under_a_warm_cache(
        self, store: Store, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A warm cache whose streams were restored from an older backup, then grown back to
        the cached versions by other writers with other events, is not trusted: the
        withdrawal of 60 from an account that now holds 5 is refused."""
        caplog.set_level(logging.WARNING, logger="eventcore_trio.commands")
        cache = StateCache()
        await execute(store, OpenAccount("acc", 100), registry=registry, cache=cache)
        await execute(store, OpenAccount("other", 0), registry=registry, cache=cache)
        saved = await backup(store)
        await execute(store, Transfer("acc", "other", 10), registry=registry, cache=cache)
        await execute(store, Audit(("acc", "other")), registry=registry, cache=cache)
        entry = cache.get(store, "Account", "acc")
        assert entry is not None
        assert (entry.state, entry.version) == (Account(True, 90), 2)
        await restore(store, saved)  # the transfer of 10 is lost
        await grow_back(store)
        with pytest.raises(InsufficientFunds, match="acc has 5"):
            await execute(store, Transfer("acc", "other", 60), registry=registry, cache=cache)
        assert await balances(store, "acc", "other") == {"acc": 5, "other": 95}
        # Once per stream, naming it.
        warnings = rewritten_warnings(caplog)
        assert sorted(w.split(" ")[1] for w in warnings) == ["'acc'", "'other'"]
        # The entries were replaced by the real history's, and are trusted from now on.
        last = (await store.read_stream("acc"))[-1]
        entry = cache.get(store, "Account", "acc")
        assert entry is not None
        assert (entry.state, entry.version, entry.event_id, entry.event_recorded_at) == (
            Account(True, 5),
            2,
            last.event_id,
            last.recorded_at,
        )
        caplog.clear()
        await execute(store, Transfer("acc", "other", 5), registry=registry, cache=cache)
        assert await balances(store, "acc", "other") == {"acc": 0, "other": 100}
        assert rewritten_warnings(caplog) == []

    async def test_restored_stream_grown_back_past_a_durable_snapshot(
        self, store: Store, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A snapshot taken before the events were restored from an older backup (the
        snapshots were not), at the version other writers then grew the stream back to, is
        not used by a cold process: the withdrawal of 60 from 5 is refused."""
        assert isinstance(store, SnapshotStore)
        caplog.set_level(logging.WARNING, logger="eventcore_trio.commands")
        await execute(store, OpenAccount("acc", 100), registry=registry)
        await execute(store, OpenAccount("other", 0), registry=registry)
        saved = await backup(store)
        await execute(store, Transfer("acc", "other", 10), registry=registry)
        stale = await take_snapshot(store, registry, Account, "acc")
        assert stale is not None
        assert (stale.stream_version, state_data(stale)) == (2, {"opened": True, "balance": 90})
        await restore(store, saved)
        await grow_back(store)
        cold = StateCache()
        with pytest.raises(InsufficientFunds, match="acc has 5"):
            await execute(store, Transfer("acc", "other", 60), registry=registry, cache=cold)
        assert await balances(store, "acc", "other") == {"acc": 5, "other": 95}
        assert cold.stats.snapshots_read == 0
        [warning] = rewritten_warnings(caplog)
        assert warning.startswith("stream 'acc' ")
        # The stale snapshot is gone (the next is 500 events away); one taken now is used.
        assert await store.read_snapshot("acc", "Account") is None
        taken = await take_snapshot(store, registry, Account, "acc")
        assert taken is not None
        last = (await store.read_stream("acc"))[-1]
        assert (taken.event_id, taken.event_recorded_at) == (last.event_id, last.recorded_at)
        cold = StateCache()
        await execute(store, Transfer("acc", "other", 5), registry=registry, cache=cold)
        assert cold.stats.snapshots_read == 1
        assert await balances(store, "acc", "other") == {"acc": 0, "other": 100}
        assert len(rewritten_warnings(caplog)) == 1

    async def test_restore_under_a_cache_and_a_snapshot_replaces_both(
        self, store: Store, caplog: pytest.LogCaptureFixture
    ) -> None:
        """When a warm cache and a snapshot were both folded from a history a restore
        replaced, one warning is logged, and the state, the cache entry and the snapshot
        are all the real history's, even for a decision that writes nothing."""
        assert isinstance(store, SnapshotStore)
        caplog.set_level(logging.WARNING, logger="eventcore_trio.commands")
        for _ in range(3):
            await store.append("c", [counters.new_event(Added(1))])
        saved = await backup(store)
        cache = StateCache()
        for _ in range(2):
            await execute(store, Add("c", 1), registry=counters, cache=cache)
        assert await peek(store, "c", cache) == Counter(5, 5)  # and a snapshot at 5
        stale = await store.read_snapshot("c", "Counter")
        assert stale is not None
        assert stale.stream_version == 5
        await restore(store, saved)
        for _ in range(2):
            await store.append("c", [counters.new_event(Added(100))])
        assert await peek(store, "c", cache) == Counter(203, 5)
        [warning] = rewritten_warnings(caplog)
        assert warning.startswith("stream 'c' ")
        last = (await store.read_stream("c"))[-1]
        entry = cache.get(store, "Counter", "c")
        assert entry is not None
        assert (entry.version, entry.event_id, entry.event_recorded_at) == (
            5,
            last.event_id,
            last.recorded_at,
        )
        replaced = await store.read_snapshot("c", "Counter")
        assert replaced is not None
        assert (
            replaced.stream_version,
            replaced.event_id,
            replaced.event_recorded_at,
            state_data(replaced),
        ) == (5, last.event_id, last.recorded_at, {"total": 203, "events": 5})
        cold = StateCache()
        assert await peek(store, "c", cold) == Counter(203, 5)
        assert cold.stats.snapshots_read == 1
        assert len(rewritten_warnings(caplog)) == 1

    async def test_an_idempotent_retry_after_a_restore_under_a_warm_cache(
        self, store: Store, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A warm cache folded up to an event that a restore lost and its writer's retry
        put back (the same id, at the same version, on top of another history) is not
        trusted: a debit of 100 from a wallet holding 16 is refused."""
        assert isinstance(store, SnapshotStore)
        caplog.set_level(logging.WARNING, logger="eventcore_trio.commands")
        cache = StateCache()
        retried = await lost_and_retried(store, cache)
        with pytest.raises(Overdrawn, match="w has 16"):
            await execute(store, Debit("w", 100), registry=wallets, cache=cache)
        assert await wallet_balance(store, "w") == 16
        [warning] = rewritten_warnings(caplog)
        assert warning.startswith("stream 'w' ")
        # The entry and the snapshot are the real history's, and trusted from now on.
        entry = cache.get(store, "Wallet", "w")
        assert entry is not None
        assert (entry.state, entry.version, entry.event_id, entry.event_recorded_at) == (
            Wallet(16),
            3,
            retried.event_id,
            retried.recorded_at,
        )
        snapshot = await store.read_snapshot("w", "Wallet")
        assert snapshot is not None
        assert (snapshot.event_id, snapshot.event_recorded_at, state_data(snapshot)) == (
            retried.event_id,
            retried.recorded_at,
            {"balance": 16},
        )
        await execute(store, Debit("w", 16), registry=wallets, cache=cache)
        assert await wallet_balance(store, "w") == 0
        assert len(rewritten_warnings(caplog)) == 1

    async def test_an_idempotent_retry_after_a_restore_past_a_snapshot(
        self, store: Store, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The same for a cold process: the snapshot that ends at the lost event, which the
        retry's event has the id of, is not used, and is replaced."""
        assert isinstance(store, SnapshotStore)
        caplog.set_level(logging.WARNING, logger="eventcore_trio.commands")
        retried = await lost_and_retried(store, StateCache())
        cold = StateCache()
        with pytest.raises(Overdrawn, match="w has 16"):
            await execute(store, Debit("w", 100), registry=wallets, cache=cold)
        assert await wallet_balance(store, "w") == 16
        assert cold.stats.snapshots_read == 0
        [warning] = rewritten_warnings(caplog)
        assert warning.startswith("stream 'w' ")
        snapshot = await store.read_snapshot("w", "Wallet")
        assert snapshot is not None
        assert (snapshot.event_id, snapshot.event_recorded_at, state_data(snapshot)) == (
            retried.event_id,
            retried.recorded_at,
            {"balance": 16},
        )
        cold = StateCache()
        await execute(store, Debit("w", 16), registry=wallets, cache=cold)
        assert cold.stats.snapshots_read == 1
        assert await wallet_balance(store, "w") == 0
        assert len(rewritten_warnings(caplog)) == 1

    async def test_snapshots_never_move_backwards(self, store: Store) -> None:
        """Concurrent writers cannot replace a snapshot with an older one."""
        assert isinstance(store, SnapshotStore)
        for _ in range(10):
            await store.append("c", [counters.new_event(Added(1))])
        events = await store.read_stream("c")
        await store.write_snapshot(
            Snapshot("c", "Counter", 2, 10, {"total": 10, "events": 10}, **at(events[9]))
        )
        await store.write_snapshot(
            Snapshot("c", "Counter", 2, 5, {"total": 5, "events": 5}, **at(events[4]))
        )
        kept = await store.read_snapshot("c", "Counter")
        assert kept is not None
        assert (kept.stream_version, kept.event_id, kept.event_recorded_at) == (
            10,
            events[9].event_id,
            events[9].recorded_at,
        )
        assert kept.taken_at is not None

    async def test_a_snapshot_its_stream_no_longer_proves_is_replaced(self, store: Store) -> None:
        """A kept snapshot without its event, or whose event (by id, or with the same id
        recorded at another time) is not the stream's at its version, is replaced by any
        write, even of the same or a lower stream version."""
        assert isinstance(store, SnapshotStore)
        for _ in range(5):
            await store.append("c", [counters.new_event(Added(1))])
        last = (await store.read_stream("c"))[4]
        earlier = last.recorded_at - dt.timedelta(seconds=1)
        for kept_version, kept_id, kept_at in (
            (9, uuid.uuid4(), last.recorded_at),
            (5, last.event_id, earlier),
            (5, None, None),
        ):
            await store.delete_snapshots()
            await store.write_snapshot(
                Snapshot(
                    "c",
                    "Counter",
                    2,
                    kept_version,
                    {"total": 0, "events": 0},
                    event_id=kept_id,
                    event_recorded_at=kept_at,
                )
            )
            await store.write_snapshot(
                Snapshot("c", "Counter", 2, 5, {"total": 5, "events": 5}, **at(last))
            )
            kept = await store.read_snapshot("c", "Counter")
            assert kept is not None
            assert (kept.stream_version, kept.event_id, kept.event_recorded_at) == (
                5,
                last.event_id,
                last.recorded_at,
            )
            assert dict(kept.data) == {"total": 5, "events": 5}

    async def test_snapshot_without_an_event_id_is_never_used(self, store: Store) -> None:
        """A snapshot that does not name its last event (taken before snapshots recorded
        it) is treated as absent, even at the stream's exact version, and is replaced."""
        assert isinstance(store, SnapshotStore)
        for _ in range(5):
            await store.append("c", [counters.new_event(Added(1))])
        await store.write_snapshot(Snapshot("c", "Counter", 2, 5, {"total": 99, "events": 5}))
        cache = StateCache()
        assert await peek(store, "c", cache) == Counter(5, 5)
        assert (cache.stats.snapshots_read, cache.stats.snapshots_written) == (0, 1)
        kept = await store.read_snapshot("c", "Counter")
        assert kept is not None
        last = (await store.read_stream("c"))[-1]
        assert (kept.stream_version, kept.event_id, kept.event_recorded_at) == (
            5,
            last.event_id,
            last.recorded_at,
        )
        assert state_data(kept) == {"total": 5, "events": 5}

    async def test_a_field_added_without_raising_the_version_is_caught(
        self, store: Store, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A snapshot taken before a field was added to its state class, the version not
        raised, is not used: the field is folded from the events (limit 500, not its
        default 0), one warning says to raise the version, and the snapshot is replaced."""
        assert isinstance(store, SnapshotStore)
        caplog.set_level(logging.WARNING, logger="eventcore_trio.commands")
        before, after = card_classes()
        old = card_registry(before)
        for stream in ("card-1", "card-2"):
            await store.append(stream, [old.new_event(LimitSet(500)), old.new_event(Credited(20))])
            taken = await take_snapshot(store, old, before, stream)
            assert taken is not None
            assert state_data(taken) == {"balance": 20}
        new = card_registry(after)  # the next release: Card gained limit, still version 1
        cold = StateCache()
        assert await state_of(store, new, after, "card-1", cold) == after(balance=20, limit=500)
        assert (cold.stats.snapshots_read, cold.stats.events_folded) == (0, 2)
        [warning] = fields_warnings(caplog)
        assert warning.startswith("the snapshot of stream 'card-1' under state 'Card' ")
        assert "it has no 'limit'" in warning
        assert "@registry.state('Card', version=2)" in warning
        assert await store.read_snapshot("card-1", "Card") is None
        # Every such snapshot is folded again; the warning is not repeated.
        assert await state_of(store, new, after, "card-2", StateCache()) == after(20, 500)
        assert await store.read_snapshot("card-2", "Card") is None
        assert rewritten_warnings(caplog) == [warning]
        # One taken with today's fields is used.
        await take_snapshot(store, new, after, "card-1")
        cold = StateCache()
        assert await state_of(store, new, after, "card-1", cold) == after(20, 500)
        assert cold.stats.snapshots_read == 1
        assert rewritten_warnings(caplog) == [warning]

    async def test_a_raised_version_upcasts_snapshots_without_their_fingerprint(
        self, store: Store, caplog: pytest.LogCaptureFixture
    ) -> None:
        """With the version raised, an older snapshot goes to the state upcaster as the
        state's data alone (no fingerprint), is used, and warns of nothing."""
        caplog.set_level(logging.WARNING, logger="eventcore_trio.commands")
        before, after = card_classes()
        old = card_registry(before)
        await store.append("card", [old.new_event(Credited(20))])
        await take_snapshot(store, old, before, "card")
        new = card_registry(after, version=2)
        given: list[dict[str, Any]] = []

        @new.state_upcaster("Card", version=1)
        def _no_limit_yet(data: dict[str, Any]) -> dict[str, Any]:
            given.append(dict(data))
            return {**data, "limit": 0}  # no LimitSet was ever written to this stream

        cold = StateCache()
        assert await state_of(store, new, after, "card", cold) == after(20, 0)
        assert cold.stats.snapshots_read == 1
        assert given == [{"balance": 20}]
        assert rewritten_warnings(caplog) == []

    async def test_a_snapshot_that_records_no_fields_is_never_used(
        self, store: Store, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A snapshot of today's version without the fingerprint of its fields (taken before
        snapshots recorded it, or written by hand) is not used, without a warning, and is
        replaced by one that records them."""
        assert isinstance(store, SnapshotStore)
        caplog.set_level(logging.WARNING, logger="eventcore_trio.commands")
        for _ in range(5):
            await store.append("c", [counters.new_event(Added(1))])
        last = (await store.read_stream("c"))[-1]
        await store.write_snapshot(
            Snapshot("c", "Counter", 2, 5, {"total": 99, "events": 5}, **at(last))
        )
        cache = StateCache()
        assert await peek(store, "c", cache) == Counter(5, 5)
        assert (cache.stats.snapshots_read, cache.stats.snapshots_written) == (0, 1)
        assert rewritten_warnings(caplog) == []
        kept = await store.read_snapshot("c", "Counter")
        assert kept is not None
        assert kept.data == {"total": 5, "events": 5, "@fields": fields_fingerprint(Counter)}
        cache = StateCache()
        assert await peek(store, "c", cache) == Counter(5, 5)
        assert cache.stats.snapshots_read == 1

    async def test_a_cached_state_of_another_class_is_not_used(self, store: Store) -> None:
        """Two classes registered under one state name (two registries, a reloaded module)
        and one cache: each command gets its own class's state, folded from the events."""
        before, after = card_classes()
        old, new = card_registry(before), card_registry(after)
        await store.append("card", [old.new_event(LimitSet(500)), old.new_event(Credited(20))])
        cache = StateCache()
        assert await state_of(store, old, before, "card", cache) == before(20)
        assert await state_of(store, new, after, "card", cache) == after(20, 500)
        assert await state_of(store, old, before, "card", cache) == before(20)
        assert await state_of(store, old, before, "card", cache) == before(20)
        assert cache.stats.hits == 1

    async def test_take_snapshot_on_demand(self, store: Store) -> None:
        """take_snapshot folds the stream now and keeps it; an empty stream has none."""
        for _ in range(3):
            await store.append("c", [counters.new_event(Added(2))])
        snapshot = await take_snapshot(store, counters, Counter, "c")
        assert snapshot is not None
        assert (snapshot.stream_version, state_data(snapshot)) == (3, {"total": 6, "events": 3})
        assert await take_snapshot(store, counters, Counter, "empty") is None

    async def test_bad_state_commands(self, store: Store) -> None:
        """Clear errors for a missing registry, unregistered classes and a bad evolve."""
        with pytest.raises(InvalidArgument, match="registry"):
            await execute(store, Add("c", 1))

        @attrs.frozen
        class Unregistered:
            def evolve(self, event: object) -> Unregistered:
                return self

        @attrs.frozen
        class UsesUnregistered:
            def streams(self) -> Mapping[str, type[Any]]:
                return {"c": Unregistered}

            def decide(self, states: Mapping[str, Any]) -> Mapping[str, Sequence[Any]]:
                return {}

        with pytest.raises(InvalidArgument, match="not a registered state class"):
            await execute(store, UsesUnregistered(), registry=counters)

        local = EventRegistry()
        local.register("Added")(Added)

        @local.state("Broken")
        @attrs.frozen
        class Broken:
            def evolve(self, event: object) -> int:
                return 1

        @attrs.frozen
        class UsesBroken:
            def streams(self) -> Mapping[str, type[Any]]:
                return {"c": Broken}

            def decide(self, states: Mapping[str, Any]) -> Mapping[str, Sequence[Any]]:
                return {}

        await store.append("c", [local.new_event(Added(1))])
        with pytest.raises(InvalidArgument, match=r"must return the next .*Broken"):
            await execute(store, UsesBroken(), registry=local)
        with pytest.raises(ConfigurationError, match="snapshot_every"):
            await take_snapshot(store, local, Broken, "c")
        with pytest.raises(InvalidArgument, match="StateCache"):
            await execute(store, Add("c", 1), registry=counters, cache={})  # type: ignore[arg-type]
        assert isinstance(store, SnapshotStore)
        with pytest.raises(InvalidArgument):
            await store.write_snapshot(Snapshot("c", "Counter", 0, 1, {}))
        with pytest.raises(InvalidArgument):
            await store.write_snapshot(Snapshot("", "Counter", 1, 1, {}))
        with pytest.raises(InvalidArgument):
            await store.write_snapshot("snapshot")  # type: ignore[arg-type]
        now = dt.datetime.now(dt.UTC)
        with pytest.raises(InvalidArgument, match="event_id"):
            await store.write_snapshot(
                Snapshot(
                    "c",
                    "Counter",
                    1,
                    1,
                    {},
                    event_id="e1",  # type: ignore[arg-type]
                    event_recorded_at=now,
                )
            )
        with pytest.raises(InvalidArgument, match="timezone-aware"):
            await store.write_snapshot(
                Snapshot(
                    "c",
                    "Counter",
                    1,
                    1,
                    {},
                    event_id=uuid.uuid4(),
                    event_recorded_at=now.replace(tzinfo=None),
                )
            )
        for one_of_two in ({"event_id": uuid.uuid4()}, {"event_recorded_at": now}):
            with pytest.raises(InvalidArgument, match="give both"):
                await store.write_snapshot(Snapshot("c", "Counter", 1, 1, {}, **one_of_two))

    async def test_an_error_loading_one_of_several_streams_arrives_alone(
        self, store: Store
    ) -> None:
        """Streams load concurrently; a failure in one is raised as itself, not a group."""

        @attrs.frozen
        class AddBoth:
            def streams(self) -> Mapping[str, type[Counter]]:
                return {"good": Counter, "bad": Counter}

            def decide(self, states: Mapping[str, Counter]) -> Mapping[str, Sequence[Any]]:
                return {"good": [Added(1)]}

        await store.append("good", [counters.new_event(Added(1))])
        await store.append("bad", [NewEvent("Unknown", {})])
        with pytest.raises(EventDecodeError, match="Unknown"):
            await execute(store, AddBoth(), registry=counters, cache=StateCache())
        assert len(await store.read_stream("good")) == 1


class TestMemoryStates(StatesContract):
    """State commands on the in-memory store."""

    @pytest.fixture
    def harness(self) -> BackendHarness:
        return MemoryHarness()


class TestPostgresStates(StatesContract):
    """State commands on PostgreSQL, with writers in several processes."""

    @pytest.fixture
    def harness(self, postgres_dsn: str) -> BackendHarness:
        return PostgresHarness(postgres_dsn)

    async def test_cached_writers_in_several_processes(
        self, store: Store, harness: PostgresHarness
    ) -> None:
        """Three processes with caches and local cached tasks transfer between the same
        accounts: money is conserved and never overdrawn (no decision on a stale state), and
        each process folds every event at most once (conflicts refresh incrementally)."""
        accounts = [f"acc-{n}" for n in range(4)]
        for account in accounts:
            await execute(store, OpenAccount(account, 100), registry=registry)
        reports: list[dict[str, int]] = []
        cache = StateCache()

        async def in_process(seed: int) -> None:
            reports.append(
                await run_in_process(harness.dsn, harness.schema, seed, 40, accounts, cache=True)
            )

        async def local(seed: int) -> None:
            local_reports.append(await transfers(store, accounts, seed, 40, cache))

        local_reports: list[dict[str, int]] = []
        async with trio.open_nursery() as nursery:
            for seed in (1, 2, 3):
                nursery.start_soon(in_process, seed)
            nursery.start_soon(local, 98)
            nursery.start_soon(local, 99)

        stored = 0
        final = []
        for account in accounts:
            events = await store.read_stream(account)
            stored += len(events)
            balance = 0
            for event in events:
                balance = balance_after(balance, event)
                assert balance >= 0, f"{account} was overdrawn at version {event.stream_version}"
            final.append(balance)
        assert sum(final) == 400
        assert len(reports) == 3
        retried = sum(r["retried"] for r in [*reports, *local_reports])
        assert retried > 0, "no conflicts happened: the test proves nothing about refreshes"
        for report in [*reports, {"events_folded": cache.stats.events_folded}]:
            # Each event is folded at most once per process: the cache only moves forward.
            assert 0 < report["events_folded"] <= stored
        for report in reports:
            assert report["done"] + report["refused"] + report["exhausted"] == 40
            assert report["exhausted"] == 0

    async def test_snapshot_rows_with_bad_json_are_ignored(
        self, store: Store, harness: PostgresHarness
    ) -> None:
        """A snapshot row edited by hand into something that is not an object is a miss."""
        from eventcore_trio.postgres import PostgresStore

        assert isinstance(store, PostgresStore)
        for _ in range(2):
            await store.append("c", [counters.new_event(Added(3))])
        await store.admin.execute(
            f'INSERT INTO "{store.schema}".snapshots '
            "(stream_id, state, state_version, stream_version, data) "
            "VALUES ('c', 'Counter', 2, 2, '[1, 2]')"
        )
        assert await store.read_snapshot("c", "Counter") is None
        assert await peek(store, "c", StateCache()) == Counter(6, 2)


class TestStateCache:
    """StateCache's bound, its per-store keys and its forward-only entries."""

    def test_bounded_least_recently_used(self) -> None:
        from eventcore_trio.commands._cache import CachedState

        cache = StateCache(max_entries=2)
        store = RacingStore.__new__(RacingStore)
        marked: dict[str, Any] = {
            "event_id": uuid.uuid4(),
            "event_recorded_at": dt.datetime.now(dt.UTC),
        }
        for name in ("a", "b"):
            cache.put(store, "S", name, CachedState(name, 1, 0, **marked))
        assert cache.get(store, "S", "a") is not None  # a is now the most recent
        cache.put(store, "S", "c", CachedState("c", 1, 0, **marked))
        assert cache.get(store, "S", "b") is None
        assert len(cache) == 2
        other = RacingStore.__new__(RacingStore)
        assert cache.get(other, "S", "a") is None  # never shared between stores
        cache.put(store, "S", "a", CachedState("old", 0, 0, event_id=None, event_recorded_at=None))
        found = cache.get(store, "S", "a")
        assert found is not None
        assert found.state == "a"  # never moves backwards
        cache.clear()
        assert len(cache) == 0

    def test_invalid_size(self) -> None:
        with pytest.raises(ConfigurationError):
            StateCache(max_entries=0)

    async def test_conflicts_still_raise_without_retries(self) -> None:
        """A stale cache never writes: the expected version catches it."""
        from eventcore_trio import RetriesExhausted, RetryPolicy, open_memory_store

        async with open_memory_store() as store:
            cache = StateCache()
            racing = RacingStore(store)
            await execute(racing, Add("c", 1), registry=counters, cache=cache)
            racing.race.append(("c", counters.new_event(Added(5))))
            with pytest.raises(RetriesExhausted) as raised:
                await execute(
                    racing,
                    Add("c", 1),
                    registry=counters,
                    cache=cache,
                    retry=RetryPolicy(max_attempts=1),
                )
            assert isinstance(raised.value.__cause__, VersionConflict)
            assert await peek(store, "c") == Counter(6, 2)


@attrs.frozen
class Item:
    sku: str
    quantity: int


@attrs.frozen
class Product:  # Item under another name, with the same fields
    quantity: int
    sku: str


@attrs.frozen
class ItemWithPrice:
    sku: str
    quantity: int
    cents: int = 0


@attrs.frozen
class Node:
    children: tuple[Node, ...] = ()


class TestFieldsFingerprint:
    """What the fingerprint of a state class's fields sees, and what it ignores."""

    @staticmethod
    def fingerprint(**fields: Any) -> str:
        """The fingerprint of a new class with *fields* (name: type), each with a default."""
        these = {name: attrs.field(type=kind, default=None) for name, kind in fields.items()}
        return fields_fingerprint(attrs.make_class("State", these, frozen=True))

    def test_names_and_types_count(self) -> None:
        """A field added, removed or renamed, or a type changed, changes it."""
        base = self.fingerprint(balance=int, limit=int)
        assert self.fingerprint(balance=int, limit=int) == base
        for changed in (
            {"balance": int},
            {"balance": int, "limit": int, "owner": str},
            {"balance": int, "ceiling": int},
            {"balance": int, "limit": str},
            {"balance": int, "limit": int | None},
            {"balance": int, "limit": list[int]},
        ):
            assert self.fingerprint(**changed) != base, changed

    def test_nested_classes_count_by_their_fields(self) -> None:
        """A nested attrs class counts by its fields, also inside generic types; its name
        does not count."""
        items = self.fingerprint(items=list[Item])
        assert self.fingerprint(items=list[Product]) == items
        assert self.fingerprint(items=list[ItemWithPrice]) != items
        assert self.fingerprint(item=Item | None) == self.fingerprint(item=Product | None)
        assert self.fingerprint(item=Item) != self.fingerprint(item=ItemWithPrice)
        assert fields_fingerprint(Node)  # a class that holds itself

    def test_spelling_and_order_do_not_count(self) -> None:
        """Field order, and the spelling of one type, change nothing."""
        assert self.fingerprint(a=int, b=str) == self.fingerprint(b=str, a=int)
        assert self.fingerprint(a=int | None) == self.fingerprint(a=typing.Optional[int])  # noqa: UP045
        assert self.fingerprint(a=str | int) == self.fingerprint(a=int | str)
        assert self.fingerprint(a=list[int]) == self.fingerprint(a=typing.List[int])  # noqa: UP006
        assert self.fingerprint(a=Literal["x", "y"]) != self.fingerprint(a=Literal["x"])

    def test_an_annotation_that_does_not_resolve_counts_by_its_text(self) -> None:
        """A name defined only in a function cannot be resolved: its text counts."""

        @attrs.frozen
        class Local:
            n: int = 0

        @attrs.frozen
        class Holder:
            inner: Local = attrs.field(factory=Local)

        assert fields_fingerprint(Holder) == self.fingerprint(inner="Local")

    async def test_a_type_changed_without_raising_the_version_is_caught(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """cattrs would read a snapshot's 500 as "500" for a field that became a str: the
        fingerprint tells, the stream is folded, and the warning says a type differs."""
        from eventcore_trio import open_memory_store

        caplog.set_level(logging.WARNING, logger="eventcore_trio.commands")

        @attrs.frozen
        class Before:
            limit: int = 0

            def evolve(self, event: object) -> Before:
                assert isinstance(event, LimitSet)
                return Before(event.amount)

        @attrs.frozen
        class After:
            limit: str = ""  # now with its currency

            def evolve(self, event: object) -> After:
                assert isinstance(event, LimitSet)
                return After(f"{event.amount} EUR")

        old, new = card_registry(Before), card_registry(After)
        async with open_memory_store() as store:
            await store.append("card", [old.new_event(LimitSet(500))])
            await take_snapshot(store, old, Before, "card")
            assert await state_of(store, new, After, "card", StateCache()) == After("500 EUR")
        [warning] = fields_warnings(caplog)
        assert "a field's type differs" in warning
