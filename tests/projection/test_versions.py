"""Projection versions as projectors declare them: bad versions and setup hooks are refused
before anything runs (docs/bad-input.md); a version below the serving one runs as superseded."""

from __future__ import annotations

from typing import Any

import pytest

from eventcore_trio import (
    EventFilter,
    InvalidArgument,
    NewEvent,
    ProjectionState,
    RecordedEvent,
    open_memory_store,
)
from eventcore_trio.projection import ProjectionContext, projector, run_projection


async def _apply(event: RecordedEvent, ctx: ProjectionContext) -> None:
    pass


@pytest.mark.parametrize("version", [0, -1, 1_000_001, 1.5, True, "2", None])
def test_a_bad_version_is_refused(version: Any) -> None:
    with pytest.raises(InvalidArgument, match="version"):
        projector("p", version=version)


class _Versioned:
    name = "p"
    filter = EventFilter()

    def __init__(self, version: object) -> None:
        self.version = version

    async def apply(self, event: RecordedEvent, ctx: ProjectionContext) -> None:
        pass


@pytest.mark.parametrize("version", [0, -3, 2.0])
async def test_a_class_projector_with_a_bad_version_is_refused(version: object) -> None:
    async with open_memory_store() as store:
        with pytest.raises(InvalidArgument, match="version"):
            await run_projection(store, _Versioned(version))


def test_a_name_that_ends_like_a_version_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="version=N"):
        projector("orders@v2")


def test_a_setup_hook_must_be_async() -> None:
    def setup(db: object) -> None:
        pass

    with pytest.raises(InvalidArgument, match="setup"):
        projector("p", setup=setup)  # type: ignore[arg-type]


async def test_a_version_below_the_serving_one_applies_nothing() -> None:
    """Not an error: a version lower than the serving one is superseded. Its run applies
    nothing and returns ``superseded``; its status says so."""
    async with open_memory_store() as store:
        await store.append("s", [NewEvent("A", {})])
        assert await run_projection(store, projector("p", version=3)(_apply)) is not None
        result = await run_projection(store, projector("p", version=2)(_apply))
        assert result.superseded
        assert result.events_applied == 0
        states = {s.version: s.state for s in await store.projection_status()}
        assert states[2] is ProjectionState.SUPERSEDED
        assert states[3] is ProjectionState.STOPPED
