"""The partitioning hash, pinned forever, and the rules for units and changing counts."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventcore_trio import (
    InvalidArgument,
    NewEvent,
    Partition,
    PartitionsChanged,
    partition_of,
    stream_hash,
)
from eventcore_trio._partitions import Unit, plan_repartition, split_parent, units_of
from eventcore_trio.postgres import PostgresStore
from eventcore_trio.testing import PostgresHarness

# Never edit these: a changed hash moves streams between partitions, and every stored
# checkpoint of a partitioned projection would then skip or repeat their events.
GOLDEN = {
    "order-1": 196076065,
    "account-42": 3195541655,
    "é": 1251562878,
    "🚀": 3954969384,
    "a/b/c": 3614079858,
    "Straße": 1487107980,
    "x" * 255: 3525708250,
}


def test_the_hash_is_pinned() -> None:
    """The same stream ids map to the same hashes (and so partitions) forever."""
    assert {stream: stream_hash(stream) for stream in GOLDEN} == GOLDEN
    assert partition_of("order-1", 4) == Partition(1, 4)
    assert partition_of("account-42", 4) == Partition(3, 4)


@given(st.text(min_size=1, max_size=50), st.integers(1, 64), st.integers(1, 8))
def test_a_split_keeps_every_stream_under_its_parent(stream: str, count: int, factor: int) -> None:
    """Partition p of m*K holds only streams of partition p mod K of K."""
    child = Unit("p", partition_of(stream, count * factor)) if count * factor > 1 else Unit("p")
    parent = split_parent(child, count)
    expected = None if count == 1 else partition_of(stream, count)
    assert parent.partition == expected


def test_unit_names_round_trip() -> None:
    """A unit's name parses back to it; plain names are unpartitioned."""
    for unit in units_of("orders", 16) + units_of("plain", 1):
        assert Unit.parse(unit.name) == unit
    assert units_of("orders", 3)[2].name == "orders[2/3]"
    assert Unit.parse("weird[5/3]") == Unit("weird[5/3]")
    assert Unit.parse("nested[1/2][0/2]") == Unit("nested[1/2]", Partition(0, 2))


def test_plan_repartition() -> None:
    """Keep, create, split to multiples; anything else only when nothing was applied."""
    assert plan_repartition("p", None, 4, applied=False) == "create"
    assert plan_repartition("p", 4, 4, applied=True) == "keep"
    assert plan_repartition("p", 2, 8, applied=True) == "split"
    assert plan_repartition("p", 4, 3, applied=False) == "replace"
    with pytest.raises(PartitionsChanged) as info:
        plan_repartition("p", 4, 2, applied=True)
    assert "reset" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_partition_values_are_checked() -> None:
    """Indexes and counts out of range or of the wrong type are refused."""
    for index, count in [(0, 0), (2, 2), (-1, 2), (0, 1025), (True, 2), (0, 2.0)]:
        with pytest.raises(InvalidArgument):
            Partition(index, count)  # type: ignore[arg-type]
    assert str(Partition(1, 4)) == "1/4"


class TestInPostgres:
    """The SQL function and the stored column compute the same hash as Python."""

    @pytest.fixture
    def harness(self, postgres_dsn: str) -> PostgresHarness:
        return PostgresHarness(postgres_dsn)

    @pytest.fixture
    async def store(self, harness: PostgresHarness) -> AsyncIterator[PostgresStore]:
        async with harness.open_store() as store:
            assert isinstance(store, PostgresStore)
            yield store

    async def test_sql_matches_the_golden_values(self, store: PostgresStore) -> None:
        """stream_hash() in SQL and events.stream_hash agree with the pinned values."""
        for stream in GOLDEN:
            await store.append(stream, [NewEvent("E", {})])
        rows = await store.admin.fetch(
            f'SELECT stream_id, stream_hash, "{store.schema}".stream_hash(stream_id) AS fn '
            f'FROM "{store.schema}".events'
        )
        assert {r["stream_id"]: r["stream_hash"] for r in rows} == GOLDEN
        assert all(r["fn"] == r["stream_hash"] for r in rows)

    @settings(
        max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(streams=st.lists(st.text(min_size=1, max_size=80), min_size=1, max_size=20))
    async def test_sql_matches_python_for_any_text(
        self, harness: PostgresHarness, streams: list[str]
    ) -> None:
        """Any text PostgreSQL can store hashes the same in SQL as in Python."""
        streams = [s for s in streams if "\x00" not in s]
        if not streams:
            return
        # Each example runs in its own Trio run, so it opens its own store, on the schema
        # the test's examples share (the first migrates it; they only call its function).
        async with harness.open_store() as store:
            assert isinstance(store, PostgresStore)
            hashes = await store.admin.fetch(
                f'SELECT s, "{store.schema}".stream_hash(s) AS h FROM unnest($1::text[]) AS s',
                streams,
            )
        assert [r["h"] for r in hashes] == [stream_hash(s) for s in streams]
