"""A run stopped from outside (Ctrl-C, a cancelled asyncio task) is ``cancelled``, not ``failed``.

cmbagent's ``WorkflowState`` (the contract's ``workflow_runs.status``) has ``cancelled``; before,
a run interrupted by Ctrl-C or by cancelling the task that ran it was stored ``failed``, like a run
whose code failed. Its run row is now ``cancelled``; its open nodes and events stay ``failed``
with the reason (``dag_nodes`` and ``execution_events`` have no ``cancelled`` in the contract),
as does its terminator. The spans keep ``error.type`` (``KeyboardInterrupt``, ``CancelledError``),
and the very exception object comes out of every block.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

from cmbagent_otel import phase, step, workflow


def _rows(path: str) -> tuple[list[tuple[Any, ...]], dict[str, tuple[str, Any]]]:
    con = sqlite3.connect(path)
    try:
        runs = con.execute("SELECT status, meta FROM workflow_runs").fetchall()
        nodes = con.execute("SELECT meta, status FROM dag_nodes").fetchall()
    finally:
        con.close()
    return ([(status, json.loads(meta).get("error")) for status, meta in runs],
            {json.loads(meta)["id"]: (status, json.loads(meta).get("error")) for meta, status in nodes})


def test_ctrl_c_in_a_step_stores_the_run_cancelled(tmp_path: Path) -> None:
    db = tmp_path / "dag.sqlite"
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, threading
        os.environ["CMBAGENT_OTEL_DATABASE_URL"] = "sqlite:///" + sys.argv[1]
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as an interactive program has it
        import cmbagent_otel
        from cmbagent_otel import workflow, phase, step
        cmbagent_otel.instrument(exporters="cmbagent_dag", instrument_cmbagent=False)
        try:
            with workflow("interrupted"), phase("control"):
                with step(1, "done"):
                    pass
                with step(2, "interrupted"):
                    os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered to this process
                    threading.Event().wait(60)  # interrupted here
                    print("NOT INTERRUPTED")
        except KeyboardInterrupt:
            print("INTERRUPTED")
        cmbagent_otel.uninstrument()
    """))
    env = {k: v for k, v in os.environ.items() if k != "CMBAGENT_OTEL_DATABASE_URL"}
    proc = subprocess.run([sys.executable, str(script), str(db)], capture_output=True, text=True, timeout=120,
                          env=env, check=False)
    assert proc.returncode == 0 and "INTERRUPTED" in proc.stdout.split(), proc.stdout + proc.stderr
    runs, nodes = _rows(str(db))
    assert [status for status, _ in runs] == ["cancelled"]
    assert runs[0][1] and "KeyboardInterrupt" in runs[0][1]
    assert nodes["step_1"] == ("completed", None)
    for short in ("control", "step_2", "terminator"):  # no node status `cancelled` in the contract
        status, error = nodes[short]
        assert status == "failed" and error and "KeyboardInterrupt" in error, (short, nodes[short])
    assert "running" not in {status for status, _ in nodes.values()}


def test_a_cancelled_task_stores_its_run_cancelled(provider: Any, sqlite_url: str) -> None:
    cancelled: list[BaseException] = []

    async def run(inside: asyncio.Event) -> None:
        with workflow("task"), phase("control"), step(1, "waits"):
            inside.set()
            await asyncio.Event().wait()

    async def main() -> None:
        inside = asyncio.Event()
        task = asyncio.ensure_future(run(inside))
        await inside.wait()
        task.cancel("shutting down")
        try:
            await task
        except asyncio.CancelledError as exc:
            cancelled.append(exc)

    asyncio.run(main())
    assert cancelled and cancelled[0].args == ("shutting down",)
    spans = {span.name: span for span in provider.memory.get_finished_spans()}
    for name in ("workflow task", "phase control", "step 1"):
        assert spans[name].status.status_code is StatusCode.ERROR
        assert spans[name].attributes["error.type"] == "CancelledError"
    provider.store(sqlite_url)
    runs, nodes = _rows(sqlite_url.removeprefix("sqlite:///"))
    assert [status for status, _ in runs] == ["cancelled"]
    assert {nodes[short][0] for short in ("control", "step_1", "terminator")} == {"failed"}


@pytest.mark.parametrize("exc", [SystemExit(3), SystemExit("message"), RuntimeError("app failure")],
                         ids=["exit-3", "exit-message", "error"])
def test_other_failures_stay_failed(provider: Any, sqlite_url: str, exc: BaseException) -> None:
    with pytest.raises(type(exc)) as raised, workflow("fails"), phase("control"), step(1, "raises"):
        raise exc
    assert raised.value is exc
    provider.store(sqlite_url)
    runs, _ = _rows(sqlite_url.removeprefix("sqlite:///"))
    assert [status for status, _ in runs] == ["failed"]
