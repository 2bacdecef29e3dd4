"""Connection strings: a malformed one never shows its password in an error."""

from __future__ import annotations

import pytest

from eventcore_trio import ConfigurationError, EventCoreError, StoreConnectionError
from eventcore_trio.postgres import open_postgres_store, tool_connection

PASSWORD = "S3cr3tPw"

# Port 1 on the loopback refuses connections, so a DSN our parser accepts meets asyncpg's
# parser and connect, whose errors must not show the password either.
MALFORMED = [
    # keyword form: an unterminated quote, a space in an unquoted value, a stray quote
    f"host=127.0.0.1 port=1 password='{PASSWORD}",
    f"password='{PASSWORD}",
    f"host=127.0.0.1 password = '{PASSWORD} user=u",
    f"host=127.0.0.1 port=1 password={PASSWORD[:4]} {PASSWORD[4:]}",
    f"host=127.0.0.1 port=1 password={PASSWORD} 'x",
    f"host=127.0.0.1 port=1 password={PASSWORD}://x",
    PASSWORD,
    # URI form: characters that needed percent-encoding, and bad escapes
    f"postgresql://u:{PASSWORD[:3]}/{PASSWORD[3:]}@127.0.0.1:1/db",
    f"postgresql://u:{PASSWORD[:3]}#{PASSWORD[3:]}@127.0.0.1:1/db",
    f"postgresql://u:{PASSWORD[:3]}?{PASSWORD[3:]}@127.0.0.1:1/db",
    f"postgresql://u:{PASSWORD[:3]}@{PASSWORD[3:]}@127.0.0.1:1/db",
    f"postgresql://u:12/{PASSWORD}@127.0.0.1:1/db",
    f"postgresql://u:12?{PASSWORD}@127.0.0.1:1/db",
    f"postgresql://u:12?x=1&port={PASSWORD}@127.0.0.1:1/db",
    f"postgresql://u:{PASSWORD}%zz@127.0.0.1:1/db",
    f"postgresql://u:{PASSWORD}/db",
    f"postgresql://u:{PASSWORD}@[::1/db",
    f"postgresql://u:{PASSWORD}@127.0.0.1:1/db?sslmode=bogus",
    # An unencoded "@", ":" and "/" leave one "@" before urllib's cut, and the password's
    # tail where the port would be (found by a review).
    f"postgresql://u:p@{PASSWORD[:4]}:{PASSWORD[4:]}/2024@127.0.0.1:1/db",
    f"postgresql://u:{PASSWORD}@127.0.0.1:1/db",
]


def _messages(error: BaseException) -> str:
    # Everything a traceback or a log line could print: the error and every exception
    # chained to it, as cause or as context.
    texts: list[str] = []
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        texts += [str(item), repr(item)]
        stack += [item.__cause__, item.__context__]
    return "\n".join(texts)


async def test_no_dsn_error_shows_any_part_of_the_password() -> None:
    """For each malformed DSN, the error (ours or, past our parser, asyncpg's) and every
    exception chained to it hold no four characters in a row of the password."""
    pieces = {PASSWORD[i : i + 4] for i in range(len(PASSWORD) - 3)}
    leaks: dict[str, list[str]] = {}
    for dsn in MALFORMED:
        with pytest.raises(EventCoreError) as raised:
            async with open_postgres_store(dsn, connect_timeout=5):
                pytest.fail(f"opened {dsn!r}")
        text = _messages(raised.value)
        if found := sorted(piece for piece in pieces if piece in text):
            leaks[dsn] = found
    assert leaks == {}


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("host=h password='abc", "password= opens a quote at character 17"),
        ("host=h password=ab cd", "no keyword= at character 20, after the value of password="),
        ("postgresql://u:a#b@h/db", "%23"),
        ("postgresql://u:a/b@h/db", "%2F"),
        ("postgresql://u:12?b@h/db", "%3F"),
        ("postgresql://u:a@b@h/db", "%40"),
        ("postgresql://u:a%zz@h/db", "%25"),
    ],
)
def test_a_malformed_dsn_error_says_where_and_how_to_fix_it(dsn: str, message: str) -> None:
    """Without quoting the DSN, the error names the keyword and character, or the
    percent-encoding that fixes the password."""
    from eventcore_trio.postgres._dsn import normalize_dsn

    with pytest.raises(ConfigurationError, match=message):
        normalize_dsn(dsn)


def test_libpq_keyword_values_may_hold_quotes_and_scheme_like_text() -> None:
    """As libpq reads them: a quote inside an unquoted value, and '://' inside a value, are
    part of the value (both were refused as malformed, showing the text)."""
    from eventcore_trio.postgres._dsn import normalize_dsn

    assert normalize_dsn("host=h user=u password=it's") == "postgresql://u:it%27s@h"
    assert normalize_dsn("host=h user=u password=a://b") == "postgresql://u:a%3A%2F%2Fb@h"
    assert normalize_dsn("host=h user=u password=") == "postgresql://u:@h"


class TestToolConnection:
    """`tool_connection`: a plain session for tools, before or beside any store."""

    async def test_runs_statements_and_closes(self, postgres_dsn: str) -> None:
        """The session answers queries under its application name, and is gone after the
        block (no backend of that name remains)."""
        name = "eventcore-trio tool test"
        async with tool_connection(postgres_dsn, application_name=name) as connection:
            assert await connection.fetchval("SELECT current_setting('application_name')") == name
            pid = connection.backend_pid
        async with tool_connection(postgres_dsn) as other:
            alive = await other.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid
            )
        assert alive == 0

    async def test_malformed_dsn_is_a_configuration_error(self) -> None:
        """Checked before connecting, with the option's name and without the password."""
        with pytest.raises(ConfigurationError) as caught:
            async with tool_connection(f"postgresql://u:{PASSWORD}%zz@127.0.0.1:1/db"):
                pass
        assert PASSWORD[:4] not in _messages(caught.value)

    async def test_unreachable_server_is_a_connection_error(self) -> None:
        """Port 1 refuses: a typed `StoreConnectionError`, not asyncpg's OSError."""
        with pytest.raises(StoreConnectionError):
            async with tool_connection("postgresql://u@127.0.0.1:1/db", connect_timeout=5):
                pass
