"""``OTEL_PYTHON_CONTEXT`` naming an installed context that fails to load (fourteenth fault campaign).

The thirteenth campaign checked a name with no ``opentelemetry_context`` entry point. A name whose
entry point is installed but whose module raises when it is imported, or whose class raises when
it is built, still made the OpenTelemetry API log ``Failed to load context`` with the whole
traceback when ``opentelemetry.context`` was first imported (it then used contextvars). Importing
cmbagent-otel now loads the context as the API does, with the API's failure record caught: one
warning line naming the variable, the variable removed, contextvars used, the app runs. A real
distribution (a ``.dist-info`` with its entry points on ``PYTHONPATH``) provides the contexts.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from .test_platform_waits import run_app

MODULE = textwrap.dedent('''
    from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

    class RaisesWhenBuilt(ContextVarsRuntimeContext):
        def __init__(self):
            raise RuntimeError("this context cannot be built")

    class Works(ContextVarsRuntimeContext):
        pass
''')
ENTRY_POINTS = textwrap.dedent('''
    [opentelemetry_context]
    broken_import = x15_missing_context_module:Context
    broken_init = x15_contexts:RaisesWhenBuilt
    raises_at_import = x15_raising_module:Context
    works = x15_contexts:Works
''')


def _installed(tmp_path: Path) -> str:
    site = tmp_path / "site"
    info = site / "x15_contexts-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: x15-contexts\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    (site / "x15_contexts.py").write_text(MODULE)
    (site / "x15_raising_module.py").write_text("raise ValueError('this module fails at import')\n")
    return os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])


def _lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "OTEL_PYTHON_CONTEXT=" in line]


@pytest.mark.parametrize("name", ["broken_import", "broken_init", "raises_at_import"])
def test_a_context_that_fails_to_load_is_one_line_and_contextvars_is_used(tmp_path: Path, name: str) -> None:
    proc = run_app(tmp_path, OTEL_PYTHON_CONTEXT=name, PYTHONPATH=_installed(tmp_path))
    assert "APP DONE ContextVarsRuntimeContext" in proc.stdout, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Failed to load context" not in proc.stderr, proc.stderr[-2000:]
    warnings = _lines(proc)
    assert len(warnings) == 1 and "cannot be loaded" in warnings[0], proc.stderr[-2000:]


def test_an_installed_context_that_works_is_used(tmp_path: Path) -> None:
    proc = run_app(tmp_path, OTEL_PYTHON_CONTEXT="works", PYTHONPATH=_installed(tmp_path))
    assert "APP DONE Works" in proc.stdout, proc.stderr[-2000:]
    assert not _lines(proc) and "Traceback" not in proc.stderr, proc.stderr[-2000:]
