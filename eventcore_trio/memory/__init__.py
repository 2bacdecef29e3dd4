"""The in-memory backend: `open_memory_store` and its types."""

from .._util import fixup_module_metadata
from ._store import MemoryBatch as MemoryBatch
from ._store import MemoryLeadership as MemoryLeadership
from ._store import MemoryStore as MemoryStore
from ._store import open_memory_store as open_memory_store

__all__ = ["MemoryBatch", "MemoryLeadership", "MemoryStore", "open_memory_store"]

fixup_module_metadata(__name__, globals())
