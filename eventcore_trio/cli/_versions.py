"""The commands on projection versions: ``versions``, ``serve`` and ``retire``."""

from __future__ import annotations

import json
import sys

from .._errors import ConfigurationError, InvalidArgument, ProjectionNotFound, ProjectionRunning
from .._progress import VersionSummary, version_summaries
from .._status import ProjectionStatus
from .._versions import VersionRole, VersionSwitch, split_versioned
from ._options import EXIT_FAILED, EXIT_OK, StoreOptions
from ._status import printable, version_line


def confirm(question: str, refused: str, yes: bool) -> bool:
    """Whether to go on: *yes* (``--yes``), else the answer to *question* at the terminal
    (*refused* is printed when it is no).

    Raises:
        ConfigurationError: no ``--yes`` and no terminal to ask at.
    """
    if yes:
        return True
    if not sys.stdin.isatty():
        raise ConfigurationError(f"{question.rstrip('?')}: confirm with --yes")
    answer = input(f"{question} [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        print(refused)
        return False
    return True


def _switch_json(switch: VersionSwitch) -> dict[str, object]:
    return {
        "switched_at": switch.switched_at.isoformat(),
        "from_version": switch.from_version,
        "to_version": switch.to_version,
        "position": None if switch.position is None else str(switch.position),
        "reason": switch.reason,
    }


def _summary_json(summary: VersionSummary) -> dict[str, object]:
    return {
        "version": summary.version,
        "role": summary.role.value,
        "units": summary.units,
        "lag_events": summary.lag_events,
        "lag_estimated": summary.lag_estimated,
        "progress": summary.progress,
    }


_REASONS = {
    "first": "the first version to run",
    "caught-up": "caught up",
    "manual": "switched by an operator",
}


def switch_line(switch: VersionSwitch) -> str:
    """One switch of the changelog, as ``eventcore-trio versions`` prints it."""
    when = switch.switched_at.isoformat(sep=" ", timespec="seconds")
    start = "-" if switch.from_version is None else f"v{switch.from_version}"
    at = "nothing applied" if switch.position is None else f"at {switch.position}"
    why = _REASONS.get(switch.reason, printable(switch.reason))
    return f"{when}  {start:>6} -> v{switch.to_version:<6} {at} ({why})"


async def versions(options: StoreOptions, name: str, as_json: bool) -> int:
    # A version's name ("name@v2", as status prints it) stands for its projection.
    name, _ = split_versioned(name)
    async with options.open() as store:
        serving = await store.serving_version(name)
        switches = await store.version_switches(name)
        records: list[ProjectionStatus] = [
            r for r in await store.projection_status() if r.name == name
        ]
        head = await store.last_position()
    if serving is None and not records and not switches:
        raise ProjectionNotFound(f"no projection named {name!r} has run against this store")
    summaries = version_summaries(records, head)
    if as_json:
        print(
            json.dumps(
                {
                    "name": name,
                    "serving": serving,
                    "versions": [_summary_json(s) for s in summaries],
                    "switches": [_switch_json(s) for s in switches],
                },
                indent=2,
            )
        )
        return EXIT_OK
    print(
        f"{printable(name)}: "
        + ("no version serves yet" if serving is None else f"version {serving} serves")
    )
    for summary in summaries:
        print(f"  {version_line(summary)}")
    print("switches (oldest first):" if switches else "no switch recorded")
    for switch in switches:
        print(f"  {switch_line(switch)}")
    return EXIT_OK


async def serve(options: StoreOptions, name: str, version: int) -> int:
    async with options.open() as store:
        before = await store.serving_version(name)
        await store.serve_version(name, version)
        records = [r for r in await store.projection_status() if r.name == name]
    if before == version:
        print(f"version {version} of {name!r} already serves: nothing changed")
        return EXIT_OK
    summaries = version_summaries(records, None)
    withdrawn = [s.version for s in summaries if s.role is VersionRole.WITHDRAWN]
    superseded = [s.version for s in summaries if s.role is VersionRole.SUPERSEDED]
    print(f"version {version} of {name!r} serves now (before: {before or 'none'})")
    if withdrawn:
        print(
            f"withdrawn: version(s) {', '.join(map(str, withdrawn))}: they stop and never take "
            f"over on their own (`eventcore-trio serve {name} N` or `retire {name} N`)"
        )
    if superseded:
        print(
            f"superseded: version(s) {', '.join(map(str, superseded))}: they stop; their read "
            "models stay until retired"
        )
    print(
        f"version {version} applies events again once a host runs it (from where it stopped: "
        "until then its read model is as old as its checkpoint)"
    )
    return EXIT_OK


async def retire(options: StoreOptions, name: str, version: int, wait: bool) -> int:
    async with options.open() as store:
        try:
            if wait:
                print(
                    f"waiting for the units of version {version} of {name!r} to stop "
                    "(Ctrl-C stops waiting)…",
                    flush=True,
                )
            await store.retire_version(name, version, wait=wait)
        except InvalidArgument as exc:
            if await store.serving_version(name) != version:
                raise
            # Not a usage error: the command ran, and that version serves.
            print(f"eventcore-trio: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except ProjectionRunning:
            print(
                f"eventcore-trio: a unit of version {version} of {name!r} is running on a host "
                "(see `eventcore-trio status`): stop the hosts that run it, or pass --wait",
                file=sys.stderr,
            )
            return EXIT_FAILED
    print(
        f"version {version} of {name!r} retired: its checkpoints, dead letters and read model "
        "are gone"
    )
    return EXIT_OK
