"""Partitions of the streams, and units: what one lock guards and one checkpoint row tracks.

A partitioned projection splits the streams into *count* disjoint parts by a stable hash of
the stream id, so that several processes can apply one projection at once, each stream's
events still in order. The hash is the first four bytes of SHA-256 over the stream id's
UTF-8 bytes, read as an unsigned big-endian integer. It depends on nothing but the stream id:
not on Python's salted ``hash()``, the platform, the Python or PostgreSQL version. The SQL
function ``<schema>.stream_hash(text)`` computes the same value, and ``events.stream_hash``
stores it, so a partition's read is one WHERE clause. Pinned by ``tests/test_partitions.py``:
never change it, or stored checkpoints would belong to other streams.

Splitting partition *p* of *K* into *m·K* partitions gives children *p*, *p + K*, …: every
child's streams were all in *p*, so a child may continue from *p*'s checkpoint.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final, final

import attrs

from ._errors import InvalidArgument, PartitionsChanged

#: The most partitions a projection may have.
MAX_PARTITIONS: Final = 1024

# "name[index/count]": the suffix that names a unit of a partitioned projection. Projector
# names may not end like this, so a unit name never collides with a projector's name.
_UNIT_SUFFIX: Final = re.compile(r"\[(0|[1-9][0-9]{0,3})/([1-9][0-9]{0,3})\]\Z")


def stream_hash(stream_id: str) -> int:
    """The stream's partitioning hash: an int in ``[0, 2**32)``, the same everywhere, forever.

    .. versionadded:: 0.2
    """
    return int.from_bytes(hashlib.sha256(stream_id.encode("utf-8")).digest()[:4], "big")


def check_partitions(value: object, *, owner: str = "partitions") -> int:
    """Validate a partition count: an int from 1 to `MAX_PARTITIONS`."""
    if type(value) is not int:
        raise InvalidArgument(f"{owner} must be an int, got {type(value).__name__}: {value!r}")
    if not 1 <= value <= MAX_PARTITIONS:
        raise InvalidArgument(f"{owner} must be between 1 and {MAX_PARTITIONS}, got {value}")
    return value


def _check_index(instance: Partition, _: object, value: int) -> None:
    if type(value) is not int:
        raise InvalidArgument(
            f"a partition index must be an int, got {type(value).__name__}: {value!r}"
        )


def _check_count(instance: Partition, _: object, value: int) -> None:
    check_partitions(value, owner="a partition count")
    if not 0 <= instance.index < instance.count:
        raise InvalidArgument(
            f"a partition index must be from 0 to count - 1 = {instance.count - 1}, "
            f"got {instance.index}"
        )


@final
@attrs.frozen
class Partition:
    """Partition *index* of *count*: the streams whose `stream_hash` modulo *count* is *index*.

    Use it in an `EventFilter` to read one partition's events; a partitioned projector's unit
    reads exactly these.

    Raises:
        InvalidArgument: *count* is not from 1 to `MAX_PARTITIONS`, or *index* is not from 0
            to *count* - 1.

    .. versionadded:: 0.2
    """

    index: int = attrs.field(validator=_check_index)
    count: int = attrs.field(validator=_check_count)

    def contains(self, stream_id: str) -> bool:
        """Whether stream *stream_id* belongs to this partition."""
        return stream_hash(stream_id) % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def partition_of(stream_id: str, count: int) -> Partition:
    """The partition of *count* that stream *stream_id* belongs to.

    .. versionadded:: 0.2
    """
    return Partition(stream_hash(stream_id) % count, count)


def has_unit_suffix(name: str) -> bool:
    """Whether *name* ends like a unit of a partitioned projection (``[index/count]``)."""
    return _UNIT_SUFFIX.search(name) is not None


@final
@attrs.frozen
class Unit:
    """What one lock guards and one checkpoint row tracks: a projection or one partition of it.

    Its `name` keys the lock and the checkpoint: the projection's name when unpartitioned,
    else ``"<projection>[<index>/<count>]"``.
    """

    projection: str
    partition: Partition | None = None

    @property
    def partitions(self) -> int:
        """How many units the projection has (1 when unpartitioned)."""
        return 1 if self.partition is None else self.partition.count

    @property
    def name(self) -> str:
        """The lock and checkpoint name."""
        if self.partition is None:
            return self.projection
        return f"{self.projection}[{self.partition}]"

    @classmethod
    def parse(cls, name: str) -> Unit:
        """The unit a lock or checkpoint name stands for (a plain name is unpartitioned)."""
        match = _UNIT_SUFFIX.search(name)
        if match is None or int(match[1]) >= int(match[2]):
            return cls(name)
        return cls(name[: match.start()], Partition(int(match[1]), int(match[2])))


def units_of(projection: str, partitions: int) -> list[Unit]:
    """Every unit of *projection* run as *partitions* partitions (one when 1)."""
    if partitions == 1:
        return [Unit(projection)]
    return [Unit(projection, Partition(i, partitions)) for i in range(partitions)]


def split_parent(child: Unit, old_partitions: int) -> Unit:
    """The unit of the projection at *old_partitions* whose streams include all of *child*'s.

    *child*'s partition count must be a multiple of *old_partitions*.
    """
    if child.partition is None or old_partitions == 1:
        return Unit(child.projection)
    return Unit(child.projection, Partition(child.partition.index % old_partitions, old_partitions))


def plan_repartition(name: str, current: int | None, requested: int, *, applied: bool) -> str:
    """How a projection's partition count changes from *current* to *requested*.

    Returns ``"keep"`` (no change), ``"create"`` (nothing recorded yet), ``"split"`` (each new
    partition continues from its parent's checkpoint) or ``"replace"`` (nothing was applied
    under the old count, so the new units start from the beginning).

    Args:
        applied: whether any unit of the old count has a checkpoint or a dead letter.

    Raises:
        PartitionsChanged: any other change.
    """
    if current is None:
        return "create"
    if current == requested:
        return "keep"
    if requested % current == 0:
        return "split"
    if not applied:
        return "replace"
    raise PartitionsChanged(name, current, requested)
