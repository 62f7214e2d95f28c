"""What the application passes to the workflow API is its text: redacted and bounded like
every other string on a span.

Before, ``workflow``/``phase``/``step``/``redo`` put their names, mode, task, agent, model,
goal, summary and ``attributes`` on spans as given: a task quoting an API key reached the
span (and so the OTLP payload, the console and the DAG's attribute copies), an agent name
of 50 MB made a 50 MB attribute.
"""

from __future__ import annotations

from typing import Any

from cmbagent_otel import phase, redo, step, workflow
from cmbagent_otel.redaction import max_length

KEY = "sk-proj-ABCDEFGHIJKLMNOPQRSTUVWXYZ123456"


def every_text(spans: list[Any]) -> list[str]:
    out = []
    for span in spans:
        out.append(span.name)
        for value in (span.attributes or {}).values():
            out.extend(value if isinstance(value, (list, tuple)) else [value])
    return [str(v) for v in out]


def test_secrets_in_workflow_arguments_never_reach_a_span(provider: Any) -> None:
    with workflow("run " + KEY, mode="m " + KEY, task="use " + KEY, agent="a " + KEY, model="mo " + KEY,
                  attributes={"note": "n " + KEY, "api_key": "plainvalue123", "count": 3}), \
            phase("control " + KEY, agent="pa " + KEY), \
            step(1, "goal " + KEY, agent="sa " + KEY, attributes={"x": "x " + KEY}) as s:
        s.set_summary("done with " + KEY)
        with redo(1, 1, hypothesis="h " + KEY, agent="ra " + KEY):
            pass
    spans = list(provider.memory.get_finished_spans())
    texts = every_text(spans)
    assert not [t for t in texts if KEY in t or "plainvalue123" in t]
    assert any("[REDACTED]" in t for t in texts)
    attrs = {k: v for s in spans for k, v in (s.attributes or {}).items()}
    assert attrs["count"] == 3  # other values untouched


def test_huge_workflow_arguments_are_bounded(provider: Any) -> None:
    huge = "x" * (8 * 1024 * 1024)
    with workflow("w", mode="m", task=huge, agent=huge), phase("control", agent=huge), \
            step(1, huge, agent=huge) as s:
        s.set_summary(huge)
    for span in provider.memory.get_finished_spans():
        for key, value in (span.attributes or {}).items():
            assert len(str(value)) <= max_length(), (span.name, key)
