"""cmbagent-otel: OpenTelemetry for AG2 / cmbagent multi-agent runs."""

from __future__ import annotations

from .version import __version__
from .workflow import RedoLimitExceeded, WorkflowNestingError, phase, redo, step, workflow

__all__ = [
    "RedoLimitExceeded",
    "WorkflowNestingError",
    "__version__",
    "phase",
    "redo",
    "step",
    "workflow",
]
