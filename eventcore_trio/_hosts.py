"""What hosts tell each other about the units they run: the values of host membership.

Each host running `run_projections` with balancing joins the store's host registry
(`ProjectorCoordinator.register_host`, saying which units it runs), publishes which units it
leads and which it stands by for, and reads the others'. `projection/_balance.py` turns a
view into a plan.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs


@attrs.frozen
class HostState:
    """What one live host published: the units it runs, leads and stands by for.

    Attributes:
        leading: the units it leads.
        standing_by: the units it stands by for.
        runs: the units it can run (its projectors' units), or None for a host that has
            not said (one of a version that did not publish it): such a host counts as
            able to run only what it leads or stands by for.

    .. versionadded:: 0.2
    .. versionchanged:: 0.3
       ``runs``.
    """

    leading: frozenset[str] = frozenset()
    standing_by: frozenset[str] = frozenset()
    runs: frozenset[str] | None = None

    @property
    def can_run(self) -> frozenset[str]:
        """The units this host can run: ``runs``, or what it leads or stands by for when it
        has not said; a unit it leads always counts.

        .. versionadded:: 0.3
        """
        if self.runs is None:
            return self.leading | self.standing_by
        return self.runs | self.leading


@attrs.frozen
class ClusterView:
    """The live hosts and which of the units' locks are held, read at one moment.

    .. versionadded:: 0.2
    """

    hosts: Mapping[str, HostState]
    held: frozenset[str]
