"""Advisory-lock keys: stable, documented, namespaced.

A key is the first 8 bytes of ``BLAKE2b(b"eventcore-trio\\x00" + kind + b"\\x00" + schema +
b"\\x00" + name)``, read as a signed big-endian 64-bit integer, and is passed to the single-argument
(bigint) advisory-lock functions. It depends on nothing but its inputs: not on Python's
``hash()`` (salted per process), the platform or the library version, so every process on every
machine computes the same key. The kind (``projector``, ``host``, ``index``, ``writer`` or
``migration``) and the schema keep the store's own locks apart from each other and from a
second store in the same database.
"""

from __future__ import annotations

import hashlib
from typing import Literal


def lock_key(
    kind: Literal["projector", "migration", "host", "index", "writer", "read-model"],
    schema: str,
    name: str,
) -> int:
    """Return the advisory-lock key for *name* of *kind* in *schema*."""
    material = b"\x00".join(
        [b"eventcore-trio", kind.encode(), schema.encode(), name.encode("utf-8")]
    )
    digest = hashlib.blake2b(material, digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def projector_lock_key(schema: str, name: str) -> int:
    """The key that a projector's leader holds for as long as it leads."""
    return lock_key("projector", schema, name)


def migration_lock_key(schema: str) -> int:
    """The transaction-level key that serialises migrations of *schema*."""
    return lock_key("migration", schema, "")


def host_lock_key(schema: str, host_id: str) -> int:
    """The key a balancing host holds while it is registered (its liveness)."""
    return lock_key("host", schema, host_id)


def index_lock_key(schema: str) -> int:
    """The session key held while one partition index of *schema* is built."""
    return lock_key("index", schema, "")


def read_model_lock_key(schema: str, read_model: str) -> int:
    """The transaction-level key that a version's setup hook runs under: every unit of the
    version shares its read-model schema, and DDL such as ``CREATE TABLE IF NOT EXISTS``
    fails when two transactions run it at once."""
    return lock_key("read-model", schema, read_model)


def writer_lock_key(schema: str) -> int:
    """The transaction-level key every event-appending transaction holds in shared mode.

    Readers wait for the transactions that hold it (and for nothing else); see
    docs/postgres.md, "The read horizon".
    """
    return lock_key("writer", schema, "")


def stream_lock_space(schema: str) -> int:
    """The first key of the two-int transaction locks an append takes on its streams.

    Appends lock ``(stream_lock_space(schema), hashtext(stream_id))``: the two-int key space is
    apart from the bigint keys above, and the first int keeps two schemas' streams apart.
    """
    return int.from_bytes(
        hashlib.blake2b(b"eventcore-trio\x00streams\x00" + schema.encode(), digest_size=4).digest(),
        "big",
        signed=True,
    )


def tag_lock_space(schema: str) -> int:
    """The first key of the two-int transaction locks of tags and types (decision record 14).

    Every append takes ``(tag_lock_space(schema), hashtext(type || chr(31) || tag))`` in shared
    mode for each (type, tag) combination its events carry (an empty string standing for "any
    type" or "no tag"); a decision over a query takes its query's keys exclusively.
    """
    return int.from_bytes(
        hashlib.blake2b(b"eventcore-trio\x00tags\x00" + schema.encode(), digest_size=4).digest(),
        "big",
        signed=True,
    )
