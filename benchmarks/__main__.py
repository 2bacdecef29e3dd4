"""``python -m benchmarks``: eventcore-trio next to hand-written asyncpg, same run, same server."""

from __future__ import annotations

import sys

from ._harness import main

sys.exit(main())
