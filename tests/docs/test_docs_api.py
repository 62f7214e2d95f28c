"""The public Python API as README.md and docs/ describe it (twenty-fourth campaign).

Found: ``instrument(capture_content="maybe")`` — an invalid argument, which docs/configuration.md
says raises — was logged as if ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` held it, and
instrumentation went on with content off; ``capture_content="span-and-event"``, a form the variable
accepts, was refused the same way. ``ConfigurationError`` and ``is_instrumented``, both in
``cmbagent_otel.__all__``, were named nowhere in the docs.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cmbagent_otel
from cmbagent_otel import semconv
from cmbagent_otel.testing import offline_agent

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = README + "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))


def _python_block(starting: str) -> str:
    return README.split(f"```python\n{starting}", 1)[1].split("```", 1)[0].join((starting, ""))


def test_docs_every_public_name_is_documented() -> None:
    missing = [name for name in cmbagent_otel.__all__ if name != "__version__" and f"`{name}" not in DOCS
               and f"cmbagent_otel.{name}" not in DOCS]
    assert not missing


def test_docs_instrument_options_are_its_parameters() -> None:
    sentence = README.split("Options: ", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"`([a-z_]+)=`", sentence))
    assert "or uses the `tracer_provider=` you pass" in README
    documented.add("tracer_provider")
    assert documented == set(inspect.signature(cmbagent_otel.instrument).parameters)


def test_docs_workflow_keywords_are_the_signatures() -> None:
    """README's "Other keywords" sentence names every keyword of the blocks."""
    sentence = README.split("Other keywords: ", 1)[1].split("Inside a", 1)[0]
    wf = re.search(r"`workflow\(([^)]*)\)`", sentence).group(1)  # type: ignore[union-attr]
    named = {k.strip().rstrip("=") for k in wf.split(",")} | {"name", "mode", "task", "max_redos"}
    assert named == set(inspect.signature(cmbagent_otel.workflow).parameters)
    for block in ("phase", "redo"):
        args = re.search(rf"`{block}\(([^)]*)\)`", sentence).group(1)  # type: ignore[union-attr]
        named = {k.strip().rstrip("=") for k in args.split(",")} | {"attributes"}
        assert named == set(inspect.signature(getattr(cmbagent_otel, block)).parameters), block


def test_docs_readme_workflow_example_runs_as_written(capture: Any) -> None:
    code = _python_block("from cmbagent_otel import workflow, phase, step, redo")
    exec(compile(code, "README.md", "exec"), {"task": "Measure the CMB acoustic peaks"})
    names = [span.name for span in capture.spans]
    assert names == ["workflow planning_and_control", "phase planning", "phase control", "step 1", "step 2",
                     "redo step 2 attempt 1"]
    steps = {span.name: span.attributes for span in capture.spans}
    assert steps["step 2"][semconv.STEP_SUMMARY] == "fitted"
    assert steps["step 1"][semconv.STEP_AGENT] == "engineer"
    assert steps["workflow planning_and_control"]["cmbagent.workflow.mode"] == "planning-control"


@pytest.fixture
def uninstrumented() -> Iterator[None]:
    cmbagent_otel.uninstrument()
    try:
        yield
    finally:
        cmbagent_otel.uninstrument()


@pytest.mark.parametrize("value", ["maybe", "spans", 3, 0.5])
def test_docs_an_invalid_capture_content_raises(value: Any, uninstrumented: None, capture: Any) -> None:
    """docs/configuration.md: "An invalid *argument* is a programming error and raises"; docs/spans.md's
    content table says which error."""
    assert "of `capture_content=`: `ConfigurationError`" in (ROOT / "docs" / "spans.md").read_text()
    with pytest.raises(cmbagent_otel.ConfigurationError, match="capture_content"):
        cmbagent_otel.instrument(tracer_provider=capture.provider, capture_content=value, instrument_cmbagent=False)
    assert not cmbagent_otel.is_instrumented()


@pytest.mark.parametrize("value", ["span-and-event", "Span_Only", "true", True])
def test_docs_capture_content_takes_the_variables_forms(value: Any, uninstrumented: None, capture: Any) -> None:
    """``capture_content=`` takes what the variable takes (docs/configuration.md's row): content lands on
    the spans for every form that puts it there."""
    cmbagent_otel.instrument(tracer_provider=capture.provider, capture_content=value, instrument_cmbagent=False)
    assert cmbagent_otel.is_instrumented()
    user = offline_agent("user", ["unused"], human_input_mode="NEVER", max_consecutive_auto_reply=0)
    assistant = offline_agent("assistant", ["the answer is 42"])
    user.initiate_chat(assistant, message="what is the answer?", max_turns=1)
    chats = capture.named("chat ")
    assert chats and "42" in chats[0].attributes[semconv.GEN_AI_OUTPUT_MESSAGES]


def test_docs_entry_points_load_and_are_the_documented_ones() -> None:
    """pyproject's entry points (what `opentelemetry-instrument` and `OTEL_TRACES_EXPORTER=cmbagent_dag`
    use, README's "our configurator and the AG2 and cmbagent instrumentors are registered entry
    points") each name an object that exists, of the documented kind."""
    import importlib

    import tomllib
    from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
    from opentelemetry.sdk.trace.export import SpanExporter

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = project["entry-points"]
    kinds = {"opentelemetry_instrumentor": BaseInstrumentor, "opentelemetry_traces_exporter": SpanExporter,
             "opentelemetry_configurator": object}
    assert set(groups) == set(kinds)
    for group, entries in groups.items():
        for target in entries.values():
            module, _, name = target.partition(":")
            assert issubclass(getattr(importlib.import_module(module), name), kinds[group]), target
    assert set(groups["opentelemetry_instrumentor"]) == {"cmbagent_ag2", "cmbagent"}
    assert "cmbagent_dag" in groups["opentelemetry_traces_exporter"] and "`cmbagent_dag`" in README
    assert project["scripts"] == {"cmbagent-otel": "cmbagent_otel.cli:main"}
    assert "opentelemetry-instrument python app.py" in README


def test_docs_an_unknown_exporter_argument_is_named_as_one(uninstrumented: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """README: an unknown exporter name raises `ConfigurationError`; given as the argument, the message
    named only `OTEL_TRACES_EXPORTER` (unset here)."""
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    with pytest.raises(cmbagent_otel.ConfigurationError, match=r"'zipkin-typo' in exporters= or OTEL_TRACES_EXPORTER"):
        cmbagent_otel.instrument(exporters="zipkin-typo", set_global=False, instrument_cmbagent=False)
    assert not cmbagent_otel.is_instrumented()
