"""Tests of ``eventcore-trio forget`` and ``eventcore-trio forgotten``: forgetting a data
subject from the command line, and the audit of forgets, against a real PostgreSQL."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import os
import socket
import uuid

import pytest
import trio

from eventcore_trio import (
    SUBJECT_FORGOTTEN,
    NewEvent,
    Position,
    RecordedEvent,
    open_postgres_store,
)
from eventcore_trio.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main

#: Unreachable: a command refused before any I/O exits 2; one that connected would exit 3.
UNREACHABLE = ["--dsn", "postgresql://postgres@127.0.0.1:1/postgres"]
KEK_VARIABLE = "EVENTCORE_KEY_ENCRYPTION_KEY"


class _Terminal(io.StringIO):
    """Standard input at a terminal, holding what the operator types."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def kek(monkeypatch: pytest.MonkeyPatch) -> bytes:
    """The application's key-encryption key, which the commands are never given."""
    monkeypatch.delenv(KEK_VARIABLE, raising=False)
    return os.urandom(32)


def _fresh(dsn: str) -> list[str]:
    # ["--dsn", DSN, "--schema", SCHEMA] of a new schema.
    schema = f"t_{uuid.uuid4().hex[:12]}"
    assert main(["migrate", "--dsn", dsn, "--schema", schema]) == EXIT_OK
    return ["--dsn", dsn, "--schema", schema]


def _registered(subject: str, email: str) -> NewEvent:
    return NewEvent(
        "CustomerRegistered",
        {"customer": subject, "email": email, "plan": "pro"},
        subject=subject,
        personal=["email"],
    )


def _append(dsn: str, schema: str, key: bytes, events: dict[str, NewEvent]) -> None:
    async def append() -> None:
        async with open_postgres_store(dsn, schema=schema, key_encryption_key=key) as store:
            for stream_id, event in events.items():
                await store.append(stream_id, [event])

    trio.run(append)


def _read_all(dsn: str, schema: str, key: bytes) -> list[RecordedEvent]:
    async def read() -> list[RecordedEvent]:
        async with open_postgres_store(dsn, schema=schema, key_encryption_key=key) as store:
            return await store.read_events(None, limit=100)

    return trio.run(read)


def test_forget_asks_first_then_forgets_without_the_key_encryption_key(
    postgres_dsn: str,
    kek: bytes,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without --yes: refused where there is no terminal (exit 2, saying --yes), "no" at a
    terminal keeps the subject (exit 1); "yes" forgets it with no KEK configured and prints
    the record, which the store's audit and the SubjectForgotten event match; the
    subject's events read back without the personal field, other subjects' with theirs."""
    where = _fresh(postgres_dsn)
    schema = where[-1]
    _append(
        postgres_dsn,
        schema,
        kek,
        {"c-42": _registered("c-42", "ada@example.org"), "c-7": _registered("c-7", "bob@x.org")},
    )
    capsys.readouterr()

    assert main(["forget", "c-42", *where]) == EXIT_USAGE  # stdin is not a terminal
    err = capsys.readouterr().err
    assert "--yes" in err
    assert "'c-42'" in err
    assert "cannot be undone" in err
    monkeypatch.setattr("sys.stdin", _Terminal("n\n"))
    assert main(["forget", "c-42", *where]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert "Forget subject 'c-42' in database" in out
    assert f"schema {schema!r}" in out
    assert out.rstrip().endswith("not forgotten")
    assert main(["forgotten", *where]) == EXIT_OK
    assert capsys.readouterr().out == "0 forgotten subject(s)\n"
    assert all("email" in e.data for e in _read_all(postgres_dsn, schema, kek))

    before = dt.datetime.now(dt.UTC)
    monkeypatch.setattr("sys.stdin", _Terminal("yes\n"))
    assert main(["forget", "c-42", *where]) == EXIT_OK
    # After the question: the answer typed is not echoed into a captured stdout.
    line = capsys.readouterr().out.rpartition("[y/N] ")[2]
    assert line.startswith("subject 'c-42' forgotten at ")
    assert f" by {socket.gethostname()} pid {os.getpid()}; " in line

    events = _read_all(postgres_dsn, schema, kek)
    by_stream = {e.stream_id: e for e in events}
    assert "email" not in by_stream["c-42"].data
    assert by_stream["c-42"].forgotten == ("email",)
    assert by_stream["c-7"].data["email"] == "bob@x.org"
    (marker,) = [e for e in events if e.type == SUBJECT_FORGOTTEN]
    assert f"its SubjectForgotten event is at {marker.position} " in line

    assert main(["forgotten", "c-42", "--json", *where]) == EXIT_OK
    (record,) = json.loads(capsys.readouterr().out)
    assert record["subject"] == "c-42"
    assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
    assert Position.parse(record["position"]) == marker.position
    forgotten_at = dt.datetime.fromisoformat(record["forgotten_at"])
    assert before <= forgotten_at <= dt.datetime.now(dt.UTC)
    assert marker.data["forgotten_at"] == record["forgotten_at"]


def test_forgetting_twice_prints_the_first_record(
    postgres_dsn: str, kek: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """The second forget changes nothing, says the subject was already forgotten, and prints
    the first forget's record (text and --json); one SubjectForgotten event in all."""
    where = _fresh(postgres_dsn)
    _append(postgres_dsn, where[-1], kek, {"c-1": _registered("c-1", "ada@example.org")})
    capsys.readouterr()
    assert main(["forget", "c-1", "--yes", "--json", *where]) == EXIT_OK
    first = json.loads(capsys.readouterr().out)
    assert first.pop("already_forgotten") is False

    assert main(["forget", "c-1", "--yes", "--json", *where]) == EXIT_OK
    again = json.loads(capsys.readouterr().out)
    assert again.pop("already_forgotten") is True
    assert again == first
    assert main(["forget", "c-1", "--yes", *where]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("subject 'c-1' was already forgotten at ")
    assert f"its SubjectForgotten event is at {first['position']} " in out

    events = _read_all(postgres_dsn, where[-1], kek)
    assert [e.type for e in events].count(SUBJECT_FORGOTTEN) == 1


def test_an_unknown_subject_exits_1_and_changes_nothing(
    postgres_dsn: str, kek: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """A subject never seen, one whose events carry no personal field, one starting with a
    dash (given after --): exit 1 with a message naming it, no traceback, nothing written
    or recorded."""
    where = _fresh(postgres_dsn)
    plain = NewEvent("Visited", {"page": "/"}, subject="c-plain")
    _append(postgres_dsn, where[-1], kek, {"c-plain": plain})
    capsys.readouterr()
    for subject in ("c-nobody", "c-plain", "-c-dash"):
        # After --, an id that starts with a dash is not read as an option.
        assert main(["forget", "--yes", *where, "--", subject]) == EXIT_FAILED
        captured = capsys.readouterr()
        assert f"holds no personal data of subject {subject!r}" in captured.err
        assert "nothing was forgotten" in captured.err
        assert "Traceback" not in captured.err
        assert captured.out == ""
    assert [e.type for e in _read_all(postgres_dsn, where[-1], kek)] == ["Visited"]
    assert main(["forgotten", "--json", *where]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == []


@pytest.mark.parametrize("subject", ["", " c-1", "c-1 ", "c\x001", "c-\x1b[2J", "x" * 245])
@pytest.mark.parametrize("command", ["forget", "forgotten"])
def test_an_invalid_subject_exits_2_before_connecting(
    command: str, subject: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An id the store would refuse (empty, padded, control characters, too long): exit 2
    naming the argument, before the (unreachable) database is tried, which would exit 3."""
    with pytest.raises(SystemExit) as exited:
        main([command, subject, "--yes" if command == "forget" else "--json", *UNREACHABLE])
    assert exited.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "argument SUBJECT: subject " in err
    assert "Traceback" not in err


def test_forgotten_lists_the_audit_oldest_first(
    postgres_dsn: str, kek: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line per forget (when, subject, host, pid, position), oldest first, and a count;
    --json the same records; SUBJECT narrows to one, and exits 1 for a subject that has not
    been forgotten (one with personal data still readable, or unknown)."""
    where = _fresh(postgres_dsn)
    subjects = ["c-b", "c-a", "c-c"]
    _append(postgres_dsn, where[-1], kek, {s: _registered(s, f"{s}@x.org") for s in subjects})
    capsys.readouterr()
    printed = []
    for subject in subjects[:2]:
        assert main(["forget", subject, "--yes", "--json", *where]) == EXIT_OK
        printed.append(json.loads(capsys.readouterr().out))

    assert main(["forgotten", *where]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "2 forgotten subject(s)"
    assert [line.split("  ")[1] for line in lines[:-1]] == ["c-b", "c-a"]
    for line, record in zip(lines[:-1], printed, strict=True):
        assert line.endswith(f"SubjectForgotten at {record['position']}")
        assert f"  by {socket.gethostname()} pid {os.getpid()}  " in line

    assert main(["forgotten", "--json", *where]) == EXIT_OK
    listed = json.loads(capsys.readouterr().out)
    assert listed == [{k: v for k, v in r.items() if k != "already_forgotten"} for r in printed]

    assert main(["forgotten", "c-a", *where]) == EXIT_OK
    (line,) = capsys.readouterr().out.splitlines()
    assert "  c-a  " in line
    for subject in ("c-c", "c-nobody"):
        assert main(["forgotten", subject, "--json", *where]) == EXIT_FAILED
        captured = capsys.readouterr()
        assert json.loads(captured.out) == []
        assert f"subject {subject!r} has not been forgotten" in captured.err


def test_a_wrong_key_encryption_key_in_the_environment_is_refused(
    postgres_dsn: str,
    kek: bytes,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The command needs no KEK, but one set in the environment is checked at open as for
    every command: a wrong one exits 2 saying so, and nothing is forgotten; the right one
    works as well as none."""
    where = _fresh(postgres_dsn)
    _append(postgres_dsn, where[-1], kek, {"c-1": _registered("c-1", "ada@example.org")})
    capsys.readouterr()
    monkeypatch.setenv(KEK_VARIABLE, base64.b64encode(os.urandom(32)).decode())
    assert main(["forget", "c-1", "--yes", *where]) == EXIT_USAGE
    assert KEK_VARIABLE in capsys.readouterr().err
    assert _read_all(postgres_dsn, where[-1], kek)[0].data["email"] == "ada@example.org"

    monkeypatch.setenv(KEK_VARIABLE, base64.b64encode(kek).decode())
    assert main(["forget", "c-1", "--yes", *where]) == EXIT_OK
    assert capsys.readouterr().out.startswith("subject 'c-1' forgotten at ")
