"""An AG2 without the classic ``autogen`` package (ag2 1.x ships only its new ``ag2`` package): instrument()
warns once, never crashes, and the workflow API still records. No AG2 import here, so this module also runs
in an ag2 1.x environment, where it tests the real thing."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap

import pytest

# An AG2 whose `autogen` package cannot be imported (ag2 1.x ships only the new `ag2` package): the
# application runs, its workflow spans are recorded, and one warning says AG2 is not instrumented.
NO_AUTOGEN = textwrap.dedent("""
    import logging, sys
    sys.modules["autogen"] = None  # `import autogen` fails as under ag2 1.x (already does there)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout)
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    import cmbagent_otel
    names = []
    for label in ("first", "second"):
        memory = InMemorySpanExporter()
        cmbagent_otel.instrument(span_exporters=[memory], exporters=[])
        with cmbagent_otel.workflow(label):
            pass
        cmbagent_otel.uninstrument()
        names += [span.name for span in memory.get_finished_spans()]
    print("SPANS", sorted(names))
""")


def _has_ag2_distribution() -> bool:
    try:
        importlib.metadata.version("ag2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _has_ag2_distribution(),
                    reason="no ag2 distribution installed (cmbagent_autogen's environment): the warning is about an "
                           "installed ag2 without autogen")
def test_no_classic_autogen_is_one_warning_and_no_crash() -> None:
    result = subprocess.run([sys.executable, "-c", NO_AUTOGEN], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, result.stdout
    assert "no importable classic `autogen` package" in warnings[0]
    assert "AG2 is not instrumented" in warnings[0]
    assert "SPANS ['workflow first', 'workflow second']" in result.stdout
