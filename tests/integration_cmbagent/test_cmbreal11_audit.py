"""What a user of the real cmbagent package sees, eleventh audit (session 38).

A step of its own solve (``human_in_the_loop``'s chat step, a carryover step) whose solve raised carried none
of the outcome attributes a step that returned carries (``cmbagent.step.attempts``, ``.max_attempts``,
``.status``). Here the human's side goes away: ``human_in_the_loop`` answered as cmbagent's backend answers it
(a function set on the admin agent, MARS ``configure_admin_for_websocket``) whose first question finds the web
UI gone and raises. One run of each (plain and instrumented), shared by the module's tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

import cmbagent_otel
from cmbagent_otel import semconv as sc
from cmbagent_otel.testing import FakeOpenAIServer
from tests.conftest import SpanCapture

from .scripted_cmbagent import API_KEYS, TASK, script_for
from .test_cmbagent_runs import Run, _exported, _one
from .test_real_audit import _final_rows, _nodes_of, _one_root_per_trace

pytestmark = pytest.mark.cmbagent_autogen


class BrowserGone(ConnectionError):
    """What the web UI's answer function raises once its websocket is closed."""


def _admin_whose_browser_went_away(work: Path) -> Any:
    """human_in_the_loop whose admin is answered by a function set on the agent (as cmbagent's backend does),
    raising at the first question: the user closed the page while the engineer worked."""
    import cmbagent
    from cmbagent.cmbagent import CMBAgent

    original = CMBAgent.__init__

    def websocket_human_input_sync(prompt: str) -> str:
        raise BrowserGone("websocket closed by the client (code 1001)")

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.get_agent_from_name("admin").get_human_input = websocket_human_input_sync

    CMBAgent.__init__ = init  # type: ignore[method-assign]
    try:
        return cmbagent.human_in_the_loop(TASK, agent="engineer", work_dir=work, api_keys=API_KEYS)
    finally:
        CMBAgent.__init__ = original  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """The plain run and the instrumented one (spans kept in memory)."""
    base = tmp_path_factory.mktemp("cmbreal11")
    out: dict[str, Run] = {}
    capture = SpanCapture()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", API_KEYS["OPENAI"])
        mp.chdir(base)  # cmbagent's fork writes chats/ into the working directory
        for name in ("plain", "otel"):
            script = script_for("human_in_the_loop")
            work = base / name
            work.mkdir()
            if name == "otel":
                cmbagent_otel.instrument(tracer_provider=capture.provider, set_global=False)
            error = None
            try:
                with FakeOpenAIServer(request_responder=script) as server:
                    mp.setenv("OPENAI_BASE_URL", server.base_url)
                    _admin_whose_browser_went_away(work)
            except Exception as exc:  # cmbagent's own failure, compared with the plain run's
                error = exc
            finally:
                if name == "otel":
                    cmbagent_otel.uninstrument()
            assert script.unexpected == []
            out[name] = Run({}, list(script.sequence), [], work, capture.spans if name == "otel" else [], error)
    yield out
    capture.provider.shutdown()


def test_a_chat_step_whose_solve_raised_carries_its_outcome(runs: dict[str, Run], tmp_path: Path) -> None:
    """The step whose solve raised carries the attempts cmbagent counted, its limit and the status control
    last reported (here ``completed``: control completed the task, then the admin was asked), as a step that
    returned does; it stays red with the exception, and the run's rows are final and served. On 8bacdca the
    span had none of the three (``KeyError: 'cmbagent.step.attempts'``)."""
    plain, run = runs["plain"], runs["otel"]
    assert type(run.error) is type(plain.error) is BrowserGone and str(run.error) == str(plain.error)
    assert run.sequence == plain.sequence
    _one_root_per_trace(run)
    step1 = _one(run, "step 1")
    assert step1.status.status_code is StatusCode.ERROR
    attributes = dict(step1.attributes or {})
    assert (attributes[sc.STEP_ATTEMPTS], attributes[sc.STEP_MAX_ATTEMPTS], attributes[sc.STEP_STATUS]) == (
        0, 3, "completed")
    rows = _final_rows(_exported(run, tmp_path))
    (row,) = rows["runs"]
    assert row["status"] == "failed" and row["meta"]["error"] == f"BrowserGone: {plain.error}"
    nodes = _nodes_of(rows)
    assert {s: nodes[s]["status"] for s in ("init", "chat", "step_1", "step_1_admin", "terminator")} == {
        "init": "completed", "chat": "failed", "step_1": "failed", "step_1_admin": "failed", "terminator": "failed"}
    (human,) = [e for e in rows["events"] if e["event_subtype"] == "human_input"]
    assert human["status"] == "failed" and human["node_id"] == nodes["step_1_admin"]["id"]
    assert rows["states"][0]["status"] == "suspended"
