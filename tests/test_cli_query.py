"""Tests of ``eventcore-trio query``: reading events by types and tags from the command line."""

from __future__ import annotations

import json
import uuid

import pytest
import trio

from eventcore_trio import NewEvent, Position, open_postgres_store
from eventcore_trio.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from eventcore_trio.testing import PostgresHarness

#: Unreachable: a command refused before any I/O exits 2; one that connected would exit 3.
UNREACHABLE = ["--dsn", "postgresql://postgres@127.0.0.1:1/postgres"]


def _fresh(dsn: str) -> list[str]:
    # ["--dsn", DSN, "--schema", SCHEMA] of a new schema.
    schema = f"t_{uuid.uuid4().hex[:12]}"
    assert main(["migrate", "--dsn", dsn, "--schema", schema]) == EXIT_OK
    return ["--dsn", dsn, "--schema", schema]


def _claim(name: str, *more: str) -> NewEvent:
    return NewEvent("UsernameClaimed", {"username": name}, tags=[f"username:{name}", *more])


def test_query_prints_the_matching_events_and_where_the_read_is_complete(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line per matching event (position, stream, version, type, tags, data), then the
    position the read is complete up to; repeated --type means any of them, repeated --tag
    all of them; --limit cuts the read at its last event and --after reads on from there;
    --json prints the same as one object."""
    where = _fresh(postgres_dsn)

    async def prepare() -> list[Position]:
        async with open_postgres_store(postgres_dsn, schema=where[-1]) as store:
            await store.append("user-1", [_claim("ada", "vip")])
            await store.append("user-2", [_claim("bob")])
            await store.append(
                "user-1",
                [
                    NewEvent("UsernameReleased", {"username": "ada"}, tags=["username:ada"]),
                    NewEvent("Other", {}, tags=["username:ada"]),
                ],
            )
            return [e.position for e in await store.read_events(None, limit=10)]

    positions = trio.run(prepare)
    capsys.readouterr()

    assert main(["query", "--type", "UsernameClaimed", "--tag", "username:ada", *where]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(f"schema {where[-1]!r}")
    assert out[1] == (
        f'{positions[0]}  user-1  v1  UsernameClaimed  [username:ada, vip]  {{"username": "ada"}}'
    )
    assert out[2].startswith("1 event(s); complete up to ")
    assert len(out) == 3

    # Any of the types, every one of the tags.
    types = ["--type", "UsernameClaimed", "--type", "UsernameReleased"]
    assert main(["query", *types, "--tag", "username:ada", "--json", *where]) == EXIT_OK
    shown = json.loads(capsys.readouterr().out)
    assert [(e["position"], e["type"], e["stream_version"]) for e in shown["events"]] == [
        (str(positions[0]), "UsernameClaimed", 1),
        (str(positions[2]), "UsernameReleased", 2),
    ]
    assert shown["events"][0]["tags"] == ["username:ada", "vip"]
    assert shown["events"][0]["data"] == {"username": "ada"}
    assert Position.parse(shown["position"]) > positions[-1]
    assert main(["query", "--tag", "username:ada", "--tag", "vip", "--json", *where]) == 0
    assert [e["position"] for e in json.loads(capsys.readouterr().out)["events"]] == [
        str(positions[0])
    ]

    # A page, then the rest from where it ended.
    assert main(["query", "--tag", "username:ada", "--limit", "2", "--json", *where]) == 0
    page = json.loads(capsys.readouterr().out)
    assert [e["position"] for e in page["events"]] == [str(positions[0]), str(positions[2])]
    assert page["position"] == str(positions[2])
    after = ["--after", page["position"]]
    assert main(["query", "--tag", "username:ada", *after, "--json", *where]) == EXIT_OK
    rest = json.loads(capsys.readouterr().out)
    assert [(e["position"], e["type"]) for e in rest["events"]] == [(str(positions[3]), "Other")]

    # Nothing matches: no event, and the read is still complete up to a position.
    assert main(["query", "--tag", "username:nobody", *where]) == EXIT_OK
    assert capsys.readouterr().out.splitlines()[-1].startswith("0 event(s); complete up to ")


def test_query_escapes_what_could_steer_the_terminal(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Data comes from whoever wrote the events: its control characters, escape sequences
    and bidirectional overrides are printed escaped, one line per event (ids, types and tags
    cannot hold them); other text as it is."""
    where = _fresh(postgres_dsn)
    evil = "\x1b]0;owned\x07\x1b[2J\r\nfake line\u202e\u2028"

    async def prepare() -> None:
        async with open_postgres_store(postgres_dsn, schema=where[-1]) as store:
            await store.append("s-1", [NewEvent("T", {"text": f"ünï{evil}"}, tags=["t"])])

    trio.run(prepare)
    capsys.readouterr()
    assert main(["query", "--type", "T", *where]) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3
    assert all(line.isprintable() for line in out)
    assert out[1].endswith(
        '{"text": "ünï\\u001b]0;owned\\u0007\\u001b[2J\\r\\nfake line\\u202e\\u2028"}'
    )


def test_a_matching_event_that_does_not_decode_exits_1(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stored event the read cannot decode is a problem found, not bad usage: exit 1,
    naming its position, no traceback."""
    where = _fresh(postgres_dsn)

    async def prepare() -> None:
        async with open_postgres_store(postgres_dsn, schema=where[-1]) as store:
            await PostgresHarness(postgres_dsn, schema=where[-1]).store_undecodable(store, "bad")

    trio.run(prepare)
    capsys.readouterr()
    assert main(["query", "--type", "Undecodable", *where]) == EXIT_FAILED
    captured = capsys.readouterr()
    assert "a matching event at " in captured.err
    assert "does not decode" in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        (["--tag", ""], "argument --tag: tag must not be empty"),
        (["--tag", "x" * 256], "argument --tag: tag is 256 characters long; the maximum is 255"),
        (["--tag", "a\nb"], "argument --tag: tag must not contain control"),
        (["--tag", " padded"], "argument --tag: tag must not start or end with whitespace"),
        (["--type", ""], "argument --type: event type must not be empty"),
        (["--tag", "t", "--after", "12"], "argument --after: '12' is not a position"),
        (["--tag", "t", "--after=-1:0"], "argument --after: '-1:0' is not a position"),
        (["--tag", "t", "--limit", "0"], "argument --limit: must be a whole number from 1"),
        (["--tag", "t", "--limit", "10001"], "argument --limit: must be a whole number from 1"),
    ],
    ids=repr,
)
def test_bad_arguments_exit_2_before_any_io(
    arguments: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed tag, type, position or limit: exit 2 naming the option, before the
    (unreachable) database is tried."""
    with pytest.raises(SystemExit) as exited:
        main(["query", *arguments, *UNREACHABLE])
    assert exited.value.code == EXIT_USAGE
    assert said in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        ([], "give --type or --tag (or both)"),
        ([f"--tag=t{i}" for i in range(65)], "65 distinct --tag values; an event carries at most"),
    ],
    ids=["no criteria", "65 tags"],
)
def test_a_query_no_event_or_every_event_matches_is_refused(
    arguments: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --type and no --tag would read every event, holding every append back while it
    runs; more tags than an event can carry would read nothing: exit 2, before any I/O."""
    assert main(["query", *arguments, *UNREACHABLE]) == EXIT_USAGE
    assert said in capsys.readouterr().err
