"""What cmbagent's backend reads, per /work/shared/cmbagent-db-contract.md §6 and §8.

Our own re-statement of the queries and arithmetic behind cmbagent's endpoints (MARS fork,
``backend/routers`` and ``cmbagent/database``), run against a database our exporter wrote.
The arithmetic is kept literally where it can fail on our rows: ``total_tokens +=
meta.get("tokens", 0)`` raises TypeError unless ``meta.tokens`` is a number, timing mixes
``timestamp`` values with ``min``/``max``/subtraction, cost breakdowns call
``float(cost_usd)`` and sum ``total_tokens``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select

from cmbagent_otel.dag.writer import T

DEFAULT_SESSION = "default_session"


def _rows(conn: Connection, query: Any) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(query).mappings()]


def resolve_node(conn: Connection, node_id: str, run_id: str) -> dict[str, Any] | None:
    """``DAGNode.resolve_node_id``: an exact primary-key match, else a scan of the run's ``meta.id``."""
    nodes = T["dag_nodes"]
    exact = _rows(conn, select(nodes).where(nodes.c.id == node_id, nodes.c.run_id == run_id))
    if exact:
        return exact[0]
    for node in _rows(conn, select(nodes).where(nodes.c.run_id == run_id)):
        if isinstance(node["meta"], dict) and node["meta"].get("id") == node_id:
            return node
    return None


def run_dag(conn: Connection, run_id: str) -> dict[str, Any]:
    """``GET /api/runs/{id}/dag``."""
    nodes_t, edges_t = T["dag_nodes"], T["dag_edges"]
    nodes = _rows(conn, select(nodes_t).where(nodes_t.c.run_id == run_id).order_by(nodes_t.c.order_index))
    edges = _rows(conn, select(edges_t).where(edges_t.c.from_node_id.in_([n["id"] for n in nodes]))) if nodes else []

    def short(node: dict[str, Any]) -> str:
        meta = node["meta"]
        return meta["id"] if isinstance(meta, dict) and "id" in meta else node["id"]

    original = {n["id"]: short(n) for n in nodes}
    return {
        "nodes": [{
            "id": short(n), "label": (n["meta"] or {}).get("label", n["agent"] or f"Step {n['order_index'] + 1}"),
            "type": n["node_type"], "status": n["status"], "agent": n["agent"], "stepNumber": n["order_index"] + 1,
            "description": (n["meta"] or {}).get("description"), "task": (n["meta"] or {}).get("task"),
            "summary": (n["meta"] or {}).get("summary"),
        } for n in nodes],
        "edges": [{
            "id": f"e{source}-{target}", "source": source, "target": target, "type": e["dependency_type"],
        } for e in edges
            for source, target in [(original.get(e["from_node_id"], e["from_node_id"]),
                                    original.get(e["to_node_id"], e["to_node_id"]))]],
    }


def node_events(conn: Connection, node_id: str, run_id: str, include_internal: bool = False) -> list[dict[str, Any]]:
    """``GET /api/nodes/{node}/events?run_id=``."""
    events_t = T["execution_events"]
    node = resolve_node(conn, node_id, run_id)
    db_id = node["id"] if node else node_id
    events = _rows(conn, select(events_t).where(events_t.c.node_id == db_id, events_t.c.run_id == run_id)
                   .order_by(events_t.c.execution_order))
    if not include_internal:
        events = [e for e in events if e["event_type"] not in ("node_started", "node_completed")
                  and e["event_subtype"] not in ("start",)]
    return [{
        "id": e["id"], "event_type": e["event_type"], "event_subtype": e["event_subtype"],
        "agent_name": e["agent_name"], "timestamp": e["timestamp"].isoformat() if e["timestamp"] else None,
        "duration_ms": e["duration_ms"], "execution_order": e["execution_order"], "depth": e["depth"],
        "inputs": e["inputs"], "outputs": e["outputs"], "error_message": e["error_message"], "status": e["status"],
        "meta": e["meta"], "parent_event_id": e["parent_event_id"],
    } for e in events]


def execution_summary(conn: Connection, node_id: str, run_id: str) -> dict[str, Any]:
    """``GET /api/nodes/{node}/execution-summary`` (DAGMetadataEnricher.enrich_node)."""
    events_t, files_t, messages_t = T["execution_events"], T["files"], T["messages"]
    node = resolve_node(conn, node_id, run_id)
    db_id = node["id"] if node else node_id
    events = _rows(conn, select(events_t).where(events_t.c.node_id == db_id, events_t.c.run_id == run_id))
    if not events:
        return {"total_events": 0}
    events = [e for e in events if e["event_subtype"] not in ("start",)
              and e["event_type"] not in ("node_started", "node_completed")]
    # the run statistics it also computes: every event of the run in the default session
    _rows(conn, select(events_t).where(events_t.c.run_id == run_id, events_t.c.session_id == DEFAULT_SESSION)
          .order_by(events_t.c.execution_order))
    files = _rows(conn, select(files_t).where(files_t.c.node_id == db_id))
    messages = _rows(conn, select(messages_t).where(messages_t.c.node_id == db_id))

    event_types: dict[str, int] = {}
    agent_calls: dict[str, int] = {}
    for e in events:
        event_types[e["event_type"]] = event_types.get(e["event_type"], 0) + 1
        if e["agent_name"] and e["event_type"] == "agent_call":
            agent_calls[e["agent_name"]] = agent_calls.get(e["agent_name"], 0) + 1

    stamps = [e["timestamp"] for e in events if e["timestamp"]]
    start, end = min(stamps), max(stamps)
    agent_seconds: dict[str, float] = {}
    for e in events:
        if e["agent_name"] and e["duration_ms"]:
            agent_seconds[e["agent_name"]] = agent_seconds.get(e["agent_name"], 0) + e["duration_ms"] / 1000

    total_tokens = 0
    total_cost = 0.0
    by_agent: dict[str, dict[str, Any]] = {}
    for e in events:
        meta = e["meta"] or {}
        tokens = meta.get("tokens", 0)
        cost = meta.get("cost_usd", 0.0)
        total_tokens += tokens
        total_cost += cost
        if e["agent_name"] and (tokens > 0 or cost > 0):
            entry = by_agent.setdefault(e["agent_name"], {"tokens": 0, "cost": 0.0})
            entry["tokens"] += tokens
            entry["cost"] += cost

    completed = sum(1 for e in events if e["status"] == "completed")
    return {
        "total_events": len(events), "event_types": event_types,
        "agents_involved": sorted({e["agent_name"] for e in events if e["agent_name"]}),
        "agent_call_counts": agent_calls, "files_generated": len(files), "messages_count": len(messages),
        "timing": {"started_at": start.isoformat(), "completed_at": end.isoformat(),
                   "duration_seconds": (end - start).total_seconds(), "agent_time_breakdown": agent_seconds},
        "cost_summary": {"total_tokens": total_tokens, "total_cost_usd": total_cost, "by_agent": by_agent},
        "success_metrics": {"completion_rate": completed / len(events),
                            "failed_count": sum(1 for e in events if e["status"] == "failed")},
    }


def node_files(conn: Connection, node_id: str, run_id: str) -> list[dict[str, Any]]:
    """``GET /api/nodes/{node}/files``."""
    files_t = T["files"]
    node = resolve_node(conn, node_id, run_id)
    db_id = node["id"] if node else node_id
    return [{"id": f["id"], "file_path": f["file_path"], "file_type": f["file_type"], "size_bytes": f["size_bytes"],
             "created_at": f["created_at"].isoformat(), "event_id": f["event_id"]}
            for f in _rows(conn, select(files_t).where(files_t.c.node_id == db_id, files_t.c.run_id == run_id))]


def run_files(conn: Connection, run_id: str) -> list[dict[str, Any]]:
    """``GET /api/runs/{id}/files``: files outer-joined to their node and step."""
    files_t, nodes_t, steps_t = T["files"], T["dag_nodes"], T["workflow_steps"]
    query = (select(files_t.c.id, files_t.c.file_path, nodes_t.c.agent, steps_t.c.step_number, steps_t.c.goal)
             .select_from(files_t.outerjoin(nodes_t, files_t.c.node_id == nodes_t.c.id)
                          .outerjoin(steps_t, files_t.c.step_id == steps_t.c.id))
             .where(files_t.c.run_id == run_id))
    return _rows(conn, query)


def run_history(conn: Connection, run_id: str) -> list[dict[str, Any]]:
    """``GET /api/runs/{id}/history``."""
    events_t = T["execution_events"]
    events = _rows(conn, select(events_t).where(events_t.c.run_id == run_id).order_by(events_t.c.execution_order))
    return [{"id": e["id"], "node_id": e["node_id"], "type": e["event_type"],
             "description": (e["meta"] or {}).get("description")} for e in events
            if e["event_subtype"] != "start" and e["event_type"] not in ("node_started", "node_completed")]


def resumable_nodes(conn: Connection, run_id: str) -> list[dict[str, Any]]:
    """``GET /api/runs/{id}/resumable-nodes`` (PlayFromNodeExecutor.get_resumable_nodes)."""
    nodes_t, checkpoints_t, steps_t = T["dag_nodes"], T["checkpoints"], T["workflow_steps"]
    out = []
    for node in _rows(conn, select(nodes_t).where(nodes_t.c.run_id == run_id).order_by(nodes_t.c.order_index)):
        checkpoints = _rows(conn, select(checkpoints_t).where(checkpoints_t.c.run_id == run_id)
                            .order_by(checkpoints_t.c.created_at.desc()))
        found = None
        for checkpoint in checkpoints:
            if checkpoint["step_id"]:
                step = _rows(conn, select(steps_t).where(steps_t.c.id == checkpoint["step_id"]))
                if step and step[0]["step_number"] < node["order_index"]:
                    found = checkpoint
                    break
        if found is None and checkpoints:
            found = checkpoints[-1]
        out.append({"node_id": (node["meta"] or {}).get("id", node["id"]), "order_index": node["order_index"],
                    "node_type": node["node_type"], "agent": node["agent"], "status": node["status"],
                    "has_checkpoint": found is not None,
                    "can_resume": found is not None or node["order_index"] == 0})
    return out


def sessions(conn: Connection) -> list[dict[str, Any]]:
    """``GET /api/sessions``: sessions INNER JOIN session_states, newest state per session."""
    sessions_t, states_t = T["sessions"], T["session_states"]
    query = (select(sessions_t.c.id, sessions_t.c.name, states_t.c.mode, states_t.c.status, states_t.c.current_phase,
                    states_t.c.updated_at)
             .join(states_t, sessions_t.c.id == states_t.c.session_id)
             .order_by(states_t.c.updated_at.desc(), sessions_t.c.created_at.desc()))
    seen: set[str] = set()
    out = []
    for row in _rows(conn, query):
        if row["id"] in seen:
            continue
        seen.add(row["id"])
        if not isinstance(row["status"], str):
            raise TypeError(f"session {row['id']}: status must be a string (pydantic), got {row['status']!r}")
        out.append(row)
    return out


def run_costs(conn: Connection, run_id: str) -> dict[str, Any]:
    """``GET /api/runs/{id}/costs``: totals and breakdowns by model, agent and step."""
    costs_t = T["cost_records"]
    total_cost, total_tokens, prompt, completion = 0.0, 0, 0, 0
    by_model: dict[str, dict[str, Any]] = {}
    by_agent: dict[str, dict[str, Any]] = {}
    by_step: dict[str, dict[str, Any]] = {}
    for r in _rows(conn, select(costs_t).where(costs_t.c.run_id == run_id).order_by(costs_t.c.timestamp)):
        total_cost += float(r["cost_usd"])
        total_tokens += r["total_tokens"]
        prompt += r["prompt_tokens"]
        completion += r["completion_tokens"]
        for table, key in ((by_model, r["model"]), (by_agent, r["agent_name"] or "unknown"),
                           (by_step, r["step_id"] or "unknown")):
            entry = table.setdefault(key, {"cost": 0.0, "tokens": 0, "call_count": 0})
            entry["cost"] += float(r["cost_usd"])
            entry["tokens"] += r["total_tokens"]
            entry["call_count"] += 1
    return {"total_cost": total_cost, "total_tokens": total_tokens, "prompt_tokens": prompt,
            "completion_tokens": completion, "by_model": by_model, "by_agent": by_agent, "by_step": by_step}


def branch_tree(conn: Connection, run_id: str, depth: int = 0) -> dict[str, Any]:
    """``GET /api/runs/{id}/branch-tree`` (BranchComparator): recursive over branches rows."""
    runs_t, branches_t = T["workflow_runs"], T["branches"]
    run = _rows(conn, select(runs_t).where(runs_t.c.id == run_id))
    if not run or depth > 20:
        return {}
    meta = run[0]["meta"] or {}
    tree = {"run_id": run_id, "name": meta.get("branch_name", "main"), "status": run[0]["status"], "depth": depth,
            "hypothesis": meta.get("hypothesis"), "is_branch": run[0]["is_branch"],
            "branch_depth": run[0]["branch_depth"], "children": []}
    for branch in _rows(conn, select(branches_t).where(branches_t.c.parent_run_id == run_id)):
        child = branch_tree(conn, branch["child_run_id"], depth + 1)
        if child:
            tree["children"].append(child)
    return tree


def record_checkpoint_and_file(conn: Connection, run_id: str, session_id: str, node_short: str,
                               now: datetime) -> tuple[str, str]:
    """What cmbagent writes into a run it branches from: a step row for the node (found by
    ``step_number == order_index`` or a placeholder), a manual checkpoint, and a file of that node."""
    steps_t, checkpoints_t, files_t, events_t = T["workflow_steps"], T["checkpoints"], T["files"], T["execution_events"]
    node = resolve_node(conn, node_short, run_id)
    assert node is not None
    step = _rows(conn, select(steps_t).where(steps_t.c.run_id == run_id,
                                             steps_t.c.step_number == node["order_index"]))
    if step:
        step_id = step[0]["id"]
    else:
        step_id = f"cmbagent-step-{node_short}"
        conn.execute(steps_t.insert().values(
            id=step_id, run_id=run_id, session_id=session_id, step_number=node["order_index"],
            goal=f"Branch point at {node_short}", status=node["status"], progress_percentage=0,
            meta={"created_for_branch": True, "dag_node_id": node["id"]}))
    checkpoint_id = f"cmbagent-checkpoint-{node_short}"
    conn.execute(checkpoints_t.insert().values(id=checkpoint_id, run_id=run_id, step_id=step_id,
                                               checkpoint_type="manual", created_at=now - timedelta(seconds=1),
                                               context_snapshot={}, meta={"dag_node_id": node["id"]}))
    event = _rows(conn, select(events_t.c.id).where(events_t.c.node_id == node["id"]).limit(1))
    conn.execute(files_t.insert().values(
        id=f"cmbagent-file-{node_short}", run_id=run_id, session_id=session_id, step_id=step_id,
        event_id=event[0]["id"] if event else None, node_id=node["id"], file_path=f"/tmp/w/{node_short}/plot.png",
        file_type="plot", size_bytes=1234, created_at=now, workflow_phase="control", is_final_output=False))
    return step_id, checkpoint_id
