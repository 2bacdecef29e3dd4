"""Structured-concurrency helpers shared by the backends and the projection layer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import NoReturn, TypeVar, TypeVarTuple, Unpack

import trio

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


def run_program(async_fn: Callable[[Unpack[Ts]], Awaitable[T]], *args: *Ts) -> T:
    """``trio.run`` for our programs (CLI, demo, host processes): Ctrl-C at checkpoints only.

    By default Trio raises KeyboardInterrupt wherever the signal lands, which under load is
    often inside trio-asyncio's loop or asyncpg's protocol callbacks; observed here: the
    interrupt swallowed, ``TrioInternalError``, and once a segfault. Delivered at a checkpoint
    of the main task instead, it cancels everything in order (docs/operations.md, "Ctrl-C").
    """
    return trio.run(async_fn, *args, restrict_keyboard_interrupt_to_checkpoints=True)


@asynccontextmanager
async def background(fn: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    """Run *fn* in a task for the duration of the block, then cancel it.

    A nursery would wrap an exception raised by the block in an ExceptionGroup; since *fn*
    reports through state and never raises on purpose, a group holding a single exception is
    unwrapped so callers see the block's own exception, as with any other context manager.
    """
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fn)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise_single(group)


def raise_single(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Re-raise the only exception inside (nested) single-member groups, else the group.

    For context managers that run tasks only as plumbing: the exception that reaches the
    caller is the one their block raised, not a group of one.
    """
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if exc is group:
        raise group
    raise exc from exc.__cause__


@asynccontextmanager
async def service_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery for background services of a resource, cancelled when the block ends.

    Services report through state and do not raise on purpose, so the block's own exception
    reaches the caller unwrapped (see `background`).
    """
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise_single(group)


async def wait_any(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as any of *waits* returns; the others are cancelled."""
    async with trio.open_nursery() as nursery:

        async def run(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(run, wait)
