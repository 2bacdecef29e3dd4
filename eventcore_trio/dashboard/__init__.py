"""The live dashboard: ``eventcore-trio dashboard``, ``/status.json`` and ``/metrics``.

Needs the ``dashboard`` extra (hypercorn with its Trio worker, Starlette, prometheus-client).
"""

try:
    import hypercorn  # noqa: F401
    import prometheus_client  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "the dashboard needs the dashboard extra: pip install 'eventcore-trio[dashboard]'"
    ) from exc

from .._util import fixup_module_metadata
from ._app import dashboard_app as dashboard_app
from ._prometheus import prometheus_metrics as prometheus_metrics
from ._prometheus import prometheus_text as prometheus_text
from ._serve import run_dashboard as run_dashboard
from ._serve import serve_dashboard as serve_dashboard
from ._state import DashboardState as DashboardState
from ._state import poll_status as poll_status

__all__ = [
    "DashboardState",
    "dashboard_app",
    "poll_status",
    "prometheus_metrics",
    "prometheus_text",
    "run_dashboard",
    "serve_dashboard",
]

fixup_module_metadata(__name__, globals())
