"""Upcasting: events stored in old shapes reach commands, projectors and replays as today's
classes; an event with no way to a class reaches on_error."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import attrs
import pytest

from eventcore_trio import (
    ConfigurationError,
    EventDecodeError,
    EventRegistry,
    EventShape,
    Failure,
    FailureStrategy,
    NewEvent,
    ProjectionContext,
    StateCache,
    Store,
    execute,
    projector,
    replay_dead_letters,
    run_projection,
)
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.postgres._keys import writer_lock_key
from eventcore_trio.testing import BackendHarness, MemoryHarness, PostgresHarness

shop = EventRegistry()


@shop.register("ItemAdded", version=2)
@attrs.frozen
class ItemAdded:
    sku: str
    quantity: int


@shop.register("PriceSet")
@attrs.frozen
class PriceSet:
    sku: str
    cents: int


@shop.register("Discounted")
@attrs.frozen
class Discounted:
    sku: str
    percent: int


@shop.register("CheckedOut")
@attrs.frozen
class CheckedOut:
    total: int


@shop.upcaster("ItemAdded", version=1)
def _item_added_v1(data: dict[str, Any]) -> dict[str, Any]:
    # Version 1 named the fields item and qty.
    return {"sku": data["item"], "quantity": data["qty"]}


@shop.upcaster("ItemPriced")
def _item_priced(data: dict[str, Any]) -> list[EventShape]:
    # A retired event that said two things at once: now two events.
    return [
        EventShape("PriceSet", {"sku": data["item"], "cents": data["cents"]}),
        EventShape("Discounted", {"sku": data["item"], "percent": data["discount"]}),
    ]


@shop.upcaster("CartViewed")
def _cart_viewed(data: dict[str, Any]) -> list[EventShape]:
    return []  # retired: it never meant anything to the cart


@shop.state("Cart")
@attrs.frozen
class Cart:
    quantities: dict[str, int] = attrs.field(factory=dict)
    prices: dict[str, int] = attrs.field(factory=dict)
    discounts: dict[str, int] = attrs.field(factory=dict)

    def evolve(self, event: object) -> Cart:
        match event:
            case ItemAdded(sku, quantity):
                held = self.quantities.get(sku, 0)
                return attrs.evolve(self, quantities={**self.quantities, sku: held + quantity})
            case PriceSet(sku, cents):
                return attrs.evolve(self, prices={**self.prices, sku: cents})
            case Discounted(sku, percent):
                return attrs.evolve(self, discounts={**self.discounts, sku: percent})
        return self

    def total(self) -> int:
        return sum(
            n * self.prices[sku] * (100 - self.discounts.get(sku, 0)) // 100
            for sku, n in self.quantities.items()
        )


@attrs.frozen
class CheckOut:
    cart: str

    def streams(self) -> Mapping[str, type[Cart]]:
        return {self.cart: Cart}

    def decide(self, states: Mapping[str, Cart]) -> Mapping[str, Sequence[Any]]:
        return {self.cart: [CheckedOut(states[self.cart].total())]}


#: What an older release wrote: old type names, old field names, no event_version.
OLD_ROWS = [
    ("ItemAdded", {"item": "apple", "qty": 3}),
    ("CartViewed", {}),
    ("ItemPriced", {"item": "apple", "cents": 100, "discount": 10}),
]
TODAY = [
    ItemAdded("apple", 3),
    PriceSet("apple", 100),
    Discounted("apple", 10),
]


async def write_old_rows(store: Store, stream_id: str) -> None:
    """The rows an older release would have written, bypassing today's registry."""
    if not isinstance(store, PostgresStore):
        await store.append(stream_id, [NewEvent(t, d) for t, d in OLD_ROWS])
        return
    for version, (event_type, data) in enumerate(OLD_ROWS, start=1):
        # As anything that inserts events must, announce the writer first (the writer lock,
        # before the insert gives the statement a transaction id).
        await store.admin.execute(
            f'INSERT INTO "{store.schema}".events '
            "(stream_id, stream_version, event_id, type, data, metadata, stream_hash) "
            "SELECT $1, $2, gen_random_uuid(), $3, $4::jsonb, "
            f"""'{{"correlation_id": "old"}}', "{store.schema}".stream_hash($1) """
            "FROM (SELECT pg_advisory_xact_lock_shared($5)) AS announced",
            stream_id,
            version,
            event_type,
            json.dumps(data),
            writer_lock_key(store.schema),
        )
    await store.admin.execute(
        f'INSERT INTO "{store.schema}".streams (stream_id, version) VALUES ($1, $2)',
        stream_id,
        len(OLD_ROWS),
    )


class UpcastingContract:
    """Upcasting on every backend."""

    @pytest.fixture
    async def store(self, harness: BackendHarness) -> AsyncIterator[Store]:
        async with harness.open_store() as store:
            yield store

    async def test_commands_decide_on_upcast_events(self, store: Store) -> None:
        """The old rows fold into today's state; the decision uses it."""
        await write_old_rows(store, "cart-1")
        result = await execute(store, CheckOut("cart-1"), registry=shop, cache=StateCache())
        assert result.events["cart-1"][0].data == {"total": 270}
        new = (await store.read_stream("cart-1"))[-1]
        assert shop.decode(new) == CheckedOut(270)

    async def test_projectors_and_replays_get_upcast_events(self, store: Store) -> None:
        """A projector gets today's classes in order (a split as two events, a retired one
        as none); a dead-lettered old event replays upcast too."""
        await write_old_rows(store, "cart-1")
        seen: dict[Any, list[object]] = {}
        fail_prices = True

        def skip(failure: Failure) -> FailureStrategy:
            return FailureStrategy.SKIP

        @projector("shop", registry=shop, on_error=skip)
        async def items(event: object, ctx: ProjectionContext) -> None:
            if isinstance(event, PriceSet) and fail_prices:
                raise RuntimeError("price service down")
            assert ctx.event is not None
            # Effects outside ctx.db are at-least-once (a failed batch's good prefix runs
            # again): note each event once.
            applied = seen.setdefault(ctx.event.stream_version, [])
            if event not in applied:
                applied.append(event)

        await run_projection(store, items)
        assert seen == {1: [TODAY[0]]}
        [letter] = await store.dead_letters("shop")
        assert letter.event.type == "ItemPriced"
        fail_prices = False
        replay = await replay_dead_letters(store, items)
        assert (replay.replayed, replay.failed) == (1, 0)
        assert seen == {1: [TODAY[0]], 3: TODAY[1:]}

    async def test_no_way_to_a_class_reaches_on_error(self, store: Store) -> None:
        """A version nothing reads, or an upcaster that fails, is an EventDecodeError for
        on_error, never a crash of the projection."""
        await store.append(
            "cart-1", [NewEvent("ItemAdded", {"x": 1}, metadata={"event_version": 7})]
        )
        await store.append("cart-1", [NewEvent("ItemPriced", {"item": "pear"})])
        await store.append("cart-1", [shop.new_event(ItemAdded("pear", 1))])
        failures: dict[int, BaseException] = {}
        seen: set[object] = set()

        def skip(failure: Failure) -> FailureStrategy:
            assert failure.event is not None
            failures[failure.event.stream_version] = failure.error
            return FailureStrategy.SKIP

        @projector("shop", registry=shop, on_error=skip)
        async def items(event: object, ctx: ProjectionContext) -> None:
            seen.add(event)

        await run_projection(store, items)
        assert seen == {ItemAdded("pear", 1)}
        assert sorted(failures) == [1, 2]
        assert all(isinstance(e, EventDecodeError) for e in failures.values())
        assert "version 7" in str(failures[1])
        assert "raised KeyError" in str(failures[2])


class TestMemoryUpcasting(UpcastingContract):
    """Upcasting on the in-memory store."""

    @pytest.fixture
    def harness(self) -> BackendHarness:
        return MemoryHarness()


class TestPostgresUpcasting(UpcastingContract):
    """Upcasting on PostgreSQL, from rows inserted as an older release wrote them."""

    @pytest.fixture
    def harness(self, postgres_dsn: str) -> BackendHarness:
        return PostgresHarness(postgres_dsn)


class TestRegistryVersions:
    """Versions and upcasters in the registry itself."""

    def test_new_events_carry_their_version(self) -> None:
        """A class above version 1 stamps event_version; version 1 stays unstamped."""
        assert shop.new_event(ItemAdded("a", 1)).metadata == {"event_version": 2}
        assert shop.new_event(PriceSet("a", 1)).metadata == {}

    def test_upcaster_registration_errors(self) -> None:
        """Upcasters read older versions only, once each."""
        local = EventRegistry()

        @local.register("A", version=2)
        @attrs.frozen
        class A:
            x: int

        with pytest.raises(ConfigurationError, match="older version"):
            local.upcaster("A", version=2)(dict)
        local.upcaster("A", version=1)(dict)
        with pytest.raises(ConfigurationError, match="already"):
            local.upcaster("A", version=1)(dict)
        local.upcaster("B", version=3)(dict)
        with pytest.raises(ConfigurationError, match="higher version"):
            local.register("B", version=3)(attrs.frozen(type("B", (), {})))
        with pytest.raises(ConfigurationError):
            local.register("C", version=0)

    async def test_cycles_and_bad_results_are_decode_errors(self) -> None:
        """A cycle of upcasters, or one that returns nonsense, raises EventDecodeError."""
        from eventcore_trio import open_memory_store

        local = EventRegistry()
        local.upcaster("Ping")(lambda data: EventShape("Pong", data))
        local.upcaster("Pong")(lambda data: EventShape("Ping", data))
        local.upcaster("Odd")(lambda data: 42)  # type: ignore[arg-type, return-value]
        async with open_memory_store() as store:
            await store.append("s", [NewEvent("Ping", {}), NewEvent("Odd", {})])
            ping, odd = await store.read_stream("s")
        with pytest.raises(EventDecodeError, match="cycle"):
            local.decode_all(ping)
        with pytest.raises(EventDecodeError, match="returned int"):
            local.decode_all(odd)

    async def test_decode_refuses_a_split(self) -> None:
        """decode() wants exactly one object; decode_all() takes the split."""
        from eventcore_trio import open_memory_store

        async with open_memory_store() as store:
            await store.append(
                "s", [NewEvent("ItemPriced", {"item": "a", "cents": 1, "discount": 0})]
            )
            [stored] = await store.read_stream("s")
        with pytest.raises(EventDecodeError, match="decode_all"):
            shop.decode(stored)
        assert shop.decode_all(stored) == (PriceSet("a", 1), Discounted("a", 0))

    def test_state_registration_errors(self) -> None:
        """A state needs attrs, defaults, evolve, and a valid snapshot interval."""
        local = EventRegistry()

        @attrs.frozen
        class NoDefault:
            x: int

            def evolve(self, event: object) -> NoDefault:
                return self

        @attrs.frozen
        class NoEvolve:
            x: int = 0

        with pytest.raises(ConfigurationError, match="default"):
            local.state("S")(NoDefault)
        with pytest.raises(ConfigurationError, match="evolve"):
            local.state("S")(NoEvolve)
        with pytest.raises(ConfigurationError, match="attrs"):
            local.state("S")(type("Plain", (), {"evolve": lambda self, e: self}))
        with pytest.raises(ConfigurationError, match="snapshot_every"):
            local.state("S", snapshot_every=0)
