"""What hosts tell each other about the units they run: the values of host membership.

Each host running `run_projections` with balancing joins the store's host registry
(`ProjectorCoordinator.register_host`), publishes which units it leads and which it stands
by for, and reads the others'. `projection/_balance.py` turns a view into a plan.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs


@attrs.frozen
class HostState:
    """What one live host published: units it leads and units it stands by for.

    .. versionadded:: 0.2
    """

    leading: frozenset[str] = frozenset()
    standing_by: frozenset[str] = frozenset()


@attrs.frozen
class ClusterView:
    """The live hosts and which of the units' locks are held, read at one moment.

    .. versionadded:: 0.2
    """

    hosts: Mapping[str, HostState]
    held: frozenset[str]
