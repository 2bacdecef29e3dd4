"""The demo's bank: the one domain model shared by the demo, the benchmarks and the tests.

``eventcore-trio demo`` runs it (`demo_main`: `run_demo` in memory, the failover demo on
PostgreSQL); the benchmarks time its `Transfer` command, and the tests use it as a realistic
domain (`random_transfer` is the writers' step everywhere).
"""

from .._util import fixup_module_metadata
from ._bank import INITIAL_BALANCE as INITIAL_BALANCE
from ._bank import Account as Account
from ._bank import AccountOpened as AccountOpened
from ._bank import InsufficientFunds as InsufficientFunds
from ._bank import MoneyDeposited as MoneyDeposited
from ._bank import MoneyWithdrawn as MoneyWithdrawn
from ._bank import OpenAccount as OpenAccount
from ._bank import Transfer as Transfer
from ._bank import balance_after as balance_after
from ._bank import random_transfer as random_transfer
from ._bank import registry as registry
from ._main import demo_main as demo_main
from ._memory import DemoReport as DemoReport
from ._memory import run_demo as run_demo

__all__ = [
    "INITIAL_BALANCE",
    "Account",
    "AccountOpened",
    "DemoReport",
    "InsufficientFunds",
    "MoneyDeposited",
    "MoneyWithdrawn",
    "OpenAccount",
    "Transfer",
    "balance_after",
    "demo_main",
    "random_transfer",
    "registry",
    "run_demo",
]

fixup_module_metadata(__name__, globals())
