"""eventcore-trio: Trio-native event sourcing with a gap-free, poll-based projector system.

The names here are the whole public surface of the core: event values, positions, filters,
the error tree, the backend protocols and the in-memory store. The PostgreSQL backend lives in
`eventcore_trio.postgres` (``open_postgres_store`` is re-exported here), the backend contract
suite in `eventcore_trio.testing`.

The PostgreSQL backend (and with it asyncpg, asyncio and trio-asyncio) is imported on first use
of ``open_postgres_store``, so a program using only the in-memory store never loads it.
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0.dev0"

from ._backend._subscription import EventSubscription as EventSubscription
from ._errors import AppendConditionFailed as AppendConditionFailed
from ._errors import AppendTooLarge as AppendTooLarge
from ._errors import AuthenticationFailed as AuthenticationFailed
from ._errors import BatchInterrupted as BatchInterrupted
from ._errors import CheckpointAhead as CheckpointAhead
from ._errors import CheckpointConflict as CheckpointConflict
from ._errors import ClusterMismatch as ClusterMismatch
from ._errors import ConfigurationError as ConfigurationError
from ._errors import DatabaseError as DatabaseError
from ._errors import DatabaseNotAvailable as DatabaseNotAvailable
from ._errors import DatabaseNotFound as DatabaseNotFound
from ._errors import DeadLetterNotFound as DeadLetterNotFound
from ._errors import DuplicateEventId as DuplicateEventId
from ._errors import EventCoreError as EventCoreError
from ._errors import EventDecodeError as EventDecodeError
from ._errors import EventEncodeError as EventEncodeError
from ._errors import InvalidArgument as InvalidArgument
from ._errors import LeadershipLost as LeadershipLost
from ._errors import LeadershipUnavailable as LeadershipUnavailable
from ._errors import PartitionsChanged as PartitionsChanged
from ._errors import PartitionsMismatch as PartitionsMismatch
from ._errors import ProjectionFailed as ProjectionFailed
from ._errors import ProjectionLagging as ProjectionLagging
from ._errors import ProjectionNotFound as ProjectionNotFound
from ._errors import ProjectionRunning as ProjectionRunning
from ._errors import RetriesExhausted as RetriesExhausted
from ._errors import SchemaVersionError as SchemaVersionError
from ._errors import StoreClosed as StoreClosed
from ._errors import StoreConnectionError as StoreConnectionError
from ._errors import SubjectForgottenError as SubjectForgottenError
from ._errors import SubjectNotFound as SubjectNotFound
from ._errors import UnsupportedPooling as UnsupportedPooling
from ._errors import UnsupportedServer as UnsupportedServer
from ._errors import VersionConflict as VersionConflict
from ._events import AppendResult as AppendResult
from ._events import NewEvent as NewEvent
from ._events import RecordedEvent as RecordedEvent
from ._events import StreamAppend as StreamAppend
from ._events import UndecodableEvent as UndecodableEvent
from ._filters import EventFilter as EventFilter
from ._filters import glob_to_regex as glob_to_regex
from ._partitions import MAX_PARTITIONS as MAX_PARTITIONS
from ._partitions import Partition as Partition
from ._partitions import partition_of as partition_of
from ._partitions import stream_hash as stream_hash
from ._personal._fields import MAX_PERSONAL_FIELDS as MAX_PERSONAL_FIELDS
from ._personal._fields import SUBJECT_FORGOTTEN as SUBJECT_FORGOTTEN
from ._personal._forget import ForgetRecord as ForgetRecord
from ._personal._keys import KeyWrapper as KeyWrapper
from ._positions import Position as Position
from ._protocols import CheckpointStore as CheckpointStore
from ._protocols import Database as Database
from ._protocols import EventReader as EventReader
from ._protocols import EventStore as EventStore
from ._protocols import HostMembership as HostMembership
from ._protocols import Leadership as Leadership
from ._protocols import PersonalDataStore as PersonalDataStore
from ._protocols import ProjectionAdmin as ProjectionAdmin
from ._protocols import ProjectionBatch as ProjectionBatch
from ._protocols import ProjectorCoordinator as ProjectorCoordinator
from ._protocols import SnapshotStore as SnapshotStore
from ._protocols import Store as Store
from ._protocols import TaggedEventStore as TaggedEventStore
from ._queries import AppendCondition as AppendCondition
from ._queries import EventQuery as EventQuery
from ._queries import QueryItem as QueryItem
from ._queries import QueryResult as QueryResult
from ._status import ClusterView as ClusterView
from ._status import DeadLetter as DeadLetter
from ._status import ForeignLock as ForeignLock
from ._status import HostState as HostState
from ._status import LeaderInfo as LeaderInfo
from ._status import LiveHost as LiveHost
from ._status import OpenTransaction as OpenTransaction
from ._status import ProjectionState as ProjectionState
from ._status import ProjectionStatus as ProjectionStatus
from ._util import fixup_module_metadata
from ._validation import MAX_EVENT_JSON_BYTES as MAX_EVENT_JSON_BYTES
from ._validation import MAX_TAGS as MAX_TAGS
from ._versions import MAX_VERSION as MAX_VERSION
from ._versions import VersionRole as VersionRole
from ._versions import VersionSwitch as VersionSwitch
from .commands import CacheStats as CacheStats
from .commands import Command as Command
from .commands import EventRegistry as EventRegistry
from .commands import EventShape as EventShape
from .commands import ExecutionResult as ExecutionResult
from .commands import QueryCommand as QueryCommand
from .commands import RetryPolicy as RetryPolicy
from .commands import Snapshot as Snapshot
from .commands import StateCache as StateCache
from .commands import StateCommand as StateCommand
from .commands import caused_by as caused_by
from .commands import execute as execute
from .commands import take_snapshot as take_snapshot
from .memory import open_memory_store as open_memory_store
from .projection import Failure as Failure
from .projection import FailureStrategy as FailureStrategy
from .projection import ProjectionConfig as ProjectionConfig
from .projection import ProjectionContext as ProjectionContext
from .projection import ProjectionResult as ProjectionResult
from .projection import Projector as Projector
from .projection import projector as projector
from .projection import replay_dead_letters as replay_dead_letters
from .projection import run_projection as run_projection
from .projection import run_projections as run_projections
from .projection import wait_for_projections as wait_for_projections

__all__ = [
    "ForgetRecord",
    "KeyWrapper",
    "MAX_PERSONAL_FIELDS",
    "PersonalDataStore",
    "SUBJECT_FORGOTTEN",
    "SubjectForgottenError",
    "SubjectNotFound",
    "AppendCondition",
    "AppendConditionFailed",
    "EventQuery",
    "QueryItem",
    "QueryResult",
    "TaggedEventStore",
    "MAX_TAGS",
    "MAX_VERSION",
    "VersionRole",
    "VersionSwitch",
    "CacheStats",
    "EventShape",
    "ProjectionLagging",
    "Snapshot",
    "SnapshotStore",
    "StateCache",
    "QueryCommand",
    "StateCommand",
    "take_snapshot",
    "wait_for_projections",
    "MAX_EVENT_JSON_BYTES",
    "MAX_PARTITIONS",
    "ClusterView",
    "HostMembership",
    "HostState",
    "LiveHost",
    "Partition",
    "PartitionsChanged",
    "PartitionsMismatch",
    "partition_of",
    "stream_hash",
    "execute",
    "caused_by",
    "RetryPolicy",
    "ExecutionResult",
    "EventRegistry",
    "Command",
    "RetriesExhausted",
    "run_projections",
    "run_projection",
    "replay_dead_letters",
    "projector",
    "Projector",
    "ProjectionResult",
    "ProjectionContext",
    "ProjectionConfig",
    "FailureStrategy",
    "Failure",
    "ProjectionBatch",
    "ProjectionAdmin",
    "Database",
    "UndecodableEvent",
    "ProjectionStatus",
    "ProjectionState",
    "OpenTransaction",
    "ForeignLock",
    "LeaderInfo",
    "DeadLetter",
    "DeadLetterNotFound",
    "ProjectionRunning",
    "ProjectionNotFound",
    "ProjectionFailed",
    "DatabaseNotAvailable",
    "AppendResult",
    "AppendTooLarge",
    "AuthenticationFailed",
    "CheckpointAhead",
    "CheckpointConflict",
    "CheckpointStore",
    "ClusterMismatch",
    "ConfigurationError",
    "DatabaseError",
    "DatabaseNotFound",
    "DuplicateEventId",
    "EventCoreError",
    "EventDecodeError",
    "EventEncodeError",
    "EventFilter",
    "EventReader",
    "EventSubscription",
    "EventStore",
    "InvalidArgument",
    "Leadership",
    "LeadershipLost",
    "LeadershipUnavailable",
    "NewEvent",
    "Position",
    "ProjectorCoordinator",
    "RecordedEvent",
    "SchemaVersionError",
    "Store",
    "StoreClosed",
    "UnsupportedPooling",
    "BatchInterrupted",
    "StoreConnectionError",
    "StreamAppend",
    "UnsupportedServer",
    "VersionConflict",
    "glob_to_regex",
    "open_memory_store",
    "open_postgres_store",
]

if TYPE_CHECKING:
    from . import postgres as postgres
    from .postgres import open_postgres_store as open_postgres_store
else:
    # Hidden from type checkers, which would otherwise accept any name from this package
    # (a misspelt import typed as `object`); they read the imports above instead.

    def __getattr__(name: str) -> object:
        """The PostgreSQL backend, imported on first use: `open_postgres_store`, and the
        `eventcore_trio.postgres` subpackage as an attribute of the package."""
        import importlib

        if name == "postgres":
            value = importlib.import_module(f"{__name__}.postgres")
        elif name in _LAZY:
            value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *_LAZY, "postgres"})


# Names imported on first use, and the subpackage each comes from.
_LAZY = {"open_postgres_store": "postgres"}


fixup_module_metadata(__name__, globals())
del fixup_module_metadata
