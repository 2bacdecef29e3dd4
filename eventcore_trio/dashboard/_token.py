"""The dashboard's action token: the secret that a reset or a replay must carry.

The Host check and the action header stop web pages; they do not stop a local process, which
can send any header it likes. So actions need a secret given when the dashboard starts (from
a file or the environment, never the command line, which ``ps`` shows to every user), sent
as ``Authorization: Bearer TOKEN`` and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
from typing import Final

from .._errors import ConfigurationError

logger = logging.getLogger("eventcore_trio.dashboard")

#: The environment variable `eventcore-trio dashboard` reads the token from.
TOKEN_VARIABLE: Final = "EVENTCORE_DASHBOARD_TOKEN"
#: The shortest token accepted: 16 random URL-safe characters are 96 bits.
MIN_TOKEN_LENGTH: Final = 16
#: The longest token file read (a token is a line, not a document).
MAX_TOKEN_FILE_BYTES: Final = 4096
#: How to make a good token, for the messages that refuse one.
MAKE_TOKEN: Final = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def check_action_token(token: object, *, source: str = "action_token") -> str:
    """*token* with surrounding whitespace removed (a file's trailing newline), checked.

    Args:
        source: where it came from, for the message (never the token itself).

    Raises:
        ConfigurationError: it is not a string of at least `MIN_TOKEN_LENGTH` visible ASCII
            characters (it travels in an HTTP header, and a short one can be guessed).
    """
    text = token.strip() if isinstance(token, str) else ""
    # Visible ASCII only: what a header carries unchanged and a person can paste.
    if len(text) < MIN_TOKEN_LENGTH or not all("!" <= ch <= "~" for ch in text):
        raise ConfigurationError(
            f"the dashboard's action token ({source}) must be at least {MIN_TOKEN_LENGTH} "
            f"visible ASCII characters without spaces; make one with: {MAKE_TOKEN}"
        )
    return text


def read_action_token(path: str) -> str:
    """The action token in the file at *path* (its first and only line), checked.

    Logs a warning when other users may read the file: whoever reads it may reset projections.

    Raises:
        ConfigurationError: the file cannot be read, is too long, or holds no valid token.
    """
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            data = file.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read the action token file {path!r}: {exc.strerror or exc}"
        ) from None
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise ConfigurationError(
            f"the action token file {path!r} is longer than {MAX_TOKEN_FILE_BYTES} bytes; it "
            f"must hold the token alone, on one line (make one with: {MAKE_TOKEN})"
        )
    if stat.S_ISREG(mode) and mode & 0o077:
        logger.warning(
            "dashboard: other users may read the action token file %s (mode %03o): chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
    # Not decoded as UTF-8 first: a byte that is not visible ASCII is refused all the same.
    return check_action_token(data.decode("latin-1"), source=f"the file {path!r}")


def action_token(allow_actions: bool, token_file: str | None) -> str | None:
    """The token ``eventcore-trio dashboard`` requires: from *token_file*, else the
    `TOKEN_VARIABLE` environment variable; None when actions are off. A token never comes
    from the command line, which ``ps`` shows.

    Raises:
        ConfigurationError: actions are on without a token, or the token is not valid.
    """
    if not allow_actions:
        return None
    if token_file is not None:
        return read_action_token(token_file)
    token = os.environ.get(TOKEN_VARIABLE)
    if token:
        return check_action_token(token, source=TOKEN_VARIABLE)
    raise ConfigurationError(
        "--allow-actions needs a secret token, or any local process could reset projections: "
        "put one in a file only you can read and pass --action-token-file PATH, or set "
        f"{TOKEN_VARIABLE}; make one with: {MAKE_TOKEN}"
    )


def token_matches(given: str, token: str) -> bool:
    """Whether *given* is *token*, in time that depends on neither of them.

    Both are hashed first: `hmac.compare_digest` then compares two digests of one length,
    so not even the token's length leaks through the timing.
    """
    return hmac.compare_digest(
        hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest(),
        hashlib.sha256(token.encode()).digest(),
    )
