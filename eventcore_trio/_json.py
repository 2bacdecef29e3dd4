"""Reading JSON text fast without losing digits.

orjson parses several times faster than the standard parser but reads an integer beyond
64 bits (unsigned up to 2**64 - 1, signed down to -2**63) as a float, losing digits, where
Python's integers and PostgreSQL's ``jsonb`` keep them all. Text that might hold one takes
the standard parser; `may_hold_long_integer` says which, cheaply enough to ask for every
event read.
"""

from __future__ import annotations

from typing import Final

#: Every ASCII digit as ``0``, every other byte as a space.
_DIGITS_ONLY: Final = bytes(48 if 48 <= byte <= 57 else 32 for byte in range(256))
#: The shortest run of digits that may be an integer orjson reads inexactly:
#: -9999999999999999999 is below -2**63.
_LONG_RUN: Final = b"0" * 19


def may_hold_long_integer(text: str) -> bool:
    """Whether *text* holds a run of 19 or more ASCII digits (a number beyond 64 bits may
    be there; runs inside strings count too, a false alarm that costs only speed)."""
    # A translation table and a substring search, both in C: several times faster than a
    # regular expression's scan, which tries a match at every character.
    return len(text) >= 19 and _LONG_RUN in text.encode("utf-8", "surrogatepass").translate(
        _DIGITS_ONLY
    )
