"""Projection versions: a new version of a projection builds beside the serving one.

A version is a unit set of its own. Version 1 keeps the projection's plain name (so projections
from before versions keep their checkpoints); version *N* > 1 runs as the projection
``"<name>@v<N>"``, whose units, locks, checkpoints, partition count and dead letters are its
own. Projector names may not end like that suffix, so a versioned name never collides with a
projector's.

One version of each projection *serves*: readers use its read model. The first version to run
serves at once (there is nothing else to serve); a higher version takes over, in one atomic
step, once every one of its units has caught up; lower versions then stop (*superseded*). An
operator may switch by hand, back to a retained older version too: the versions above it are
then *withdrawn* (they stop, and never take over on their own).
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import re
from typing import Final, final

import attrs

from ._errors import InvalidArgument
from ._positions import Position

#: The highest version number a projection may have.
MAX_VERSION: Final = 1_000_000

# "name@v<N>": the suffix that names version N > 1 of a projection.
_VERSION_SUFFIX: Final = re.compile(r"@v([1-9][0-9]{0,6})\Z")


def check_version(value: object, *, owner: str = "version") -> int:
    """Validate a projection version: an int from 1 to `MAX_VERSION`."""
    if type(value) is not int:
        raise InvalidArgument(f"{owner} must be an int, got {type(value).__name__}: {value!r}")
    if not 1 <= value <= MAX_VERSION:
        raise InvalidArgument(
            f"{owner} must be between 1 and {MAX_VERSION} (versions count up from 1), got {value}"
        )
    return value


def has_version_suffix(name: str) -> bool:
    """Whether *name* ends like a versioned projection's name (``@v<N>``)."""
    return _VERSION_SUFFIX.search(name) is not None


def versioned_name(name: str, version: int) -> str:
    """The projection (unit set) that version *version* of projector *name* runs as."""
    return name if version == 1 else f"{name}@v{version}"


def split_versioned(projection: str) -> tuple[str, int]:
    """The projector name and version of a projection name (see `versioned_name`)."""
    match = _VERSION_SUFFIX.search(projection)
    if match is None or int(match[1]) < 2:
        return projection, 1
    return projection[: match.start()], int(match[1])


def read_model_schema_name(store_schema: str, name: str, version: int) -> str:
    """The PostgreSQL schema that holds version *version* of projection *name*'s read model.

    Derived from the store's schema, the projection's name and the version alone, so every
    host computes the same one; at most 63 bytes (PostgreSQL's identifier limit), made of
    lower-case letters, digits and underscores, with a hash of the full names so that two
    projections whose names look alike once shortened never share a schema.
    """

    def slug(text: str, limit: int) -> str:
        return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "p"

    digest = hashlib.sha256(f"{store_schema}\0{name}".encode()).hexdigest()[:8]
    return f"{slug(store_schema, 16)}_{slug(name, 24)}_{digest}_v{version}"


class VersionRole(enum.Enum):
    """What a projection version does now, as the store decides it.

    .. versionadded:: 0.4
    """

    #: Readers use this version's read model; it keeps applying events.
    SERVING = "serving"
    #: Higher than the serving version: it rebuilds, and takes over once caught up.
    BUILDING = "building"
    #: Lower than the serving version: it stops (its checkpoints and read model stay until
    #: it is retired).
    SUPERSEDED = "superseded"
    #: An operator switched back below it, or retired it: it stops and never takes over on
    #: its own (a switched-back version may be served by hand again; a retired one never
    #: runs again).
    WITHDRAWN = "withdrawn"

    @property
    def runs(self) -> bool:
        """Whether units of a version in this role apply events."""
        return self in (VersionRole.SERVING, VersionRole.BUILDING)


@final
@attrs.frozen(kw_only=True)
class VersionSwitch:
    """One change of a projection's serving version (the changelog of switches).

    Attributes:
        name: the projection (the projector's name, without a version).
        from_version: the version that served before, or None for the first.
        to_version: the version that serves since.
        position: how far the new version had applied (its greatest unit checkpoint) when
            it took over; None when it had applied nothing.
        switched_at: when (UTC).
        reason: ``"first"`` (the first version to run), ``"caught-up"`` (a higher version
            caught up) or ``"manual"`` (`serve_version`).

    .. versionadded:: 0.4
    """

    name: str
    from_version: int | None
    to_version: int
    position: Position | None
    switched_at: dt.datetime
    reason: str


def role_of(version: int, serving: int | None, withdrawn: frozenset[int]) -> VersionRole:
    """The role of *version* when *serving* serves and *withdrawn* are withdrawn (by a switch
    back, or retired: a retired version is withdrawn for good, below the serving one too)."""
    if serving is None or version == serving:
        return VersionRole.SERVING if serving is not None else VersionRole.BUILDING
    if version in withdrawn:
        return VersionRole.WITHDRAWN
    if version < serving:
        return VersionRole.SUPERSEDED
    return VersionRole.BUILDING
