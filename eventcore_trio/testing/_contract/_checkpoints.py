"""The contract of checkpoints, dead letters and recorded partition counts: checkpoints
only move forward, batches compare and set, and dead letters resolve within a batch."""

from __future__ import annotations

import uuid

import pytest

from ..._errors import (
    CheckpointAhead,
    CheckpointConflict,
    DeadLetterNotFound,
    InvalidArgument,
)
from ..._events import RecordedEvent
from ..._positions import Position, position_parts
from ..._protocols import Leadership, Store
from ._support import events, read_all


class CheckpointContract:
    """Checkpoints, dead letters and partition counts."""

    # -- checkpoints -------------------------------------------------------------------

    async def test_missing_checkpoint_loads_none(self, store: Store) -> None:
        """A name that never saved a checkpoint loads None."""
        assert await store.load_checkpoint("nobody") is None

    async def test_checkpoint_save_and_load(self, store: Store) -> None:
        """A saved checkpoint loads back equal."""
        result = await store.append("s", events("A"))
        assert result.position is not None
        await store.save_checkpoint("p", result.position)
        assert await store.load_checkpoint("p") == result.position

    async def test_checkpoint_moves_forward(self, store: Store) -> None:
        """Saving a later position overwrites the checkpoint; saving the same one is accepted."""
        first = (await store.append("s", events("A"))).position
        second = (await store.append("s", events("B"))).position
        assert first is not None
        assert second is not None
        await store.save_checkpoint("p", first)
        await store.save_checkpoint("p", second)
        await store.save_checkpoint("p", second)
        assert await store.load_checkpoint("p") == second

    async def test_checkpoint_never_moves_backwards(self, store: Store) -> None:
        """Saving an earlier position raises CheckpointConflict and changes nothing."""
        first = (await store.append("s", events("A"))).position
        second = (await store.append("s", events("B"))).position
        assert first is not None
        assert second is not None
        await store.save_checkpoint("p", second)
        with pytest.raises(CheckpointConflict) as info:
            await store.save_checkpoint("p", first)
        assert (info.value.attempted, info.value.current) == (first, second)
        assert await store.load_checkpoint("p") == second

    async def test_checkpoints_are_independent(self, store: Store) -> None:
        """Each name has its own checkpoint."""
        first = (await store.append("s", events("A"))).position
        second = (await store.append("s", events("B"))).position
        assert first is not None
        assert second is not None
        await store.save_checkpoint("p", second)
        await store.save_checkpoint("q", first)
        assert await store.load_checkpoint("p") == second
        assert await store.load_checkpoint("q") == first

    async def test_batch_checkpoint_is_compare_and_set(self, store: Store) -> None:
        """A batch moves the checkpoint only from the position it expects; a stale writer fails."""
        first = (await store.append("s", events("A"))).position
        second = (await store.append("s", events("B"))).position
        assert first is not None
        assert second is not None
        async with store.try_acquire("p") as leadership:
            async with leadership.open_batch() as batch:
                await batch.save_checkpoint(None, first)
            with pytest.raises(CheckpointConflict) as info:
                async with leadership.open_batch() as batch:
                    await batch.save_checkpoint(None, second)  # stale: expects no checkpoint
            assert info.value.current == first
            assert await store.load_checkpoint("p") == first
            async with leadership.open_batch() as batch:
                await batch.save_checkpoint(first, second)
        assert await store.load_checkpoint("p") == second

    async def test_a_checkpoint_ahead_of_the_store_is_refused(self, store: Store) -> None:
        """A position beyond every position the store can have produced (a projection
        reading after it would skip every event) raises CheckpointAhead and saves nothing,
        from save_checkpoint and from a batch (with or without a transaction under way);
        positions the store produced are saved as before."""
        await store.append("s", events("A", "B"))
        recorded = await read_all(store)
        first, last = (e.position for e in recorded)
        tx, seq = position_parts(last)
        beyond = [Position(2**62, 5), Position(tx, seq + 10**9), Position(2**63 - 1, 2**63 - 1)]
        for position in beyond:
            with pytest.raises(CheckpointAhead) as info:
                await store.save_checkpoint("cpx", position)
            assert (info.value.name, info.value.position, info.value.stored) == (
                "cpx",
                position,
                False,
            )
            assert "not saved" in str(info.value)
            async with store.try_acquire("cpx") as leadership:
                with pytest.raises(CheckpointAhead):
                    async with leadership.open_batch() as batch:
                        await batch.save_checkpoint(None, position)
                # A write first: on PostgreSQL, the batch's transaction is then under way.
                with pytest.raises(CheckpointAhead):
                    await self._dead_letter_then_checkpoint(leadership, recorded[0], position)
            assert await store.load_checkpoint("cpx") is None
            assert await store.dead_letters("cpx") == []
        await store.save_checkpoint("cpx", first)
        async with store.try_acquire("cpx") as leadership, leadership.open_batch() as batch:
            await batch.save_checkpoint(first, last)
        assert await store.load_checkpoint("cpx") == last
        with pytest.raises(CheckpointAhead):
            await store.save_checkpoint("cpx", Position(2**62, 5))
        assert await store.load_checkpoint("cpx") == last

    @staticmethod
    async def _dead_letter_then_checkpoint(
        leadership: Leadership, event: RecordedEvent, position: Position
    ) -> None:
        async with leadership.open_batch() as batch:
            await batch.record_dead_letter(event, ValueError("x"), retries=0)
            await batch.save_checkpoint(None, position)

    # -- dead letters and partition counts ----------------------------------------------

    async def test_resolving_a_dead_letter_deletes_it_or_fails_the_batch(
        self, store: Store
    ) -> None:
        """A batch deletes its unit's own dead letter; resolving one that is not there fails
        the whole batch, so nothing of it commits."""
        await store.append("s", events("A", "B", "C"))
        first, second, third = await store.read_stream("s")

        async def skip(name: str, event: RecordedEvent) -> None:
            async with store.try_acquire(name) as leadership, leadership.open_batch() as batch:
                await batch.record_dead_letter(event, ValueError("bad"), retries=0)
                await batch.save_checkpoint(None, event.position)

        async def resolve(leadership: Leadership, *dead_letter_ids: uuid.UUID) -> None:
            # Resolves, then moves the checkpoint: both commit, or neither.
            async with leadership.open_batch() as batch:
                for dead_letter_id in dead_letter_ids:
                    await batch.resolve_dead_letter(dead_letter_id)
                await batch.save_checkpoint(first.position, third.position)

        await skip("p", first)
        await skip("q", second)
        (letter,) = await store.dead_letters("p")
        (others,) = await store.dead_letters("q")
        async with store.try_acquire("p") as leadership:
            # Another unit's letter, an id nobody has, and the same letter twice (the second
            # delete finds nothing, so the first is rolled back with it).
            for missing in ([others.id], [uuid.uuid4()], [letter.id, letter.id]):
                with pytest.raises(DeadLetterNotFound) as info:
                    await resolve(leadership, *missing)
                assert (info.value.dead_letter_id, info.value.unit) == (missing[-1], "p")
                assert await store.load_checkpoint("p") == first.position
                assert [d.id for d in await store.dead_letters("p")] == [letter.id]
            await resolve(leadership, letter.id)
            assert await store.dead_letters("p") == []
            assert await store.load_checkpoint("p") == third.position
            with pytest.raises(DeadLetterNotFound):
                await resolve(leadership, letter.id)
        assert [d.id for d in await store.dead_letters("q")] == [others.id]

    async def test_recorded_partitions_are_the_stores_not_the_callers(self, store: Store) -> None:
        """recorded_partitions is None until a projection runs, then the count it runs as."""
        assert await store.recorded_partitions("p") is None
        await store.set_partitions("p", 2)
        assert await store.recorded_partitions("p") == 2
        await store.set_partitions("p", 4)  # a split
        assert await store.recorded_partitions("p") == 4
        # A projection that checkpointed before counts were recorded has one unit.
        position = (await store.append("s", events("A"))).position
        assert position is not None
        await store.save_checkpoint("old", position)
        assert await store.recorded_partitions("old") == 1
        with pytest.raises(InvalidArgument):
            await store.recorded_partitions("p[1/4]")
