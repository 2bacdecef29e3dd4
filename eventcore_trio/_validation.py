"""Checks applied at the public boundary, before anything reaches a backend."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final

import orjson

from ._errors import EventEncodeError, InvalidArgument
from ._partitions import Unit, has_unit_suffix
from ._versions import has_version_suffix, split_versioned

MAX_STREAM_ID_LENGTH: Final = 255
MAX_NAME_LENGTH: Final = 120
MAX_EVENT_TYPE_LENGTH: Final = 255
#: The largest event data (and, separately, metadata) accepted, in bytes of UTF-8 JSON. Far
#: below PostgreSQL's jsonb limit (about 255 MB) and its 1 GB message limit, so one append of
#: many large events still fits in one statement; big blobs belong in object storage, with a
#: reference in the event.
MAX_EVENT_JSON_BYTES: Final = 16 * 1024 * 1024
#: The largest integer PostgreSQL's bigint holds: versions, cursors and limits above it are
#: refused before any I/O instead of coming back as a server error.
MAX_BIGINT: Final = 2**63 - 1
# A NUL in encoded JSON: the escape \u0000 after an even number of backslashes. After an odd
# number the backslash is itself escaped: a string holding the six characters \u0000 is
# encoded as \\u0000, and PostgreSQL stores it.
_NUL_ESCAPE: Final = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _has_control_character(text: str) -> bool:
    # Category "C*" covers control (NUL included), format, surrogate and unassigned code points:
    # none of them belongs in an identifier, and NUL cannot be stored in PostgreSQL text at all.
    # str.isprintable() is False exactly for "C*" and "Z*" other than the ASCII space (the
    # same character database): a printable text has no "C*" character, and is answered in C
    # instead of a category look-up per character. Only the rest (a no-break space, say,
    # which is allowed) takes the look-up.
    if text.isprintable():
        return False
    return any(unicodedata.category(ch)[0] == "C" for ch in text)


def check_identifier(
    kind: str, value: object, *, max_length: int, trailing_whitespace: bool = False
) -> str:
    """Return *value* if it is a valid identifier of the given kind, else raise InvalidArgument.

    With *trailing_whitespace* (for prefixes, which may end inside an id) only leading
    whitespace is refused.
    """
    if not isinstance(value, str):
        raise InvalidArgument(f"{kind} must be a str, got {type(value).__name__}: {value!r}")
    if not value:
        raise InvalidArgument(f"{kind} must not be empty")
    if len(value) > max_length:
        raise InvalidArgument(
            f"{kind} is {len(value)} characters long; the maximum is {max_length}: {value[:40]!r}…"
        )
    if value != (value.lstrip() if trailing_whitespace else value.strip()):
        raise InvalidArgument(f"{kind} must not start or end with whitespace: {value!r}")
    if _has_control_character(value):
        raise InvalidArgument(
            f"{kind} must not contain control or unassigned characters: {value!r}"
        )
    return value


def check_state_name(state: object) -> str:
    """Check a snapshot's state name (a registered state class's name): as an event type."""
    return check_identifier("state", state, max_length=MAX_EVENT_TYPE_LENGTH)


def check_stream_id(value: object) -> str:
    """Validate a stream id."""
    return check_identifier("stream_id", value, max_length=MAX_STREAM_ID_LENGTH)


def check_name(value: object, kind: str = "name") -> str:
    """Validate a projector, checkpoint or leadership name.

    A partitioned projection's unit name (``"name[2/4]"``) may exceed the limit by its suffix.
    """
    if isinstance(value, str) and has_unit_suffix(value):
        check_identifier(kind, Unit.parse(value).projection, max_length=MAX_NAME_LENGTH)
        return value
    return check_identifier(kind, value, max_length=MAX_NAME_LENGTH)


def check_projector_name(value: object) -> str:
    """Validate a projector's name: a name that does not end like a unit name."""
    name = check_name(value, "projector name")
    if has_unit_suffix(name):
        raise InvalidArgument(
            f"projector name {name!r} ends like a partition's unit name ('[index/count]'), "
            "which is reserved; rename it"
        )
    if has_version_suffix(name):
        raise InvalidArgument(
            f"projector name {name!r} ends like a projection version's name ('@v<N>'), which "
            "is reserved; rename it, or give the version as projector(name, version=N)"
        )
    return name


def check_projection_name(value: object) -> str:
    """Validate a projection's name: a projector's name, or one version of it
    (``"name@v2"``, see `versioned_name`)."""
    if isinstance(value, str):
        base, version = split_versioned(value)
        if version > 1:
            check_projector_name(base)
            return value
    return check_projector_name(value)


def check_expected_version(value: object, *, field: str = "expected_version") -> int | None:
    """Validate an expected version: None (any), 0 (must not exist) or n >= 1 (exactly n)."""
    if value is None:
        return None
    if type(value) is not int:
        raise InvalidArgument(
            f"{field} must be None, 0 or a positive int, got {type(value).__name__}: {value!r}"
        )
    if value < 0:
        raise InvalidArgument(
            f"{field} must be None (any version), 0 (stream must not exist) or the stream's "
            f"event count; got {value}"
        )
    _check_bigint(field, value)
    return value


def _check_bigint(field: str, value: int) -> None:
    if value > MAX_BIGINT:
        raise InvalidArgument(
            f"{field} must be at most 2**63 - 1 ({MAX_BIGINT}), the largest value PostgreSQL "
            f"stores; got {value}"
        )


def check_version_cursor(value: object, *, field: str = "after_version") -> int:
    """Validate a stream-version cursor (0 = from the start)."""
    if type(value) is not int or value < 0:
        raise InvalidArgument(f"{field} must be an int >= 0, got {value!r}")
    _check_bigint(field, value)
    return value


def check_limit(value: object) -> int:
    """Validate a page size."""
    if type(value) is not int or value < 1:
        raise InvalidArgument(f"limit must be an int >= 1, got {value!r}")
    _check_bigint("limit", value)
    return value


_ENCODER: Final = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, check_circular=True, separators=(",", ":")
)
# Subclasses of str, int, dict and list, datetimes and dataclasses go to the standard encoder
# (below), which decides exactly as before; orjson alone would accept datetimes and
# dataclasses that the standard encoder refuses.
_ORJSON_OPTIONS: Final = (
    orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
)
_orjson_dumps: Final = orjson.dumps


def _dump(kind: str, value: dict[str, Any]) -> str:
    # orjson is about twenty times faster than json here. Everything it cannot or should not
    # encode goes to the standard encoder, whose verdict (and error message) stands, and then
    # to the key check: orjson refuses every key that is not exactly a str, but the standard
    # encoder turns 1, True and None into "1", "true" and "null" (and writes a key that is a
    # str subclass as its text), so two keys could become one and jsonb would keep the last.
    try:
        raw = orjson.dumps(value, option=_ORJSON_OPTIONS)
    except TypeError:
        try:
            text = _ENCODER.encode(value)
        except (TypeError, ValueError):
            _check_keys(kind, value)  # a key it refused (a tuple): say which, and where
            raise
        if not _keys_are_str(value):
            _check_keys(kind, value)
        return text
    if b"null" in raw:
        # orjson writes NaN and infinities as null; the standard encoder refuses them.
        _ENCODER.encode(value)
    return raw.decode("utf-8")


_CONTAINERS: Final = (dict, list, tuple)


def _keys_are_str(value: dict[str, Any]) -> bool:
    # Whether every object key in *value*, which the standard encoder has just encoded (so it
    # holds no cycle), is exactly a str: the quick look, without paths, of data that took the
    # slow path (subclasses, integers beyond 64 bits) for another reason. Not recursive: the
    # encoder may have gone as deep as Python's recursion limit allows.
    stack: list[Any] = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key in node:
                if type(key) is not str:
                    return False
            stack.extend([item for item in node.values() if isinstance(item, _CONTAINERS)])
        else:
            stack.extend([item for item in node if isinstance(item, _CONTAINERS)])
    return True


def _check_keys(kind: str, value: dict[str, Any]) -> None:
    # Raise EventEncodeError, naming the path, unless every object key in *value* is a str
    # and no two keys of one object have the same text. Not recursive, and visiting each
    # container once: *value* may be nested too deeply for the encoder, or hold a cycle.
    # Invariant of the stack: each entry is a dict, list or tuple, and the path to it.
    stack: list[tuple[object, tuple[object, ...]]] = [(value, ())]
    visited: set[int] = set()
    while stack:
        node, path = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, dict):
            subclassed = False
            for key, item in node.items():
                if type(key) is not str:
                    if not isinstance(key, str):
                        raise EventEncodeError(_bad_key(kind, path, key))
                    subclassed = True
                if isinstance(item, _CONTAINERS):
                    stack.append((item, (*path, key)))
            if subclassed:
                _check_distinct(kind, path, node)
        else:
            assert isinstance(node, list | tuple)
            for index, item in enumerate(node):
                if isinstance(item, _CONTAINERS):
                    stack.append((item, (*path, index)))


def _check_distinct(kind: str, path: tuple[object, ...], node: dict[Any, Any]) -> None:
    # Keys that are str subclasses are written as their text (str.__str__), which two unequal
    # keys may share (a subclass that compares more than the text).
    seen: set[str] = set()
    for key in node:
        text = str.__str__(key)
        if text in seen:
            raise EventEncodeError(
                f"event {kind} has two keys that are both {text!r} as JSON at "
                f"{_path(kind, path)} (a str subclass that compares more than its text?); "
                "one value would be lost. Make the keys distinct plain str before appending"
            )
        seen.add(text)


def _path(kind: str, path: tuple[object, ...]) -> str:
    return kind + "".join(f"[{step!r}]" for step in path)


def _bad_key(kind: str, path: tuple[object, ...], key: object) -> str:
    advice = (
        "before writing the snapshot (in a state class, declare the mapping's keys str, or "
        "int: those are stored as their text and read back as ints)"
        if kind == "snapshot"
        else "before appending"
    )
    return (
        f"event {kind} has a key that is not a str: {key!r} ({type(key).__name__}) in "
        f"{_path(kind, path)}. JSON object keys are strings, and a key converted to one "
        "reads back changed and can collide with another (1 and '1', True and 'true'), "
        f"losing a value: convert the keys to str yourself, keeping them distinct, {advice}"
    )


def encode_json_object(kind: str, value: Mapping[str, Any]) -> str:
    """Encode event data or metadata as compact JSON text, or raise EventEncodeError."""
    # type() first: isinstance() against the Mapping ABC is slow, and this runs per event
    # (twice: NewEvent's default metadata is an empty MappingProxyType).
    if type(value) is not dict:
        if type(value) is not MappingProxyType and not isinstance(value, Mapping):
            raise EventEncodeError(f"event {kind} must be a mapping, got {type(value).__name__}")
        if not value:
            return "{}"
        value = dict(value)
    elif not value:
        return "{}"
    # The common case, said once: orjson encodes it and its bytes are the UTF-8 text, so
    # their length is the size. Anything else (orjson refuses it, or it wrote null, which
    # may stand for a NaN) takes the general path below, which decides exactly as before.
    try:
        raw = _orjson_dumps(value, option=_ORJSON_OPTIONS)
    except TypeError:
        pass
    else:
        if b"null" not in raw:
            if len(raw) > MAX_EVENT_JSON_BYTES:
                raise EventEncodeError(_too_large(kind, len(raw)))
            text = raw.decode("utf-8")
            if b"\\u0000" in raw:
                _check_nul(kind, text)
            return text
    try:
        text = _dump(kind, value)
    except EventEncodeError:
        raise
    except (TypeError, ValueError) as exc:
        raise EventEncodeError(
            f"event {kind} is not JSON-serialisable ({exc}); convert it to JSON types "
            "(str, int, finite float, bool, None, list, dict) before appending"
        ) from exc
    except RecursionError as exc:
        # The encoder recurses once per nesting level; Python's limit comes first.
        raise EventEncodeError(
            f"event {kind} is nested too deeply to encode as JSON; flatten it (PostgreSQL's "
            "jsonb accepts at most a few thousand levels anyway)"
        ) from exc
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise EventEncodeError(
            f"event {kind} contains text that is not valid Unicode ({exc.reason}: a lone "
            "surrogate?); fix the string before appending"
        ) from exc
    if size > MAX_EVENT_JSON_BYTES:
        raise EventEncodeError(_too_large(kind, size))
    # The substring test first: the regular expression costs more than the rest of the
    # encoding, and can only match where the escape appears at all.
    if "\\u0000" in text:
        _check_nul(kind, text)
    return text


def _too_large(kind: str, size: int) -> str:
    return (
        f"event {kind} is {size:,} bytes as JSON, over the limit of "
        f"{MAX_EVENT_JSON_BYTES:,} (MAX_EVENT_JSON_BYTES); store large content elsewhere "
        "(object storage, a table of its own) and put a reference in the event"
    )


def _check_nul(kind: str, text: str) -> None:
    if _NUL_ESCAPE.search(text):
        raise EventEncodeError(
            f"event {kind} contains a NUL character, which PostgreSQL cannot store in JSON; "
            "remove it or encode the value (e.g. base64)"
        )


#: The most tags one event may carry.
MAX_TAGS: Final = 64
#: The longest tag, in characters.
MAX_TAG_LENGTH: Final = 255


def check_tags(value: object, *, owner: str = "tags") -> tuple[str, ...]:
    """*value* as tags: distinct strings, validated like other identifiers, sorted.

    Raises:
        InvalidArgument: not a collection of strings (a lone string is refused too), an
            empty, too long or control-character tag, or more than `MAX_TAGS`.
    """
    if value == ():
        return ()
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidArgument(
            f"{owner} must be a list of strings, got {type(value).__name__}: {value!r:.80}"
        )
    tags = tuple(value)
    if len(tags) > MAX_TAGS:
        raise InvalidArgument(f"{owner}: {len(tags)} tags; at most {MAX_TAGS} per event")
    for tag in tags:
        check_identifier("tag", tag, max_length=MAX_TAG_LENGTH)
    return tuple(sorted(set(tags)))
