"""The dashboard's action token: where it comes from, what is refused before anything
starts, and how it is compared. (The token at work over HTTP and in a browser:
``tests/postgres/test_dashboard.py`` and ``test_dashboard_browser.py``.)"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import pytest
import trio

from eventcore_trio import ConfigurationError
from eventcore_trio.cli import EXIT_USAGE, main
from eventcore_trio.dashboard import DashboardState, dashboard_app, serve_dashboard
from eventcore_trio.dashboard._token import action_token, read_action_token, token_matches
from eventcore_trio.memory import open_memory_store

from .test_serve import NO_DATABASE

TOKEN = "test-token-0123456789abcdef"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    """A token file only its owner may read, with the trailing newline editors add."""
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def test_the_command_refuses_actions_without_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--allow-actions`` with no token, a token file that cannot be read, or a token too
    short or with spaces: exit 2 before connecting to the database, saying how to give one,
    and never echoing the token."""
    monkeypatch.delenv("EVENTCORE_DASHBOARD_TOKEN", raising=False)
    argv = ["dashboard", "--dsn", NO_DATABASE, "--bind", "127.0.0.1:0", "--allow-actions"]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--action-token-file PATH" in err
    assert "EVENTCORE_DASHBOARD_TOKEN" in err
    assert "secrets.token_urlsafe" in err
    short = tmp_path / "short"
    short.write_text("sh0rt-s3cret\n")
    for path in (tmp_path / "missing", short):
        assert main([*argv, "--action-token-file", str(path)]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert err.startswith("eventcore-trio: ")
        assert str(path) in err
        assert "sh0rt-s3cret" not in err
    for bad in ("sh0rt-s3cret", "a token with spaces in it"):
        monkeypatch.setenv("EVENTCORE_DASHBOARD_TOKEN", bad)
        assert main(argv) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "EVENTCORE_DASHBOARD_TOKEN" in err
        assert bad not in err


def test_the_token_comes_from_the_file_else_the_environment(
    token_file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The file wins over the variable; neither is read while actions are off; a file other
    users may read is used, with a warning."""
    monkeypatch.setenv("EVENTCORE_DASHBOARD_TOKEN", "from-the-environment-0123")
    assert action_token(True, str(token_file)) == TOKEN
    assert action_token(True, None) == "from-the-environment-0123"
    assert action_token(False, str(token_file.parent / "missing")) is None
    assert not caplog.records
    token_file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="eventcore_trio.dashboard"):
        assert read_action_token(str(token_file)) == TOKEN
    assert "chmod 600" in caplog.text
    token_file.write_text(TOKEN * 200)
    with pytest.raises(ConfigurationError, match="alone, on one line"):
        read_action_token(str(token_file))


async def test_the_api_refuses_actions_without_a_token() -> None:
    """`serve_dashboard` and `dashboard_app` with actions allowed and no token, or a short
    one, raise `ConfigurationError` before anything is served."""
    async with open_memory_store() as store, trio.open_nursery() as nursery:
        for token in (None, "short"):
            with pytest.raises(ConfigurationError, match="action_token"):
                await nursery.start(
                    partial(
                        serve_dashboard,
                        store,
                        bind="127.0.0.1:0",
                        allow_actions=True,
                        action_token=token,
                    )
                )
            with pytest.raises(ConfigurationError, match="action_token"):
                dashboard_app(store, DashboardState(allow_actions=True), action_token=token)
    # Read-only needs none.
    dashboard_app(store, DashboardState())


def test_token_matches_only_the_token() -> None:
    """Equal strings only; not a prefix, an extension, or another case."""
    assert token_matches(TOKEN, TOKEN)
    for other in ("", TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "\udcff" + TOKEN[1:]):
        assert not token_matches(other, TOKEN), other
