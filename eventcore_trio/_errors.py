"""The exception tree: every error the library raises derives from `EventCoreError`.

Where a builtin exception fits, an error subclasses it too, so ``except ValueError`` keeps
working for callers that do not know this library. Each error carries the facts it reports as
attributes, and its message says what was wrong and what to do about it.
"""

from __future__ import annotations

import functools
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._positions import Position


class EventCoreError(Exception):
    """Base class of every error raised by eventcore-trio.

    .. versionadded:: 0.1
    """


class ConfigurationError(EventCoreError, ValueError):
    """A store, projector or option was configured with an invalid value.

    The message names the option, what was expected and what was received.

    .. versionadded:: 0.1
    """


class InvalidArgument(EventCoreError, ValueError):
    """An argument to a store call was invalid; nothing was read or written.

    Raised for empty, over-long or control-character stream ids and names, negative expected
    versions, malformed positions and unknown filter syntax.

    .. versionadded:: 0.1
    """


class EventEncodeError(InvalidArgument, TypeError):
    """Event data or metadata cannot be stored as JSON; nothing was written.

    Data and metadata must be JSON objects: mappings with string keys whose values are
    ``str``, ``int``, finite ``float``, ``bool``, ``None``, lists or mappings of the same, and
    strings must not contain NUL characters (PostgreSQL's ``jsonb`` rejects them).

    .. versionadded:: 0.1
    """


class AppendTooLarge(InvalidArgument):
    """One append's encoded events are larger than the store's limit; nothing was sent.

    The size counted is what the append sends: the UTF-8 bytes of each event's data and
    metadata as JSON and of its type name, and of each stream id. It is checked while the
    events are encoded, before any I/O, and counting stops at the event that passes the
    limit: *size* is then what the events up to that one take, a lower bound of the whole.
    Split the events over several appends (each is all or nothing on its own), move large
    content out of the events (object storage, with a reference in the event), or raise the
    limit: ``open_postgres_store(..., max_append_bytes=...)``.

    Attributes:
        size: the bytes counted when the limit was passed.
        limit: the store's limit, in bytes (``max_append_bytes``).

    .. versionadded:: 0.3
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"this append is over the store's limit of {limit:,} bytes (max_append_bytes): "
            f"its events take at least {size:,} bytes of data, metadata and type names as "
            "UTF-8 JSON, and nothing was sent. Split it into several appends (each all or "
            "nothing on its own), store large content elsewhere with a reference in the "
            "event, or raise the limit with open_postgres_store(..., max_append_bytes=...)"
        )
        self.size = size
        self.limit = limit

    def __reduce__(self) -> tuple[type[AppendTooLarge], tuple[int, int]]:
        return (type(self), (self.size, self.limit))


class EventDecodeError(EventCoreError, ValueError):
    """A stored event could not be decoded into a `RecordedEvent`.

    Attributes:
        position: where the undecodable event is stored, when known.

    .. versionadded:: 0.1
    """

    def __init__(self, message: str, *, position: Position | None = None) -> None:
        super().__init__(message)
        self.position = position


class VersionConflict(EventCoreError):
    """A stream's version differed from the expected version; the whole append was refused.

    Nothing of the append was written, on any stream. Re-read the stream, decide again and
    retry, or pass ``expected_version=None`` if the write does not depend on what was read.

    Attributes:
        stream_id: the stream whose version did not match.
        expected: the expected version given by the caller (0 = the stream must not exist).
        actual: the stream's version when the append was checked (0 = it does not exist).

    .. versionadded:: 0.1
    """

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(
            f"stream {stream_id!r} is at version {actual}, but the append expected version "
            f"{expected}; nothing was written. Re-read the stream and retry the decision."
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual

    def __reduce__(self) -> tuple[type[VersionConflict], tuple[str, int, int]]:
        return (type(self), (self.stream_id, self.expected, self.actual))


class AppendConditionFailed(EventCoreError):
    """A conditional append found events matching its query after the read it was decided on;
    nothing was written.

    Read the query again, decide again and retry (`execute` does, under its retry policy).

    Attributes:
        positions: where the conflicting events are (the first few, in order), as strings
            (`Position.parse` reads them back).

    .. versionadded:: 0.4
    """

    def __init__(self, positions: tuple[str, ...]) -> None:
        shown = ", ".join(positions[:5]) + (" …" if len(positions) > 5 else "")
        super().__init__(
            "events matching the append condition's query were written after the read it "
            f"was decided on (the first at {shown}); nothing was written. Read the query "
            "again and decide again."
        )
        self.positions = positions

    def __reduce__(self) -> tuple[type[AppendConditionFailed], tuple[tuple[str, ...]]]:
        return (type(self), (self.positions,))


class DuplicateEventId(EventCoreError):
    """An appended event reused an ``event_id`` that is already stored; nothing was written.

    Event ids are unique across the store, which makes retried appends idempotent: when this is
    raised for a retry of an append whose outcome was unknown, the first attempt was committed.

    Attributes:
        event_id: the duplicated id, as a string, when the backend reports it.

    .. versionadded:: 0.1
    """

    def __init__(self, message: str, *, event_id: str | None = None) -> None:
        super().__init__(message)
        self.event_id = event_id


class CheckpointConflict(EventCoreError):
    """A checkpoint save would have moved a checkpoint backwards; nothing was changed.

    Checkpoints only move forwards. This means another instance of the projector saved a later
    position meanwhile, or the caller is replaying from an old position: reload the checkpoint
    (or reset the projection explicitly) instead of overwriting it.

    Attributes:
        name: the checkpoint (subscription) name.
        attempted: the position the caller tried to save.
        current: the position stored now.

    .. versionadded:: 0.1
    """

    def __init__(self, name: str, attempted: Position, current: Position | None) -> None:
        super().__init__(
            f"checkpoint {name!r} is at {current}; saving {attempted} would move it backwards, "
            "so nothing was changed. Reload the checkpoint, or reset the projection to rebuild it."
        )
        self.name = name
        self.attempted = attempted
        self.current = current


class CheckpointAhead(EventCoreError, ValueError):
    """A checkpoint lies beyond every position the store can have produced.

    A projection that reads after such a checkpoint applies none of the stored events, nor
    any written until the store's positions pass it (for a made-up position, never), and
    reports no lag. A save of one (`CheckpointStore.save_checkpoint`, a projection batch's
    checkpoint) is refused and changes nothing: save the position of an event that was read
    or appended. One already stored (saved before this check, or written by hand) makes
    `CheckpointStore.load_checkpoint` raise this, so a projection refuses to run from it,
    and `projection_status` shows it (``checkpoint_ahead``): reset the projection to rebuild
    it from the beginning.

    Attributes:
        name: the checkpoint (a projection's unit) name.
        position: the position beyond the store.
        stored: True when the checkpoint was found stored, False when a save was refused.

    .. versionadded:: 0.3
    """

    def __init__(self, name: str, position: Position, *, stored: bool) -> None:
        if stored:
            from ._partitions import Unit  # here: _partitions imports this module

            projection = Unit.parse(name).projection
            message = (
                f"checkpoint {name!r} is at {position}, ahead of every position this store "
                "can have produced: a projection reading after it would skip every event. "
                f"Reset the projection (store.reset_projection({projection!r}) or "
                f"`eventcore-trio reset {projection}`) to rebuild it from the beginning"
            )
        else:
            message = (
                f"position {position} is ahead of every position this store can have "
                f"produced, so checkpoint {name!r} was not saved (a projection reading after "
                "it would skip every event); save the position of an event that was read or "
                "appended (RecordedEvent.position, AppendResult.position)"
            )
        super().__init__(message)
        self.name = name
        self.position = position
        self.stored = stored


class ClusterMismatch(EventCoreError):
    """A checkpoint was written against a different PostgreSQL cluster than the one connected.

    Positions are tied to the cluster's transaction ids, which a logical dump and restore
    resets. Continuing could skip events, so the store refuses; reset the projection to rebuild
    it from the beginning on this cluster.

    .. versionadded:: 0.1
    """


class LeadershipUnavailable(EventCoreError):
    """Another session already leads this name; `try_acquire` does not wait.

    Attributes:
        name: the projector (leadership) name.

    .. versionadded:: 0.1
    """

    def __init__(self, name: str) -> None:
        super().__init__(
            f"projector {name!r} is led by another session (another process, or another task "
            "in this one). Stop that instance, or run as a standby with "
            "ProjectionConfig(wait_for_leadership=True) to take over when it stops."
        )
        self.name = name

    def __reduce__(self) -> tuple[type[LeadershipUnavailable], tuple[str]]:
        return (type(self), (self.name,))


class ProjectionFailed(EventCoreError):
    """A projector stopped on an error its ``on_error`` treated as fatal (the default).

    The failing event's batch was rolled back: the checkpoint stays before the failing event,
    so the next run starts with it. The cause is chained (``__cause__``).

    Attributes:
        projector: the projector's name.
        position: the failing event's position, when an event failed.
        event: the failing event (a `RecordedEvent` or `UndecodableEvent`), if any.
        retries: how many retries preceded the failure.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        message: str,
        *,
        projector: str,
        position: Position | None = None,
        event: object = None,
        retries: int = 0,
    ) -> None:
        super().__init__(message)
        self.projector = projector
        self.position = position
        self.event = event
        self.retries = retries


class RetriesExhausted(EventCoreError):
    """A command kept meeting version conflicts and ran out of attempts; nothing was written.

    Attributes:
        attempts: how many times the command was read, decided and appended.

    The last `VersionConflict` is chained as the cause. Retry later, raise
    ``RetryPolicy.max_attempts``, or reduce contention on the streams involved.

    .. versionadded:: 0.1
    """

    def __init__(self, message: str, *, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class ProjectionLagging(EventCoreError, TimeoutError):
    """Projections had not applied a position when `wait_for_projections` timed out.

    Attributes:
        lagging: the units that had not applied it (projection names, or ``"name[i/K]"``
            for partitions of a partitioned projection).
        position: the position waited for.

    Is a host running them (``eventcore-trio status``)? Are they failing, or held back by
    an open transaction? A longer timeout helps only when they are merely busy.

    .. versionadded:: 0.3
    """

    def __init__(self, message: str, *, lagging: tuple[str, ...], position: Position) -> None:
        super().__init__(message)
        self.lagging = lagging
        self.position = position


class ProjectionRunning(LeadershipUnavailable):
    """An operation needs a projection to be stopped, but an instance is running it.

    Raised by ``reset_projection`` when another session leads the projection: stop its
    hosts first, or pass ``wait=True`` to wait until it stops. Raised by
    ``replay_dead_letters`` when another session leads any unit (partition) of the
    projection: stop its hosts first (a replay does not wait).

    Attributes:
        name: the projection.
        can_wait: whether the operation offers ``wait=True`` (the message says so).

    .. versionadded:: 0.1
    .. versionchanged:: 0.3
       *can_wait*, and raised by ``replay_dead_letters``.
    """

    def __init__(self, name: str, *, can_wait: bool = True) -> None:
        advice = ", or pass wait=True to wait until it stops" if can_wait else ""
        EventCoreError.__init__(
            self, f"projection {name!r} is running in another session; stop its hosts first{advice}"
        )
        self.name = name
        self.can_wait = can_wait

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (functools.partial(type(self), can_wait=self.can_wait), (self.name,))


class PartitionsChanged(ConfigurationError):
    """A projector was started with a partition count its projection cannot change to.

    A projection may be split: from *K* partitions to any multiple of *K* (each new partition
    continues from its parent's checkpoint). Any other change would re-partition streams
    whose events were already applied elsewhere, so it is refused. The way forward is a
    rebuild: stop the projection's hosts, clear its read model, reset it
    (``eventcore-trio reset NAME``), then start it with the new count.

    Attributes:
        name: the projection.
        current: its partition count in the store.
        requested: the count the projector was started with.

    .. versionadded:: 0.2
    """

    def __init__(self, name: str, current: int, requested: int) -> None:
        super().__init__(
            f"projection {name!r} runs as {current} partition(s); {requested} is not a multiple "
            f"of {current}, so its applied events cannot be divided without a rebuild. Keep "
            f"partitions={current}, split to a multiple of {current}, or rebuild: stop its "
            f"hosts, clear its read model, run `eventcore-trio reset {name}` (or "
            f"store.reset_projection), then start it with partitions={requested}"
        )
        self.name = name
        self.current = current
        self.requested = requested


class PartitionsMismatch(ConfigurationError):
    """A projector's partition count differs from the one its projection runs with.

    Raised by ``replay_dead_letters``: a dead letter belongs to the unit (partition) that
    skipped it, and is replayed under that unit's lock, with that unit's ``ctx.partition``.
    A projector object with another count (code from before a split, or a script that
    leaves out ``partitions=``) is not the code the hosts run, so nothing is replayed.
    Pass the projector as the hosts run it, with ``partitions=`` set to *recorded*.

    Attributes:
        name: the projection.
        recorded: the partition count the store records for it (what its hosts run).
        given: the partition count of the projector that was passed.

    .. versionadded:: 0.3
    """

    def __init__(self, name: str, recorded: int, given: int) -> None:
        super().__init__(
            f"projection {name!r} runs as {recorded} partition(s), but the projector given has "
            f"partitions={given}: it is not the code its hosts run (code from before a "
            f"split, or partitions= left out?), so nothing was replayed. Pass the projector "
            f"as the hosts run it, with partitions={recorded}"
        )
        self.name = name
        self.recorded = recorded
        self.given = given

    def __reduce__(self) -> tuple[type[PartitionsMismatch], tuple[str, int, int]]:
        return (type(self), (self.name, self.recorded, self.given))


class DeadLetterNotFound(EventCoreError, LookupError):
    """A batch resolved a dead letter that its unit does not have; the batch cannot commit.

    Resolving a dead letter deletes it in the batch's transaction, together with what
    replaying it wrote. When the delete finds nothing (another replay or a reset removed
    it, a split moved it to another partition, or it was never this unit's), nothing of
    the batch commits, so a replay never reports as replayed a letter it did not remove.
    List the dead letters again (``eventcore-trio dead-letters list NAME``) and replay
    what is left; letters replayed before this one stay replayed.

    Attributes:
        dead_letter_id: the dead letter's id.
        unit: the unit (lock name) whose batch tried to resolve it.

    .. versionadded:: 0.3
    """

    def __init__(self, dead_letter_id: uuid.UUID, unit: str) -> None:
        super().__init__(
            f"dead letter {dead_letter_id} is not recorded for unit {unit!r} (replayed or "
            "reset meanwhile, moved to another partition by a split, or never this unit's), "
            "so resolving it deleted nothing and its batch was rolled back. List the dead "
            "letters again and replay what is left"
        )
        self.dead_letter_id = dead_letter_id
        self.unit = unit

    def __reduce__(self) -> tuple[type[DeadLetterNotFound], tuple[uuid.UUID, str]]:
        return (type(self), (self.dead_letter_id, self.unit))


class ProjectionNotFound(EventCoreError, LookupError):
    """No projection of that name has ever run against this store.

    .. versionadded:: 0.1
    """


class DatabaseNotAvailable(ConfigurationError):
    """``ctx.db`` was used with a store that has no database (the in-memory store).

    Use `open_postgres_store` for projections that write through ``ctx.db``, or keep the
    read model in the projector itself when running on the memory store.

    .. versionadded:: 0.1
    """


class LeadershipLost(EventCoreError):
    """The session that held a leadership lock ended; this instance must stop committing.

    Raised when work is attempted under a leadership whose lock connection died or was
    terminated. Another instance may already lead. Acquire leadership again to continue.

    .. versionadded:: 0.1
    """


class UnsupportedPooling(ConfigurationError):
    """A connection pooler between this process and PostgreSQL breaks a session the store needs.

    Leadership is a *session* advisory lock, so a lock connection must own one server session
    for its whole life. Behind a transaction-pooling proxy (PgBouncer ``pool_mode =
    transaction``) consecutive statements run on whichever server session is free, so a lock
    would belong to a session shared with other clients. The store detects that and refuses
    (or gives up) leadership with this error rather than risk two leaders. Connect lock
    sessions directly or through session pooling with ``open_postgres_store(session_dsn=...)``;
    behind transaction pooling the pool also needs ``statement_cache_size=0``.

    .. versionadded:: 0.2
    """


class BatchInterrupted(EventCoreError):
    """A statement of a projection batch was interrupted, so its transaction's state is unknown.

    Raised by ``ctx.db`` after one of its statements was cancelled mid-flight (typically by a
    ``trio.move_on_after`` around a single call): the server may or may not have run it. The
    batch is rolled back, never committed, and the failure goes to the projector's
    ``on_error`` like any handler error. Bound whole handlers or batches instead of single
    statements, or let PostgreSQL bound statements (``SET LOCAL statement_timeout``).

    .. versionadded:: 0.2
    """


class StoreClosed(EventCoreError, RuntimeError):
    """The store was used after its ``async with`` block ended.

    .. versionadded:: 0.1
    """


class StoreConnectionError(EventCoreError, ConnectionError):
    """The database could not be reached, or the connection broke during a call.

    The outcome of a write interrupted this way is unknown: retry it with the same event ids,
    and a `DuplicateEventId` tells you the first attempt was committed.

    .. versionadded:: 0.1
    """


class AuthenticationFailed(StoreConnectionError):
    """The database refused the credentials in the DSN.

    .. versionadded:: 0.1
    """


class DatabaseNotFound(StoreConnectionError):
    """The database named in the DSN does not exist on the server.

    .. versionadded:: 0.1
    """


class UnsupportedServer(EventCoreError):
    """The PostgreSQL server is older than the minimum version this library supports.

    .. versionadded:: 0.1
    """


class SchemaVersionError(EventCoreError):
    """The database schema is missing or was written by a newer version of this library.

    .. versionadded:: 0.1
    """


class DatabaseError(EventCoreError):
    """The database refused a statement for a reason this library does not translate further.

    Attributes:
        sqlstate: the PostgreSQL error code, e.g. ``"42P01"``, when there is one.

    .. versionadded:: 0.1
    """

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class SubjectNotFound(EventCoreError, LookupError):
    """`forget` was asked to forget a subject this store holds no personal data of.

    No event was ever appended with personal fields for it (a typo in the id, or a subject
    whose events carry no personal fields); nothing was changed and no ``SubjectForgotten``
    event was written. A subject that was forgotten already is not an error: forgetting it
    again returns the first forget's record.

    Attributes:
        subject: the subject asked for.

    .. versionadded:: 0.4
    """

    def __init__(self, subject: str) -> None:
        super().__init__(
            f"this store holds no personal data of subject {subject!r} (no event with personal "
            "fields was appended for it), so there is nothing to forget and nothing was "
            "changed. Check the subject's id: it is the subject= the events were appended with"
        )
        self.subject = subject

    def __reduce__(self) -> tuple[type[SubjectNotFound], tuple[str]]:
        return (type(self), (self.subject,))


class SubjectForgottenError(EventCoreError):
    """An append carried personal fields of a subject that was forgotten; nothing was written.

    A forget deletes the subject's key for good: personal data appended for the subject
    afterwards would be readable again, so the store refuses it (and with it the whole
    append). Typically a command decided on state folded before the forget; decide again
    without the personal data, or give the person a new subject id if they come back.

    Attributes:
        subject: the forgotten subject.

    .. versionadded:: 0.4
    """

    def __init__(self, subject: str) -> None:
        super().__init__(
            f"subject {subject!r} was forgotten, so its personal data can no longer be "
            "appended; nothing was written. Append the event without personal fields, or "
            "use a new subject id for a person who comes back (see forget_records)"
        )
        self.subject = subject

    def __reduce__(self) -> tuple[type[SubjectForgottenError], tuple[str]]:
        return (type(self), (self.subject,))
