"""The in-memory backend: `open_memory_store` and its types."""

from .._util import fixup_module_metadata
from ._batch import MemoryBatch as MemoryBatch
from ._leadership import MemoryLeadership as MemoryLeadership
from ._open import open_memory_store as open_memory_store
from ._store import MemoryStore as MemoryStore

__all__ = ["MemoryBatch", "MemoryLeadership", "MemoryStore", "open_memory_store"]

fixup_module_metadata(__name__, globals())
