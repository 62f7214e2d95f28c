"""cmbagent-otel: OpenTelemetry for AG2 / cmbagent multi-agent runs.

Add ``cmbagent_otel.instrument()`` at the top of an AG2 program, or run it under
``opentelemetry-instrument``. Use :func:`workflow`, :func:`phase`, :func:`step` and
:func:`redo` to give a run its cmbagent structure.
"""

from __future__ import annotations

# environment_variables first: importing it checks the SDK's own variables before the SDK is imported
from . import environment_variables as environment_variables
from .bootstrap import instrument, is_instrumented, uninstrument
from .provider import ConfigurationError
from .version import __version__
from .workflow import RedoLimitExceeded, WorkflowNestingError, phase, redo, step, workflow

__all__ = [
    "ConfigurationError",
    "RedoLimitExceeded",
    "WorkflowNestingError",
    "__version__",
    "instrument",
    "is_instrumented",
    "phase",
    "redo",
    "step",
    "uninstrument",
    "workflow",
]
