"""``python -m eventcore_trio.cli``: the ``eventcore-trio`` command."""

import sys

from . import main

if __name__ == "__main__":  # pragma: no cover - imported, it must not run the command
    sys.exit(main())
