"""The commands on personal data: ``forget`` (a data subject, for good) and ``forgotten``
(the audit of forgets), over `PostgresStore.forget` and `PostgresStore.forget_records`.

Neither needs the key-encryption key: a forget deletes a subject's wrapped key without
unwrapping it, and the audit is plain. When ``EVENTCORE_KEY_ENCRYPTION_KEY`` is set anyway,
the store checks it at open as it does for every command (a wrong one exits 2).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from .._errors import InvalidArgument, SubjectNotFound
from .._personal._fields import check_subject
from .._personal._forget import ForgetRecord, this_process
from ._options import EXIT_FAILED, EXIT_OK, StoreOptions
from ._status import printable


def subject(text: str) -> str:
    """An argparse type: a subject id, checked as the store checks it (so a bad one exits 2
    before any connection)."""
    try:
        return check_subject(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def forget_question(options: StoreOptions, subject: str) -> str:
    """What ``forget`` asks before it forgets: which subject, in which store, for good."""
    # repr() escapes what could steer the terminal; a subject has no control characters,
    # but it may hold other unprintable ones (bidirectional overrides).
    return (
        f"Forget subject {subject!r} in {options.describe()}? Its personal fields become "
        "unreadable for good: this cannot be undone"
    )


def _record_json(record: ForgetRecord) -> dict[str, object]:
    return {
        "subject": record.subject,
        "forgotten_at": record.forgotten_at.isoformat(),
        "host": record.host,
        "pid": record.pid,
        "position": str(record.position),
    }


def record_line(record: ForgetRecord) -> str:
    """One forget as ``forgotten`` lists it: when, the subject, by which process, and the
    position of its ``SubjectForgotten`` event."""
    when = record.forgotten_at.isoformat(sep=" ", timespec="seconds")
    return (
        f"{when}  {printable(record.subject)}  by {printable(record.host)} pid {record.pid}  "
        f"SubjectForgotten at {record.position}"
    )


async def forget(options: StoreOptions, subject: str, as_json: bool) -> int:
    async with options.open() as store:
        started = dt.datetime.now(dt.UTC)
        try:
            record = await store.forget(subject)
        except SubjectNotFound:
            # Not bad usage: the command ran and found nothing to forget (as `reset` of an
            # unknown projection). Advice in terms of this command line.
            print(
                f"eventcore-trio: {options.describe()} holds no personal data of subject "
                f"{subject!r} (no event with personal fields was appended for it): nothing "
                "was forgotten or changed. Check the id: it is the subject the events were "
                "appended with",
                file=sys.stderr,
            )
            return EXIT_FAILED
    # The store returns the first forget's record when the subject was forgotten before:
    # one of another process (a pid is unique on its host while it runs), or of this one
    # (whose clock stamped it) from before this call.
    already = (record.host, record.pid) != this_process() or record.forgotten_at < started
    if as_json:
        print(json.dumps({**_record_json(record), "already_forgotten": already}, indent=2))
        return EXIT_OK
    when = record.forgotten_at.isoformat(sep=" ", timespec="seconds")
    said = "was already forgotten" if already else "forgotten"
    print(
        f"subject {subject!r} {said} at {when} by {printable(record.host)} pid {record.pid}; "
        f"its SubjectForgotten event is at {record.position} (wait for your projections to "
        "pass it, so that they have erased what they derived)"
    )
    return EXIT_OK


async def forgotten(options: StoreOptions, subject: str | None, as_json: bool) -> int:
    async with options.open() as store:
        records = await store.forget_records(subject)
    if as_json:
        print(json.dumps([_record_json(r) for r in records], indent=2))
    else:
        for record in records:
            print(record_line(record))
        if subject is None:
            print(f"{len(records)} forgotten subject(s)")
    if subject is not None and not records:
        # Exit 1, as a check a script can make: "was this subject forgotten?"
        print(f"eventcore-trio: subject {subject!r} has not been forgotten", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
