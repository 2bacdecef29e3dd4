"""The contract on bad input: typed errors with nothing written, any text refused or
stored exactly, SQL and JSON edge cases stored as data (see docs/bad-input.md)."""

from __future__ import annotations

import datetime as dt
import enum
import math
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st

from ..._errors import (
    EventEncodeError,
    InvalidArgument,
)
from ..._events import NewEvent, StreamAppend
from ..._filters import EventFilter
from ..._protocols import Leadership, SnapshotStore, Store
from ..._snapshots import Snapshot
from ..._validation import MAX_EVENT_JSON_BYTES
from .._harness import BackendHarness
from ._support import PROPERTY_SETTINGS, events, read_all


class BadInputContract:
    """Bad input: refused with a typed error before anything is written, or stored exactly."""

    # -- bad input ---------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("stream_id", "payload", "expected_version", "error"),
        [
            ("", {"ok": 1}, None, InvalidArgument),
            ("x" * 256, {"ok": 1}, None, InvalidArgument),
            ("bad\x00id", {"ok": 1}, None, InvalidArgument),
            ("bad\nid", {"ok": 1}, None, InvalidArgument),
            (" padded", {"ok": 1}, None, InvalidArgument),
            ("s", {"ok": 1}, -1, InvalidArgument),
            ("s", {"ok": 1}, 1.0, InvalidArgument),
            ("s", {"ok": 1}, True, InvalidArgument),
            ("s", {"bad": object()}, None, EventEncodeError),
            ("s", {"bad": math.nan}, None, EventEncodeError),
            ("s", {"bad": "nul\x00char"}, None, EventEncodeError),
            ("s", {"bad": "lone \ud800 surrogate"}, None, EventEncodeError),
            ("s", {"bad": {1, 2}}, None, EventEncodeError),
        ],
    )
    async def test_bad_append_writes_nothing(
        self,
        store: Store,
        stream_id: Any,
        payload: Any,
        expected_version: Any,
        error: type[Exception],
    ) -> None:
        """A bad stream id, version or payload raises a typed error; nothing is written."""
        await store.append("s", events("Existing"))
        batch = [NewEvent("Good", {"n": 1}), NewEvent("Maybe", payload)]
        with pytest.raises(error):
            await store.append(stream_id, batch, expected_version=expected_version)
        assert [e.type for e in await read_all(store)] == ["Existing"]

    async def test_oversized_payloads_are_refused_and_large_ones_round_trip(
        self, store: Store
    ) -> None:
        """Data or metadata over MAX_EVENT_JSON_BYTES is refused; just under it is stored."""
        await store.append("s", events("Existing"))
        # Two bytes of JSON quoting around the string, plus the key.
        wrapper = len('{"blob":""}')
        oversized = {"blob": "x" * (MAX_EVENT_JSON_BYTES - wrapper + 1)}
        for bad in (NewEvent("Big", oversized), NewEvent("Big", {}, metadata=oversized)):
            with pytest.raises(EventEncodeError, match="MAX_EVENT_JSON_BYTES"):
                await store.append("s", [NewEvent("Good", {}), bad])
        assert [e.type for e in await read_all(store)] == ["Existing"]
        largest = {"blob": "é" * ((MAX_EVENT_JSON_BYTES - wrapper) // 2)}
        await store.append("big", [NewEvent("Big", largest)])
        (stored,) = await store.read_stream("big")
        assert stored.data == largest

    async def test_deeply_nested_payload_is_an_encode_error(self, store: Store) -> None:
        """Data nested past the encoder's reach is an EventEncodeError, and nothing is written."""
        nested: dict[str, object] = {}
        for _ in range(5000):
            nested = {"n": nested}
        for payload in ({"data": nested}, {"data": {}, "metadata": nested}):
            with pytest.raises(EventEncodeError, match="nested too deeply"):
                await store.append("deep", [NewEvent("A", **payload)])  # type: ignore[arg-type]
        assert await read_all(store) == []

    async def test_bad_arguments_are_refused(self, store: Store) -> None:
        """Wrong types and malformed requests raise InvalidArgument before any I/O."""
        bad_calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.append("s", NewEvent("A", {})),  # type: ignore[arg-type]
            lambda: store.append("s", ["not an event"]),  # type: ignore[list-item]
            lambda: store.append(42, events("A")),  # type: ignore[arg-type]
            lambda: store.append_atomic([]),
            lambda: store.append_atomic(
                [StreamAppend("s", events("A")), StreamAppend("s", events("B"))]
            ),
            lambda: store.read_stream("s", after_version=-1),
            lambda: store.read_events(None, limit=0),
            lambda: store.read_events("1:2", limit=1),  # type: ignore[call-overload]
            lambda: store.save_checkpoint("p", "1:2"),  # type: ignore[arg-type]
            lambda: store.load_checkpoint(""),
            # Past PostgreSQL's bigint: refused here, not by the server.
            lambda: store.append("s", events("A"), expected_version=2**63),
            lambda: store.read_stream("s", after_version=2**63),
            lambda: store.read_events(None, limit=2**63),
        ]
        for call in bad_calls:
            with pytest.raises(InvalidArgument):
                await call()
        with pytest.raises(InvalidArgument):
            async with store.try_acquire("bad\x00name"):
                pytest.fail("acquired an invalid name")
        assert await read_all(store) == []

    @PROPERTY_SETTINGS
    @hypothesis.given(
        stream_id=st.text(min_size=0, max_size=300),
        name=st.text(min_size=0, max_size=130),
    )
    async def test_property_any_text_is_refused_or_round_trips(
        self, harness: BackendHarness, stream_id: str, name: str
    ) -> None:
        """Any string as a stream id or a name (quotes, SQL, NUL included) is refused with
        InvalidArgument before any I/O, or stored and read back exactly."""
        async with harness.open_store() as store:
            await self._check_text(store, stream_id, name)

    @staticmethod
    async def _check_text(store: Store, stream_id: str, name: str) -> None:
        before = len(await read_all(store))
        try:
            result = await store.append(stream_id, events("E"))
        except InvalidArgument:
            assert len(await read_all(store)) == before
        else:
            # Examples share the harness's database, so the stream may hold earlier events.
            stored = (await store.read_stream(stream_id))[-1]
            assert (stored.stream_id, stored.position) == (stream_id, result.position)
        try:
            position = (await store.append("named", events("N"))).position
            assert position is not None
            await store.save_checkpoint(name, position)
        except InvalidArgument:
            return
        assert await store.load_checkpoint(name) == position

    async def test_sql_metacharacters_are_data(self, store: Store) -> None:
        """Quotes, semicolons and SQL in ids, names, types and data are stored as plain data."""
        hostile = "x'); DROP TABLE events; --\"%_*"
        await store.append(hostile, [NewEvent(hostile, {hostile: hostile})], expected_version=0)
        (event,) = await store.read_stream(hostile)
        assert (event.stream_id, event.type, event.data) == (hostile, hostile, {hostile: hostile})
        assert [e.stream_id for e in await read_all(store)] == [hostile]
        await store.save_checkpoint(hostile, event.position)
        assert await store.load_checkpoint(hostile) == event.position
        async with store.try_acquire(hostile) as leadership:
            assert leadership.is_held
        page = await store.read_events(
            None, limit=10, filter=EventFilter(stream_prefix=hostile[:5], event_types=[hostile])
        )
        assert len(page) == 1

    async def test_escaped_looking_text_is_data(self, store: Store) -> None:
        """Text that looks like a JSON escape (a backslash, then u0000) is stored as written;
        only a real NUL character is refused."""
        looks_escaped = {"s": "\\u0000", "t": "\\\\u0000x"}
        await store.append("escapes", [NewEvent("E", looks_escaped)])
        (event,) = await store.read_stream("escapes")
        assert event.data == looks_escaped
        with pytest.raises(EventEncodeError):
            await store.append("escapes", [NewEvent("E", {"s": "\\\x00"})])
        assert len(await store.read_stream("escapes")) == 1

    async def test_json_edge_values_round_trip_exactly(self, store: Store) -> None:
        """Values at the edges of JSON codecs come back exactly as appended: integers beyond
        64 bits, extreme floats, deep nesting, subclasses of the JSON types, and text that
        contains ``null``."""

        class Text(str):
            pass

        class Number(enum.IntEnum):
            ONE = 1

        deep: Any = "bottom"
        for _ in range(400):
            deep = [deep]
        data = {
            "big": 2**70,
            "small": -(2**70),
            "u64": 2**64 - 1,
            # Nineteen digits, below -2**63: orjson would read it as a float.
            "i64_under": -9_999_999_999_999_999_999,
            "digits": "123456789012345678901234567890",
            "float": 1e16,
            "tiny": 1.5e-320,
            "deep": deep,
            "text": Text("a str subclass"),
            "enum": Number.ONE,
            "none": None,
            "says_null": "null and void",
            "unicode": "Grüße, 世界 \U0001f600",
            "keys": {"1": "one"},
        }
        await store.append("edges", [NewEvent("E", data)])
        (event,) = await store.read_stream("edges")
        assert event.data == data
        assert type(event.data["big"]) is int
        assert type(event.data["i64_under"]) is int
        with pytest.raises(EventEncodeError):
            await store.append("edges", [NewEvent("E", {"inf": math.inf})])
        with pytest.raises(EventEncodeError):
            await store.append("edges", [NewEvent("E", {"when": dt.datetime.now(dt.UTC)})])
        assert len(await store.read_stream("edges")) == 1

    async def test_keys_that_are_not_str_are_refused_on_every_write_path(
        self, store: Store
    ) -> None:
        """A key that is not a str, anywhere in data or metadata (JSON would turn 1 and
        "1" into one key and keep one value), raises EventEncodeError naming its path before
        anything is written: appends, atomic appends, a batch's appends (a reactor's
        ``ctx.append``) and snapshots."""
        # The issue's example, as written: True replaces 1's value in the dict itself.
        colliding = {1: "a", "1": "b", True: "c", "true": "d"}  # noqa: F601
        with pytest.raises(EventEncodeError, match=r"not a str: 1 \(int\) in data\. "):
            await store.append("dk-1", [NewEvent("E", colliding)])  # type: ignore[arg-type]

        class TaggedKey(str):
            # Two keys with the same text that the dict keeps apart.
            def __eq__(self, other: object) -> bool:
                return self is other

            __hash__ = object.__hash__

        bad: list[tuple[NewEvent, str]] = [
            (
                NewEvent("E", {"order": {"lines": [{"sku": "x", "qty": {2: 1}}]}}),
                "not a str: 2 (int) in data['order']['lines'][0]['qty']",
            ),
            (NewEvent("E", {}, metadata={"trace": {None: "x"}}), "None (NoneType) in metadata"),
            (NewEvent("E", {"rates": ({1.5: "x"},)}), "1.5 (float) in data['rates'][0]"),
            (NewEvent("E", {"pairs": {(1, 2): "x"}}), "(1, 2) (tuple) in data['pairs']"),
            (
                NewEvent("E", {"k": {TaggedKey("k"): 1, TaggedKey("k"): 2}}),
                "two keys that are both 'k' as JSON at data['k']",
            ),
        ]
        good = NewEvent("Good", {"n": 1})
        async with store.try_acquire("dk") as leadership:
            for event, message in bad:
                calls: list[Callable[[], Awaitable[object]]] = [
                    partial(store.append, "dk-2", [good, event]),
                    partial(
                        store.append_atomic,
                        [StreamAppend("dk-3", [good]), StreamAppend("dk-4", [event])],
                    ),
                    partial(self._append_in_batch, leadership, [good, event]),
                ]
                for call in calls:
                    with pytest.raises(EventEncodeError) as info:
                        await call()
                    assert message in str(info.value)
                    assert "before appending" in str(info.value)  # what to do
        if isinstance(store, SnapshotStore):
            snapshot = Snapshot("dk-5", "State", 1, 1, {"by_id": {7: "x"}})
            with pytest.raises(EventEncodeError, match=r"7 \(int\) in snapshot\['by_id'\]"):
                await store.write_snapshot(snapshot)
            assert await store.read_snapshot("dk-5", "State") is None
        assert await read_all(store) == []
        assert await store.load_checkpoint("dk") is None

    @staticmethod
    async def _append_in_batch(leadership: Leadership, events: list[NewEvent]) -> None:
        async with leadership.open_batch() as batch:
            await batch.append_atomic([StreamAppend("dk-6", events)])

    async def test_tuples_are_stored_as_lists(self, store: Store) -> None:
        """A tuple in data or metadata is a JSON array: stored whole, read back as a list
        (the decision on docs/bad-input.md); a tuple as a key is refused."""
        data = {"point": (1, 2), "nested": [("a", {"b": (True, None)})]}
        await store.append("tuples", [NewEvent("E", data, metadata={"path": ("x", "y")})])
        (event,) = await store.read_stream("tuples")
        assert event.data == {"point": [1, 2], "nested": [["a", {"b": [True, None]}]]}
        assert event.metadata["path"] == ["x", "y"]
