"""execute(): multi-stream decisions, retries, domain errors and causal metadata."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import attrs
import pytest
import trio

from eventcore_trio import (
    ConfigurationError,
    EventDecodeError,
    EventEncodeError,
    EventRegistry,
    InvalidArgument,
    NewEvent,
    RecordedEvent,
    RetriesExhausted,
    RetryPolicy,
    Store,
    StreamAppend,
    caused_by,
    execute,
)
from eventcore_trio._validation import encode_json_object
from eventcore_trio.demo import (
    Account,
    AccountOpened,
    InsufficientFunds,
    MoneyDeposited,
    OpenAccount,
    Transfer,
    balance_after,
    random_transfer,
    registry,
)
from eventcore_trio.projection import ProjectionContext, projector, run_projection
from eventcore_trio.testing import BackendHarness, MemoryHarness, PostgresHarness

from .transfer_process import run_in_process, transfers

FAST = RetryPolicy(max_attempts=100, initial_backoff=0.001, max_backoff=0.02)


async def balances(store: Store, accounts: Sequence[str]) -> dict[str, int]:
    result = {}
    for account in accounts:
        balance = 0
        for event in await store.read_stream(account):
            balance = balance_after(balance, event)
        result[account] = balance
    return result


@attrs.frozen
class Approve:
    """Writes an approval that depends on a limit stream it only reads."""

    limits: str
    requests: str

    def streams(self) -> Sequence[str]:
        return [self.limits]

    def initial_state(self) -> int:
        return 0

    def evolve(self, state: int, event: RecordedEvent) -> int:
        return int(event.data["limit"])

    def decide(self, state: int) -> Mapping[str, Sequence[Any]]:
        return {self.requests: [NewEvent("Approved", {"under_limit": state})]}


class ExecuteContract:
    """execute() on every backend."""

    @pytest.fixture
    async def store(self, harness: BackendHarness) -> AsyncIterator[Store]:
        async with harness.open_store() as store:
            yield store

    async def test_transfer_writes_both_streams_atomically(self, store: Store) -> None:
        """A decision over two streams appends to both, typed events encoded."""
        for account in ("a", "b"):
            await execute(store, OpenAccount(account, 100), registry=registry)
        result = await execute(store, Transfer("a", "b", 30), registry=registry)
        assert result.attempts == 1
        assert result.append is not None
        assert result.append.stream_versions == {"a": 2, "b": 2}
        assert await balances(store, ["a", "b"]) == {"a": 70, "b": 130}
        deposited = (await store.read_stream("b"))[-1]
        assert registry.decode(deposited) == MoneyDeposited(30, "a")

    async def test_domain_errors_are_never_retried(self, store: Store) -> None:
        """A domain error from decide propagates at once; nothing is written."""
        await execute(store, OpenAccount("a", 10), registry=registry)
        await execute(store, OpenAccount("b", 0), registry=registry)
        calls = 0

        class Counting(Transfer):
            def decide(self, states: Mapping[str, Account]) -> Mapping[str, Sequence[Any]]:
                nonlocal calls
                calls += 1
                return super().decide(states)

        with pytest.raises(InsufficientFunds):
            await execute(store, Counting("a", "b", 50), registry=registry, retry=FAST)
        assert calls == 1
        assert len(await store.read_stream("a")) == 1

    async def test_stale_read_only_participant_is_retried(self, store: Store) -> None:
        """A stream read but not written that changes before the append makes it retry."""
        await store.append("limits", [NewEvent("LimitSet", {"limit": 5})])
        original = store.append_atomic
        interfered = False

        async def interfering(appends: Sequence[StreamAppend]) -> Any:
            nonlocal interfered
            if not interfered:
                interfered = True  # a concurrent writer changes the limit first
                await original([StreamAppend("limits", [NewEvent("LimitSet", {"limit": 9})])])
            return await original(appends)

        store.append_atomic = interfering  # type: ignore[method-assign]
        result = await execute(store, Approve("limits", "requests"), retry=FAST)
        assert result.attempts == 2
        approved = await store.read_stream("requests")
        assert [e.data for e in approved] == [{"under_limit": 9}]

    async def test_decide_runs_again_on_every_attempt(self, store: Store) -> None:
        """After a conflict decide() is called again, on the new state, and only the last
        decision is written: a side effect inside decide() would happen once per attempt."""
        await store.append("limits", [NewEvent("LimitSet", {"limit": 5})])
        for account in ("a", "b"):
            await execute(store, OpenAccount(account, 100), registry=registry)
        decided: list[object] = []

        class RecordingApprove(Approve):
            def decide(self, state: int) -> Mapping[str, Sequence[Any]]:
                decided.append(state)  # the kind of side effect decide() must not have
                return super().decide(state)

        class RecordingTransfer(Transfer):
            def decide(self, states: Mapping[str, Account]) -> Mapping[str, Sequence[Any]]:
                decided.append(states["a"].balance)
                return super().decide(states)

        original = store.append_atomic
        races = [
            StreamAppend("limits", [NewEvent("LimitSet", {"limit": 9})]),
            StreamAppend("a", [registry.new_event(MoneyDeposited(1, "x"))]),
        ]

        async def racing(appends: Sequence[StreamAppend]) -> Any:
            if len(decided) == 1:  # another writer, between the first decision and its append
                await original([races.pop(0)])
            return await original(appends)

        store.append_atomic = racing  # type: ignore[method-assign]
        result = await execute(store, RecordingApprove("limits", "requests"), retry=FAST)
        assert (result.attempts, decided) == (2, [5, 9])
        assert [e.data for e in await store.read_stream("requests")] == [{"under_limit": 9}]
        decided.clear()
        result = await execute(
            store, RecordingTransfer("a", "b", 30), registry=registry, retry=FAST
        )
        assert (result.attempts, decided) == (2, [100, 101])
        assert await balances(store, ["a", "b"]) == {"a": 71, "b": 130}

    async def test_retries_are_bounded(self, store: Store) -> None:
        """A command that always meets a conflict gives up after max_attempts."""
        original = store.append_atomic
        attempts = 0

        async def always_conflicting(appends: Sequence[StreamAppend]) -> Any:
            nonlocal attempts
            attempts += 1
            # Another writer moves the limit first (through the unpatched append).
            await original([StreamAppend("limits", [NewEvent("LimitSet", {"limit": attempts})])])
            return await original(appends)

        await store.append("limits", [NewEvent("LimitSet", {"limit": 0})])
        store.append_atomic = always_conflicting  # type: ignore[method-assign]
        policy = RetryPolicy(max_attempts=4, initial_backoff=0.001)
        with pytest.raises(RetriesExhausted) as info:
            await execute(store, Approve("limits", "requests"), retry=policy)
        assert info.value.attempts == 4
        assert attempts == 4
        assert await store.read_stream("requests") == []

    async def test_concurrent_transfers_conserve_money(self, store: Store) -> None:
        """Many concurrent transfers: total conserved, nothing overdrawn, conflicts retried."""
        accounts = [f"acc-{n}" for n in range(5)]
        for account in accounts:
            await execute(store, OpenAccount(account, 100), registry=registry)
        outcomes = {"done": 0, "refused": 0, "retried": 0}

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(15):
                attempts = await random_transfer(store, accounts, rng, most=60, retry=FAST)
                if attempts is None:
                    outcomes["refused"] += 1
                else:
                    outcomes["done"] += 1
                    outcomes["retried"] += attempts > 1

        async with trio.open_nursery() as nursery:
            for seed in range(8):
                nursery.start_soon(worker, seed)
        final = await balances(store, accounts)
        assert sum(final.values()) == 500
        assert min(final.values()) >= 0
        assert outcomes["done"] + outcomes["refused"] == 8 * 15
        writes = 0
        for account in accounts:
            writes += len(await store.read_stream(account)) - 1
        assert writes == 2 * outcomes["done"]

    async def test_metadata_follows_the_causal_chain(self, store: Store) -> None:
        """Correlation and causation ids flow from a command through a projector's reaction."""
        await execute(store, OpenAccount("a", 50), registry=registry)
        await execute(store, OpenAccount("b", 0), registry=registry)
        result = await execute(
            store, Transfer("a", "b", 20), registry=registry, metadata={"user": "ada"}
        )
        deposited = (await store.read_stream("b"))[-1]
        assert deposited.metadata["user"] == "ada"
        assert deposited.metadata["correlation_id"] == result.correlation_id
        assert deposited.metadata["causation_id"] == result.correlation_id

        @projector("notifier", event_types=["MoneyDeposited"], registry=registry)
        async def notifier(event: MoneyDeposited, ctx: ProjectionContext) -> None:
            assert ctx.event is not None
            await store.append(
                f"notifications-{ctx.event.stream_id}",
                [NewEvent("Notified", {"amount": event.amount}, metadata=caused_by(ctx.event))],
            )

        await run_projection(store, notifier)
        (notified,) = await store.read_stream("notifications-b")
        assert notified.metadata["correlation_id"] == result.correlation_id
        assert notified.metadata["causation_id"] == str(deposited.event_id)

        @attrs.frozen
        class Thank:
            def streams(self) -> Sequence[str]:
                return []

            def initial_state(self) -> None:
                return None

            def evolve(self, state: None, event: RecordedEvent) -> None:
                return None

            def decide(self, state: None) -> Mapping[str, Sequence[Any]]:
                return {"thanks": [NewEvent("Thanked", {})]}

        reaction = await execute(store, Thank(), caused_by_event=notified)
        (thanked,) = await store.read_stream("thanks")
        assert reaction.correlation_id == result.correlation_id
        assert thanked.metadata["causation_id"] == str(notified.event_id)

    async def test_typed_projector_sends_unknown_types_to_on_error(self, store: Store) -> None:
        """A projector with a registry gets typed events; an unregistered type is a failure."""
        await execute(store, OpenAccount("a", 5), registry=registry)
        await store.append("a", [NewEvent("Unregistered", {})])
        # Keyed by event id: effects outside ctx.db are at-least-once (a failed batch's good
        # prefix is applied again), so count each event once.
        seen: dict[object, object] = {}
        failures: list[BaseException] = []

        from eventcore_trio import FailureStrategy

        def skip(failure: Any) -> FailureStrategy:
            failures.append(failure.error)
            return FailureStrategy.SKIP

        @projector("typed", registry=registry, on_error=skip)
        async def typed(event: object, ctx: ProjectionContext) -> None:
            assert ctx.event is not None
            seen[ctx.event.event_id] = event

        await run_projection(store, typed)
        assert list(seen.values()) == [AccountOpened(5)]
        assert len(failures) == 1
        assert isinstance(failures[0], EventDecodeError)
        assert "not registered" in str(failures[0])

    async def test_streams_discovered_from_state_are_read_and_checked(self, store: Store) -> None:
        """more_streams() adds streams found in what was read; they are folded and checked."""
        await store.append("order-1", [NewEvent("Placed", {"customer": "customer-7"})])
        await store.append("customer-7", [NewEvent("CreditLimit", {"limit": 3})])

        @attrs.frozen
        class Ship:
            def streams(self) -> Sequence[str]:
                return ["order-1"]

            def more_streams(self, state: dict[str, Any]) -> Sequence[str]:
                return [state["customer"]] if "customer" in state else []

            def initial_state(self) -> dict[str, Any]:
                return {}

            def evolve(self, state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
                return {**state, **event.data}

            def decide(self, state: dict[str, Any]) -> Mapping[str, Sequence[Any]]:
                return {"order-1": [NewEvent("Shipped", {"limit_seen": state["limit"]})]}

        original = store.append_atomic
        seen: list[list[tuple[str, int | None]]] = []

        async def recording(appends: Sequence[StreamAppend]) -> Any:
            seen.append([(a.stream_id, a.expected_version) for a in appends])
            return await original(appends)

        store.append_atomic = recording  # type: ignore[method-assign]
        await execute(store, Ship())
        assert sorted(seen[0]) == [("customer-7", 1), ("order-1", 1)]
        assert (await store.read_stream("order-1"))[-1].data == {"limit_seen": 3}

    async def test_invalid_commands_are_refused(self, store: Store) -> None:
        """Objects that are not commands, and untyped outputs without a registry, are refused."""
        with pytest.raises(InvalidArgument, match="not a command"):
            await execute(store, object())  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="registry"):
            await execute(store, OpenAccount("a", 1))

    async def test_a_misspelt_fold_method_is_named(self, store: Store) -> None:
        """A fold command with `evolve` misspelt is not mistaken for a state command that
        lacks its registry: the error names the missing method."""

        class Typo:
            def streams(self) -> list[str]:
                return ["a"]

            def initial_state(self) -> int:
                return 0

            def evolv(self, state: int, event: RecordedEvent) -> int:
                return state + 1

            def decide(self, state: int) -> list[NewEvent]:
                return []

        with pytest.raises(InvalidArgument, match=r"no evolve\(\).*spelling") as caught:
            await execute(store, Typo())  # type: ignore[arg-type]
        assert "registry" not in str(caught.value).split(";")[0]


class TestMemoryExecute(ExecuteContract):
    """execute() on the in-memory store."""

    @pytest.fixture
    def harness(self) -> BackendHarness:
        return MemoryHarness()


class TestPostgresExecute(ExecuteContract):
    """execute() on PostgreSQL, including writers in other processes."""

    @pytest.fixture
    def harness(self, postgres_dsn: str) -> BackendHarness:
        return PostgresHarness(postgres_dsn)

    async def test_transfers_from_several_processes(
        self, store: Store, harness: PostgresHarness
    ) -> None:
        """Three processes and local tasks transfer at once: money is conserved exactly."""
        accounts = [f"acc-{n}" for n in range(4)]
        for account in accounts:
            await execute(store, OpenAccount(account, 100), registry=registry)

        reports: list[dict[str, int]] = []

        async def collect(seed: int) -> None:
            reports.append(
                await run_in_process(harness.dsn, harness.schema, seed, 25, accounts, cache=False)
            )

        async with trio.open_nursery() as nursery:
            for seed in (1, 2, 3):
                nursery.start_soon(collect, seed)
            nursery.start_soon(transfers, store, accounts, 99, 25, None)
        final = await balances(store, accounts)
        assert sum(final.values()) == 400
        assert min(final.values()) >= 0
        assert len(reports) == 3
        for report in reports:
            assert report["done"] + report["refused"] + report["exhausted"] == 25


class TestRetryPolicy:
    """RetryPolicy's backoff and validation."""

    def test_backoff_doubles_up_to_the_cap(self) -> None:
        """Without jitter the delay doubles per failed attempt, capped at max_backoff."""
        policy = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, jitter=False)
        assert [policy.backoff(n) for n in range(1, 6)] == [0.01, 0.02, 0.04, 0.05, 0.05]

    def test_jitter_stays_under_the_cap(self) -> None:
        """With jitter every delay lies between zero and the cap."""
        policy = RetryPolicy(initial_backoff=0.01, max_backoff=0.05)
        rng = random.Random(1)
        delays = [policy.backoff(3, rng) for _ in range(200)]
        assert all(0 <= d <= 0.04 for d in delays)
        assert len(set(delays)) > 100

    @pytest.mark.parametrize(
        "kwargs", [{"max_attempts": 0}, {"initial_backoff": -1}, {"max_backoff": "1"}]
    )
    def test_invalid_policy(self, kwargs: dict[str, object]) -> None:
        """Invalid settings raise ConfigurationError."""
        with pytest.raises(ConfigurationError):
            RetryPolicy(**kwargs)  # type: ignore[arg-type]


class TestRegistry:
    """EventRegistry."""

    def test_round_trip(self) -> None:
        """A registered object encodes to a NewEvent and decodes back."""
        local = EventRegistry()

        @local.register("Thing")
        @attrs.frozen
        class Thing:
            name: str
            count: int

        event = local.new_event(Thing("x", 2), metadata={"k": "v"})
        assert (event.type, dict(event.data), dict(event.metadata)) == (
            "Thing",
            {"name": "x", "count": 2},
            {"k": "v"},
        )

    def test_state_keys_declared_int_round_trip_and_others_are_refused(self) -> None:
        """A state's mapping declared with int keys is snapshotted with the keys' text and
        decodes to the same ints; other keys that are not a str make the snapshot an
        EventEncodeError naming them (JSON would change them: 1 and "1" would collide)."""
        local = EventRegistry()

        @local.state("Tally")
        @attrs.frozen
        class Tally:
            by_amount: dict[int, int] = attrs.field(factory=dict)
            loose: dict[Any, int] = attrs.field(factory=dict)

            def evolve(self, event: object) -> Tally:
                return self

        kind = local.state_type(Tally)
        state = Tally({1: 2, 30: 4}, {"a": 1})
        text = encode_json_object("snapshot", local.encode_state(kind, state))
        data = json.loads(text)
        assert data["by_amount"] == {"1": 2, "30": 4}
        assert local.decode_state(kind, data, 1) == state
        for loose in ({1: 1}, {1: 1, "1": 2}, {True: 1}):
            encoded = local.encode_state(kind, Tally(loose=loose))
            with pytest.raises(EventEncodeError, match=r"in snapshot\['loose'\]"):
                encode_json_object("snapshot", encoded)

    def test_registration_errors(self) -> None:
        """Non-attrs classes and duplicate names or classes are refused."""
        local = EventRegistry()

        @local.register("A")
        @attrs.frozen
        class A:
            x: int

        with pytest.raises(ConfigurationError, match="already registered"):
            local.register("A")(attrs.frozen(type("B", (), {"__annotations__": {"y": "int"}})))
        with pytest.raises(ConfigurationError, match="already registered"):
            local.register("Other")(A)
        with pytest.raises(ConfigurationError, match="not an attrs class"):
            local.register("Plain")(type("Plain", (), {}))
        with pytest.raises(InvalidArgument):
            local.new_event(object())
