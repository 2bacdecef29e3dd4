"""The command side: typed events, `execute` with retries, and causal metadata."""

from .._events import caused_by as caused_by
from .._snapshots import Snapshot as Snapshot
from .._typed import EVENT_VERSION as EVENT_VERSION
from .._typed import EventRegistry as EventRegistry
from .._typed import EventShape as EventShape
from .._util import fixup_module_metadata
from ._cache import CacheStats as CacheStats
from ._cache import StateCache as StateCache
from ._command import Command as Command
from ._command import ExecutionResult as ExecutionResult
from ._command import RetryPolicy as RetryPolicy
from ._command import execute as execute
from ._query_command import QueryCommand as QueryCommand
from ._states import StateCommand as StateCommand
from ._states import take_snapshot as take_snapshot

__all__ = [
    "EVENT_VERSION",
    "CacheStats",
    "EventShape",
    "Snapshot",
    "StateCache",
    "QueryCommand",
    "StateCommand",
    "take_snapshot",
    "Command",
    "EventRegistry",
    "ExecutionResult",
    "RetryPolicy",
    "caused_by",
    "execute",
]

fixup_module_metadata(__name__, globals())
