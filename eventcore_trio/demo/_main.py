"""``eventcore-trio demo``: which demo runs, and on which store."""

from __future__ import annotations

import sys

from .._tools._processes import run_program
from ._memory import run_demo


def demo_main(dsn: str | None, *, memory: bool, scale: int, duration: float) -> int:
    """Run the demo on a DSN, an embedded PostgreSQL, or the memory store; return exit code.

    On PostgreSQL it is the failover demo (three host processes, a killed leader); on the
    memory store, the single-process version of the same bank.
    """
    # The failover demo needs the PostgreSQL backend: imported only when it runs.
    from ..memory import open_memory_store
    from ._failover import run_failover_demo

    def out(line: str) -> None:
        print(line, flush=True)

    live = sys.stdout.isatty()
    if memory:
        out("store: in-memory (single process; use PostgreSQL for the failover demo)")
        report = run_program(
            lambda: run_demo(open_memory_store, transfers_per_writer=scale, out=out)
        )
        return 0 if report.ok else 1
    if dsn is not None:
        out("store: PostgreSQL at the given DSN (a temporary schema, dropped afterwards)")
        ok = run_program(lambda: run_failover_demo(dsn, duration=duration, out=out, live=live))
        return 0 if ok else 1
    from .._tools._embedded import EmbeddedPostgres

    out("starting an embedded PostgreSQL (no installation needed)…")
    with EmbeddedPostgres() as server:
        # Not the DSN: it holds the server's password, which stays out of terminals and logs.
        out(
            f"store: embedded PostgreSQL {server.version} on 127.0.0.1:{server.port} "
            "(its password is random and known only to this process)"
        )
        ok = run_program(
            lambda: run_failover_demo(server.dsn, duration=duration, out=out, live=live)
        )
    return 0 if ok else 1
