"""Test support: the backend contract suite, its harnesses, and a throwaway PostgreSQL.

Needs the ``testing`` extra (pytest, pytest-trio, hypothesis). To check a backend, subclass
`StoreContract` and provide a ``harness`` fixture returning a `BackendHarness`.
"""

from .._tools._embedded import FAST_SETTINGS as FAST_SETTINGS
from .._tools._embedded import EmbeddedPostgres as EmbeddedPostgres
from .._tools._leaders import leader_pid as leader_pid
from .._tools._leaders import wait_for_leader as wait_for_leader
from .._tools._processes import run_ready_process as run_ready_process
from .._util import fixup_module_metadata
from ..projection import wait_caught_up as wait_caught_up
from ._contract import PersonalDataContract as PersonalDataContract
from ._contract import StoreContract as StoreContract
from ._contract import TaggedContract as TaggedContract
from ._contract import events as events
from ._contract import follow_until as follow_until
from ._contract import read_all as read_all
from ._harness import BackendHarness as BackendHarness
from ._harness import MemoryHarness as MemoryHarness
from ._harness import PostgresHarness as PostgresHarness
from ._harness import RuntimeRoles as RuntimeRoles
from ._harness import dsn_with_credentials as dsn_with_credentials

__all__ = [
    "FAST_SETTINGS",
    "BackendHarness",
    "EmbeddedPostgres",
    "MemoryHarness",
    "PersonalDataContract",
    "PostgresHarness",
    "RuntimeRoles",
    "StoreContract",
    "TaggedContract",
    "dsn_with_credentials",
    "events",
    "follow_until",
    "leader_pid",
    "read_all",
    "run_ready_process",
    "wait_caught_up",
    "wait_for_leader",
]

fixup_module_metadata(__name__, globals())
