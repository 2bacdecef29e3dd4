"""Fault injection you can run: `run_torture`, and the `NetworkProxy` it cuts networks with.

``eventcore-trio torture`` is the command-line form. See docs/reliability.md for what it
injects, what it checks, and the figures of a full run.
"""

from .._util import fixup_module_metadata
from ._proxy import NetworkProxy as NetworkProxy
from ._report import FaultKind as FaultKind
from ._report import FaultRecord as FaultRecord
from ._report import TortureReport as TortureReport
from ._run import DEFAULT_DURATION as DEFAULT_DURATION
from ._run import QUICK_DURATION as QUICK_DURATION
from ._run import run_torture as run_torture

__all__ = [
    "DEFAULT_DURATION",
    "QUICK_DURATION",
    "FaultKind",
    "FaultRecord",
    "NetworkProxy",
    "TortureReport",
    "run_torture",
]

fixup_module_metadata(__name__, globals())
