"""The command side: typed events, `execute` with retries, and causal metadata."""

from .._typed import EventRegistry as EventRegistry
from .._util import fixup_module_metadata
from ._command import Command as Command
from ._command import ExecutionResult as ExecutionResult
from ._command import RetryPolicy as RetryPolicy
from ._command import execute as execute
from ._metadata import caused_by as caused_by

__all__ = [
    "Command",
    "EventRegistry",
    "ExecutionResult",
    "RetryPolicy",
    "caused_by",
    "execute",
]

fixup_module_metadata(__name__, globals())
