"""ProjectionConfig: documented defaults and validated fields."""

from __future__ import annotations

import math

import pytest

from eventcore_trio import ConfigurationError
from eventcore_trio.projection import ProjectionConfig


class TestProjectionConfig:
    """ProjectionConfig values."""

    def test_defaults(self) -> None:
        """The defaults are the documented ones."""
        config = ProjectionConfig()
        assert (config.continuous, config.batch_size, config.wait_for_leadership) == (
            False,
            500,
            False,
        )
        assert (config.poll_interval, config.use_notifications, config.max_retries) == (
            1.0,
            True,
            5,
        )

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("batch_size", 0),
            ("batch_size", 1.5),
            ("batch_size", "500"),
            ("poll_interval", 0),
            ("poll_interval", -1),
            ("poll_interval", math.inf),
            ("poll_interval", math.nan),
            ("max_retries", -1),
            ("max_read_failures", 0),
            ("continuous", 1),
            ("retry_max_backoff", "10"),
        ],
    )
    def test_invalid_values_name_the_field(self, field: str, value: object) -> None:
        """A wrong type or range raises ConfigurationError naming the field."""
        with pytest.raises(ConfigurationError, match=field):
            ProjectionConfig(**{field: value})  # type: ignore[arg-type]

    def test_backoffs_are_capped(self) -> None:
        """Retry, read and restart delays double and stop at their caps."""
        config = ProjectionConfig(retry_initial_backoff=1, retry_max_backoff=3)
        assert [config.retry_backoff(n) for n in range(4)] == [1, 2, 3, 3]
        assert config.read_backoff(1) == config.read_initial_backoff
        assert config.restart_backoff(100) == config.restart_max_backoff
