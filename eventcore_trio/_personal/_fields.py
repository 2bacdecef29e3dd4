"""What a personal event declares: its subject and the names of its personal fields.

Checked when a `NewEvent` is made, before any key or backend is involved.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from .._errors import InvalidArgument
from .._validation import MAX_STREAM_ID_LENGTH, check_identifier

#: The type of the event `PersonalDataStore.forget` appends.
SUBJECT_FORGOTTEN: Final = "SubjectForgotten"
#: The stream of a subject's ``SubjectForgotten`` event is this prefix and the subject.
FORGOTTEN_STREAM_PREFIX: Final = "$forgotten-"
#: The longest subject id: its ``SubjectForgotten`` stream must be a valid stream id.
MAX_SUBJECT_LENGTH: Final = MAX_STREAM_ID_LENGTH - len(FORGOTTEN_STREAM_PREFIX)
#: The most personal fields one event may declare.
MAX_PERSONAL_FIELDS: Final = 64
#: The longest personal field name, in characters.
MAX_FIELD_NAME_LENGTH: Final = 255


def check_subject(value: object) -> str:
    """*value* as a subject id: 1 to `MAX_SUBJECT_LENGTH` characters, no control characters,
    no leading or trailing whitespace.

    Raises:
        InvalidArgument: it is not such a string.
    """
    return check_identifier("subject", value, max_length=MAX_SUBJECT_LENGTH)


def check_personal_names(value: object, *, owner: str = "personal") -> tuple[str, ...]:
    """*value* as personal field names: distinct strings, at most `MAX_PERSONAL_FIELDS`,
    sorted.

    Raises:
        InvalidArgument: not a collection of strings (a lone string is refused too), a bad
            or repeated name, or too many.
    """
    if value == ():
        return ()
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidArgument(
            f"{owner} must be a list of field names, got {type(value).__name__}: {value!r:.80}"
            + (f" (write {owner}=[{value!r}])" if isinstance(value, str) else "")
        )
    names = tuple(value)
    if len(names) > MAX_PERSONAL_FIELDS:
        raise InvalidArgument(
            f"{owner}: {len(names)} fields; at most {MAX_PERSONAL_FIELDS} per event (keep "
            "personal data together in a few fields, an object if need be)"
        )
    seen: set[str] = set()
    for name in names:
        check_identifier("personal field name", name, max_length=MAX_FIELD_NAME_LENGTH)
        if name in seen:
            raise InvalidArgument(f"{owner} names the field {name!r} twice")
        seen.add(name)
    return tuple(sorted(names))


def check_personal_event(
    subject: str | None, personal: tuple[str, ...], data: Mapping[str, Any]
) -> None:
    """Check that *personal* fields are all in *data* and that there is a *subject*.

    Raises:
        InvalidArgument: a personal field is not a key of *data*, or there is no subject.
    """
    if subject is None:
        raise InvalidArgument(
            f"personal fields {list(personal)!r} need a subject, whose key encrypts them: "
            "NewEvent(..., subject='customer-42', personal=[...])"
        )
    for name in personal:
        if name not in data:
            raise InvalidArgument(
                f"personal field {name!r} is not in the event's data (its keys: "
                f"{sorted(map(str, data))[:10]!r}); personal names top-level keys of data"
            )


def forgotten_stream(subject: str) -> str:
    """The stream of *subject*'s ``SubjectForgotten`` event."""
    return FORGOTTEN_STREAM_PREFIX + subject
