"""Waiting helpers for tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio


async def eventually(predicate: Callable[[], Awaitable[bool]], *, within: float = 10) -> None:
    """Wait until *predicate* holds, checking every 20 ms, or fail after *within* seconds.

    Only for state outside this process (rows and locks in PostgreSQL, another process's
    progress), for which no event can be awaited; in-process state uses trio.Event.
    """
    with trio.fail_after(within):
        while not await predicate():  # noqa: ASYNC110
            await trio.sleep(0.02)


#: What ``eventcore-trio torture --json`` promises at least (issue 5's list).
TORTURE_REPORT_FIELDS = (
    "events",
    "faults",
    "lost",
    "duplicated",
    "checkpoint_regressions",
    "double_leaders",
    "failover_ms_p50",
    "failover_ms_p99",
    "recovered_after_db_restart",
)
