"""The projection runtime: projectors, `run_projection`, the host and their values."""

from .._util import fixup_module_metadata
from ._config import ProjectionConfig as ProjectionConfig
from ._context import ProjectionContext as ProjectionContext
from ._host import run_projections as run_projections
from ._pipeline import ProjectionResult as ProjectionResult
from ._program import run_host as run_host
from ._projector import Failure as Failure
from ._projector import FailureStrategy as FailureStrategy
from ._projector import FunctionProjector as FunctionProjector
from ._projector import Projector as Projector
from ._projector import check_projector as check_projector
from ._projector import projector as projector
from ._replay import ReplayResult as ReplayResult
from ._replay import replay_dead_letters as replay_dead_letters
from ._runner import run_projection as run_projection
from ._waiting import wait_caught_up as wait_caught_up
from ._waiting import wait_for_projections as wait_for_projections

__all__ = [
    "Failure",
    "FailureStrategy",
    "FunctionProjector",
    "ProjectionConfig",
    "ProjectionContext",
    "ProjectionResult",
    "Projector",
    "ReplayResult",
    "check_projector",
    "projector",
    "replay_dead_letters",
    "run_host",
    "run_projection",
    "run_projections",
    "wait_caught_up",
    "wait_for_projections",
]

fixup_module_metadata(__name__, globals())
