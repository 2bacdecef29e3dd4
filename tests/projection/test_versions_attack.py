"""Projection versions on the in-memory backend, attacked (issue 27's review): retire and
switch back, and bad input to the admin calls."""

from __future__ import annotations

import pytest

from eventcore_trio import (
    EventFilter,
    InvalidArgument,
    NewEvent,
    ProjectionNotFound,
    RecordedEvent,
    open_memory_store,
)
from eventcore_trio._versions import VersionRole
from eventcore_trio.projection import ProjectionContext, projector, run_projection


async def _apply(event: RecordedEvent, ctx: ProjectionContext) -> None:
    pass


async def test_retiring_a_withdrawn_version_makes_it_build_again() -> None:
    """Version 2 served, the operator switched back to 1 and retired 2 ("once retired, a
    version cannot be switched back to"). Retire takes 2 off the withdrawn list, so a host
    that still has version 2 rebuilds it, and it takes over on its own again."""
    async with open_memory_store() as store:
        await store.append("s", [NewEvent("A", {})])
        await run_projection(store, projector("p", version=1)(_apply))
        await run_projection(store, projector("p", version=2)(_apply))
        assert await store.serving_version("p") == 2
        await store.serve_version("p", 1)
        assert await store.version_role("p", 2) is VersionRole.WITHDRAWN
        await store.retire_version("p", 2)
        assert not (await store.version_role("p", 2)).runs
        result = await run_projection(store, projector("p", version=2)(_apply))
        assert result.superseded
        assert await store.serving_version("p") == 1


async def test_serve_and_serve_back_keep_checkpoints() -> None:
    """Back and forth by hand: each version keeps its checkpoint, nothing is applied twice
    when a host runs it again."""
    seen: dict[int, list[str]] = {1: [], 2: []}

    def counting(version: int) -> object:
        @projector("p", version=version)
        async def apply(event: RecordedEvent, ctx: ProjectionContext) -> None:
            seen[version].append(event.stream_id)

        return apply

    async with open_memory_store() as store:
        await store.append("a", [NewEvent("A", {})])
        await run_projection(store, counting(1))
        await run_projection(store, counting(2))
        await store.serve_version("p", 1)
        await store.append("b", [NewEvent("A", {})])
        await run_projection(store, counting(1))
        await store.serve_version("p", 2)
        await store.append("c", [NewEvent("A", {})])
        await run_projection(store, counting(2))
        assert await run_projection(store, counting(1)) is not None
        assert seen == {1: ["a", "b"], 2: ["a", "b", "c"]}
        assert [s.to_version for s in await store.version_switches("p")] == [1, 2, 1, 2]


@pytest.mark.parametrize("version", [0, -1, 1_000_001])
async def test_bad_versions_to_admin_calls(version: int) -> None:
    async with open_memory_store() as store:
        for call in (
            store.serve_version("p", version),
            store.retire_version("p", version),
            store.version_role("p", version),
            store.switch_if_caught_up("p", version, [("p", EventFilter())]),
        ):
            with pytest.raises(InvalidArgument, match="version"):
                await call


async def test_unknown_versions_are_not_found() -> None:
    async with open_memory_store() as store:
        await run_projection(store, projector("p")(_apply))
        with pytest.raises(ProjectionNotFound):
            await store.serve_version("p", 9)
        with pytest.raises(ProjectionNotFound):
            await store.retire_version("p", 9)
        with pytest.raises(InvalidArgument, match="version"):
            await store.serve_version("p@v2", 2)
