"""The PostgreSQL backend: `open_postgres_store` and its types.

Advisory-lock keys are derived as documented in ``eventcore_trio.postgres._keys``: the first
8 bytes of BLAKE2b over ``eventcore-trio``, the lock kind, the schema and the name, as a signed
64-bit integer; see `projector_lock_key`.
"""

from .._util import fixup_module_metadata
from ._dsn import normalize_dsn as normalize_dsn
from ._fence import POOLER_HINT as POOLER_HINT
from ._grants import runtime_grants as runtime_grants
from ._keys import projector_lock_key as projector_lock_key
from ._keys import writer_lock_key as writer_lock_key
from ._leadership import PostgresLeadership as PostgresLeadership
from ._open import behind_proxy as behind_proxy
from ._open import open_postgres_store as open_postgres_store
from ._open import tool_connection as tool_connection
from ._reads import partition_index_advice as partition_index_advice
from ._schema import LATEST_SCHEMA_VERSION as LATEST_SCHEMA_VERSION
from ._schema import MINIMUM_SERVER_VERSION_NUM as MINIMUM_SERVER_VERSION_NUM
from ._schema import check_schema_name as check_schema_name
from ._store import DSN_ENVIRONMENT_VARIABLE as DSN_ENVIRONMENT_VARIABLE
from ._store import PostgresStore as PostgresStore
from ._transaction import PostgresTransaction as PostgresTransaction

__all__ = [
    "DSN_ENVIRONMENT_VARIABLE",
    "LATEST_SCHEMA_VERSION",
    "MINIMUM_SERVER_VERSION_NUM",
    "POOLER_HINT",
    "PostgresLeadership",
    "PostgresStore",
    "PostgresTransaction",
    "behind_proxy",
    "check_schema_name",
    "normalize_dsn",
    "open_postgres_store",
    "partition_index_advice",
    "projector_lock_key",
    "runtime_grants",
    "tool_connection",
    "writer_lock_key",
]

fixup_module_metadata(__name__, globals())
