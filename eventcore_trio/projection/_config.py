"""`ProjectionConfig`: every knob of a projection run, each with a documented default."""

from __future__ import annotations

from typing import Any, final

import attrs

from .._errors import ConfigurationError


def _positive_int(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if type(value) is not int or value < 1:
        raise ConfigurationError(
            f"ProjectionConfig.{attribute.name} must be an int >= 1, got {value!r}"
        )


def _non_negative_int(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if type(value) is not int or value < 0:
        raise ConfigurationError(
            f"ProjectionConfig.{attribute.name} must be an int >= 0, got {value!r}"
        )


def _positive_seconds(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if type(value) not in (int, float) or not value > 0 or value != value or value == float("inf"):
        raise ConfigurationError(
            f"ProjectionConfig.{attribute.name} must be a finite number of seconds > 0, "
            f"got {value!r}"
        )


def _flag(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if type(value) is not bool:
        raise ConfigurationError(
            f"ProjectionConfig.{attribute.name} must be True or False, got {value!r}"
        )


@final
@attrs.frozen(kw_only=True)
class ProjectionConfig:
    """How `run_projection` and `run_projections` run a projector.

    Attributes:
        continuous: False (default): process every event visible when the run starts, across
            all pages, then return. True: keep following new events until cancelled.
        batch_size: events per page and per transaction (default 500). Larger batches mean
            fewer commits; each batch's transaction holds back what readers see while it runs.
        wait_for_leadership: False (default): raise `LeadershipUnavailable` if another
            instance leads. True: stand by and take over when it stops.
        poll_interval: seconds between reads when idle in continuous mode (default 1.0); with
            notifications this is only the fallback if a notification is lost.
        use_notifications: wake on the store's append notifications (default True).
        max_retries: retries of one failing event under `FailureStrategy.RETRY` before the
            failure becomes fatal (default 5).
        retry_initial_backoff: first retry delay in seconds (default 0.1), doubled per retry.
        retry_max_backoff: cap on the retry delay (default 10.0).
        max_read_failures: consecutive failed reads before the run fails (default 10).
        read_initial_backoff: first delay after a failed read (default 0.1), doubled each time.
        read_max_backoff: cap on that delay (default 5.0).
        restart_initial_backoff: the host's first delay before restarting a failed projector
            (default 1.0), doubled per consecutive failure.
        restart_max_backoff: cap on the restart delay (default 30.0).
        restart_reset_after: seconds a projector must lead without failing, or without
            losing its lock, before its restart delay starts again from
            ``restart_initial_backoff`` (default 60.0). A projector that fails at once every
            time backs off up to the cap instead of restarting every second.
        balance: `run_projections` only. True (default): hosts spread the units evenly among
            themselves, each leading about units / hosts, with one standby per unit (see
            docs/scale-out.md). False: every host stands by for every unit and the first
            to start leads them all (one waiting connection per unit per host).
        balance_interval: seconds between a balancing host's looks at the other hosts
            (default 1.0); joins, leaves and hand-offs also wake it at once.

    Raises:
        ConfigurationError: a value has the wrong type or range.

    .. versionadded:: 0.1
    """

    continuous: bool = attrs.field(default=False, validator=_flag)
    batch_size: int = attrs.field(default=500, validator=_positive_int)
    wait_for_leadership: bool = attrs.field(default=False, validator=_flag)
    poll_interval: float = attrs.field(default=1.0, validator=_positive_seconds)
    use_notifications: bool = attrs.field(default=True, validator=_flag)
    max_retries: int = attrs.field(default=5, validator=_non_negative_int)
    retry_initial_backoff: float = attrs.field(default=0.1, validator=_positive_seconds)
    retry_max_backoff: float = attrs.field(default=10.0, validator=_positive_seconds)
    max_read_failures: int = attrs.field(default=10, validator=_positive_int)
    read_initial_backoff: float = attrs.field(default=0.1, validator=_positive_seconds)
    read_max_backoff: float = attrs.field(default=5.0, validator=_positive_seconds)
    restart_initial_backoff: float = attrs.field(default=1.0, validator=_positive_seconds)
    restart_max_backoff: float = attrs.field(default=30.0, validator=_positive_seconds)
    restart_reset_after: float = attrs.field(default=60.0, validator=_positive_seconds)
    balance: bool = attrs.field(default=True, validator=_flag)
    balance_interval: float = attrs.field(default=1.0, validator=_positive_seconds)

    def retry_backoff(self, retries: int) -> float:
        """The delay before retry number *retries* + 1 of a failing event."""
        return min(self.retry_initial_backoff * 2.0**retries, self.retry_max_backoff)

    def read_backoff(self, failures: int) -> float:
        """The delay after *failures* consecutive failed reads (failures >= 1)."""
        return min(self.read_initial_backoff * 2.0 ** (failures - 1), self.read_max_backoff)

    def restart_backoff(self, failures: int) -> float:
        """The host's delay after *failures* consecutive failed runs (failures >= 1)."""
        return min(self.restart_initial_backoff * 2.0 ** (failures - 1), self.restart_max_backoff)
