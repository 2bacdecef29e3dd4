"""Who leads a projection, and waiting for a (new) leader: for failover demos, benchmarks, tests.

Leadership changes hands inside PostgreSQL, so the only way for another process to see it is to
ask `projection_status`; these helpers poll it at a given pace, bounded by the caller's cancel
scope.
"""

from __future__ import annotations

import trio

from .._protocols import ProjectionAdmin


async def leader_pid(store: ProjectionAdmin, name: str) -> int | None:
    """The process id of the host leading unit *name* now, or None while nobody leads it.

    *name* is a projection's name, or one partition's unit name (``"orders[2/4]"``).

    .. versionadded:: 0.2
    """
    for status in await store.projection_status():
        if status.unit == name and status.leader is not None:
            return status.leader.pid
    return None


async def wait_for_leader(
    store: ProjectionAdmin, name: str, *, other_than: int | None = None, poll: float = 0.005
) -> int:
    """Wait until *name* has a leader (one whose pid is not *other_than*); return its pid.

    Polls `projection_status` every *poll* seconds; bound the wait with a cancel scope
    (``trio.fail_after``).

    .. versionadded:: 0.2
    """
    while True:
        pid = await leader_pid(store, name)
        if pid is not None and pid != other_than:
            return pid
        await trio.sleep(poll)
