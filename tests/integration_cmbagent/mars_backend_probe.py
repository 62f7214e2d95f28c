"""Calls cmbagent's own backend endpoints (MARS fork) on a database our exporter wrote; prints JSON.

Run in a subprocess by ``test_mars_backend.py``: ``python mars_backend_probe.py MARS_SRC DB_URL OUT``.
MARS_SRC is a source tree of the fork (``cmbagent/`` and ``backend/``, read at run time, never copied
into this repository). Its ``cmbagent`` package is loaded without running ``cmbagent/__init__.py``
(which imports the whole agent stack): only ``cmbagent.database``, ``cmbagent.branching`` and the
backend's routers are imported, as the backend imports them. Every endpoint function is called as
FastAPI would call it (its query parameters passed explicitly, since their defaults are FastAPI
``Query`` objects); ``init_database()`` runs first, as the backend runs it at start-up. Each answer,
or the exception an endpoint raised (``{"EXC": "..."}``), is written to OUT as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import types
from typing import Any


def main() -> None:
    mars, url, out_file = sys.argv[1:4]
    os.environ["CMBAGENT_DATABASE_URL"] = url
    package = types.ModuleType("cmbagent")
    package.__path__ = [os.path.join(mars, "cmbagent")]
    sys.modules["cmbagent"] = package
    sys.path.insert(0, os.path.join(mars, "backend"))

    from cmbagent.database.base import get_db_session, init_database
    from cmbagent.database.models import DAGNode, WorkflowRun

    init_database()
    from fastapi import BackgroundTasks
    from models.schemas import BranchRequest, PlayFromNodeRequest
    from routers import branching, nodes, runs, sessions

    db = get_db_session()
    try:
        run_rows = [(r.id, r.session_id) for r in db.query(WorkflowRun).order_by(WorkflowRun.started_at).all()]
        shorts = {run_id: [n.meta["id"] for n in db.query(DAGNode).filter(DAGNode.run_id == run_id)
                           .order_by(DAGNode.order_index).all()] for run_id, _ in run_rows}
    finally:
        db.close()

    out: dict[str, Any] = {"runs": [run_id for run_id, _ in run_rows]}

    def call(name: str, coroutine: Any) -> Any:
        try:
            answer = asyncio.run(coroutine)
        except Exception as exc:  # the endpoint's HTTPException (500) or anything else it raised
            answer = {"EXC": f"{type(exc).__name__}: {getattr(exc, 'detail', exc)}"}
        if hasattr(answer, "model_dump"):
            answer = answer.model_dump()
        out[name] = answer
        return answer

    for run_id, session_id in run_rows:
        call(f"{run_id} dag", runs.get_run_dag(run_id))
        call(f"{run_id} history", runs.get_run_history(run_id, None))
        call(f"{run_id} costs", runs.get_run_costs(run_id))
        call(f"{run_id} files", runs.get_run_files(run_id))
        for short in shorts[run_id]:
            call(f"{run_id} events {short}", nodes.get_node_events(short, run_id=run_id, event_type=None,
                                                                   include_internal=False))
            call(f"{run_id} summary {short}", nodes.get_node_execution_summary(short, run_id=run_id))
            call(f"{run_id} files {short}", nodes.get_node_files(short, run_id=run_id))
        call(f"{run_id} session", sessions.get_session(session_id))
        call(f"{run_id} session history", sessions.get_session_history(session_id, limit=100))
        call(f"{run_id} session runs", sessions.get_session_runs(session_id))
        call(f"{run_id} resumable", branching.get_resumable_nodes(run_id))
    call("sessions", sessions.list_sessions(status=None, mode=None, limit=50))

    if os.environ.get("MARS_PROBE_READERS"):  # the other readers of these tables, with their filters
        from cmbagent.database.models import ExecutionEvent

        db = get_db_session()
        try:
            events = [(e.id, e.run_id, e.event_type, e.parent_event_id) for e in db.query(ExecutionEvent).all()]
        finally:
            db.close()
        for run_id, _ in run_rows:
            for kind in sorted({k for _, r, k, _ in events if r == run_id}):
                call(f"{run_id} history {kind}", runs.get_run_history(run_id, kind))
            for short in shorts[run_id]:
                call(f"{run_id} internal events {short}", nodes.get_node_events(
                    short, run_id=run_id, event_type=None, include_internal=True))
        db = get_db_session()
        try:
            node_ids = sorted(n.id for n in db.query(DAGNode).all())
        finally:
            db.close()
        for node_id in node_ids:  # no run_id: the node found by its DB id (a short id needs the run)
            call(f"events {node_id}", nodes.get_node_events(node_id, run_id=None, event_type=None,
                                                             include_internal=False))
        for event_id, _run, _, parent in events:
            if parent is None:
                call(f"tree {event_id}", nodes.get_event_tree(event_id))

    if os.environ.get("MARS_PROBE_BRANCHES"):  # the branches already in the database (a redo's)
        from cmbagent.database.models import Branch

        db = get_db_session()
        try:
            rows = [(b.parent_run_id, b.child_run_id) for b in db.query(Branch).all()]
        finally:
            db.close()
        for parent, child in rows:
            call(f"{parent} branch tree", branching.get_branch_tree(parent))
            call(f"{child} branch context", branching.get_branch_context(child))
            call(f"{child} compare", branching.compare_branches(parent, child))

    branch_from = os.environ.get("MARS_PROBE_BRANCH_FROM")
    if branch_from and run_rows:
        run_id = run_rows[0][0]
        made = call("branch", branching.create_branch(run_id, BranchRequest(
            node_id=branch_from, branch_name="smaller step", hypothesis="a smaller step size",
            execute_immediately=True), BackgroundTasks()))
        child = made.get("branch_run_id") if isinstance(made, dict) else None
        call("branch tree", branching.get_branch_tree(run_id))
        if child:
            call("branch context", branching.get_branch_context(child))
            call("branch dag", runs.get_run_dag(child))
            call("compare", branching.compare_branches(run_id, child))
        call("play from node", branching.play_from_node(run_id, PlayFromNodeRequest(node_id=branch_from)))

    with open(out_file, "w", encoding="utf-8") as f:
        json.dump(out, f, default=str)


if __name__ == "__main__":
    main()
