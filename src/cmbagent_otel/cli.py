"""``cmbagent-otel`` command line: inspect runs stored by the DAG exporter, manage the schema.

Subcommands register themselves in :data:`SUBCOMMANDS` (name -> function adding an
argparse sub-parser whose ``func`` default handles the parsed args and returns an exit
code), so other modules can add commands with :func:`subcommand`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

AddParser = Callable[[Any], None]
SUBCOMMANDS: dict[str, AddParser] = {}
"""Registry: subcommand name -> ``add_parser(subparsers)``."""


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def subcommand(name: str) -> Callable[[AddParser], AddParser]:
    """Decorator registering ``add_parser(subparsers)`` under ``name``."""

    def register(func: AddParser) -> AddParser:
        SUBCOMMANDS[name] = func
        return func

    return register


def _console() -> Console:
    # Piped output (files, CI logs, tests) keeps full ids instead of eliding to 80 columns.
    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200)


# --- database access --------------------------------------------------------------------

def _engine(args: argparse.Namespace) -> Any:
    from .dag.database import BadDatabaseURL, make_engine

    try:
        return make_engine(args.db)
    except BadDatabaseURL as exc:
        raise CLIError(str(exc)) from None
    except Exception as exc:
        raise CLIError(f"cannot open database: {exc}") from None


def _connect(args: argparse.Namespace) -> Any:
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError

    from .dag.database import redacted, resolve_url

    engine = _engine(args)
    try:
        conn = engine.connect()
        if not inspect(conn).has_table("workflow_runs"):
            conn.close()
            raise CLIError(f"no tracking tables in {redacted(resolve_url(args.db))}; run `cmbagent-otel db upgrade`")
    except SQLAlchemyError as exc:
        raise CLIError(f"cannot open database {redacted(resolve_url(args.db))}: {exc.orig or exc}") from None
    return conn


def resolve_run(conn: Any, ref: str) -> dict[str, Any]:
    """The run row for ``ref``: a full id, a unique id prefix, or ``latest``."""
    from sqlalchemy import select

    from .dag.writer import T

    runs = T["workflow_runs"]
    if ref == "latest":
        row = conn.execute(select(runs).where(runs.c.is_branch.is_(False)).order_by(
            runs.c.started_at.desc().nulls_last(), runs.c.id).limit(1)).mappings().first()
        if row is None:
            raise CLIError("no runs in the database")
        return dict(row)
    row = conn.execute(select(runs).where(runs.c.id == ref)).mappings().first()
    if row is not None:
        return dict(row)
    matches = conn.execute(select(runs).where(runs.c.id.startswith(ref, autoescape=True)).limit(3)).mappings().all()
    if not matches:
        raise CLIError(f"unknown run {ref!r}")
    if len(matches) > 1:
        raise CLIError(f"run prefix {ref!r} is ambiguous: {', '.join(m['id'] for m in matches)}...")
    return dict(matches[0])


def _duration(start: Any, end: Any) -> str:
    if start is None or end is None:
        return "-"
    return _fmt_ms((end - start).total_seconds() * 1000)


def _fmt_ms(ms: Any) -> str:
    if ms is None:
        return "-"
    ms = float(ms)
    return f"{ms:.0f}ms" if ms < 1000 else f"{ms / 1000:.2f}s"


def _fmt_cost(cost: float) -> str:
    return f"${cost:.4f}"


_STATUS_STYLE = {"completed": "green", "failed": "red", "executing": "yellow", "running": "yellow"}


def _status(status: str) -> str:
    style = _STATUS_STYLE.get(status, "white")
    return f"[{style}]{status}[/{style}]"


# --- runs ---------------------------------------------------------------------------------

def _cmd_runs(args: argparse.Namespace) -> int:
    from sqlalchemy import func, select

    from .dag.writer import T

    runs, nodes, events, costs = T["workflow_runs"], T["dag_nodes"], T["execution_events"], T["cost_records"]
    with _connect(args) as conn:
        n_nodes = dict(conn.execute(select(nodes.c.run_id, func.count()).group_by(nodes.c.run_id)).all())
        n_events = dict(conn.execute(select(events.c.run_id, func.count()).group_by(events.c.run_id)).all())
        cost = {r: float(c or 0) for r, c in conn.execute(
            select(costs.c.run_id, func.sum(costs.c.cost_usd)).group_by(costs.c.run_id)).all()}
        rows = conn.execute(select(runs).order_by(runs.c.started_at.desc().nulls_last(), runs.c.id)
                            .limit(args.limit)).mappings().all()
    records = [{
        "id": r["id"], "mode": r["mode"], "status": r["status"], "is_branch": bool(r["is_branch"]),
        "started": str(r["started_at"]) if r["started_at"] else None,
        "duration": _duration(r["started_at"], r["completed_at"]),
        "nodes": n_nodes.get(r["id"], 0), "events": n_events.get(r["id"], 0), "cost_usd": cost.get(r["id"], 0.0),
    } for r in rows]
    if args.format == "json":
        print(json.dumps(records, indent=2))
        return 0
    table = Table(title="cmbagent runs")
    for col in ("id", "mode", "status", "started", "duration", "nodes", "events", "cost"):
        table.add_column(col, no_wrap=col == "id")
    for r in records:
        table.add_row(r["id"] + (" (branch)" if r["is_branch"] else ""), r["mode"], _status(r["status"]),
                      (r["started"] or "-")[:19], r["duration"], str(r["nodes"]), str(r["events"]),
                      _fmt_cost(r["cost_usd"]))
    _console().print(table)
    return 0


@subcommand("runs")
def _add_runs(sub: Any) -> None:
    p = sub.add_parser("runs", help="list runs (newest first)")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=_cmd_runs)


# --- dag ----------------------------------------------------------------------------------

def meta_tokens(meta: Any) -> int:
    """Total tokens in an event's or node's ``meta`` (an int; rows from older versions held a dict)."""
    tokens = meta.get("tokens") if isinstance(meta, dict) else None
    if isinstance(tokens, dict):
        tokens = tokens.get("total")
    if isinstance(tokens, bool) or not isinstance(tokens, (int, float)):
        return 0
    return int(tokens)


def _meta_cost(meta: Any) -> float:
    cost = meta.get("cost_usd") if isinstance(meta, dict) else None
    return float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) else 0.0


def load_dag(conn: Any, run: dict[str, Any]) -> dict[str, Any]:
    """Nodes (event count, and tokens/cost of their whole subtree), edges and run totals of ``run``, JSON-ready."""
    from sqlalchemy import func, select

    from .dag.writer import T, decode_json

    nodes_t, edges_t, events_t = T["dag_nodes"], T["dag_edges"], T["execution_events"]
    counts = dict(conn.execute(select(events_t.c.node_id, func.count()).where(events_t.c.run_id == run["id"])
                               .group_by(events_t.c.node_id)).all())
    nodes = []
    legacy = False
    for r in conn.execute(select(nodes_t).where(nodes_t.c.run_id == run["id"])).mappings():
        meta = decode_json(r["meta"]) or {}
        legacy = legacy or "tokens" not in meta
        nodes.append({"db_id": r["id"], "id": meta.get("id", r["id"]), "parent": r["parent_node_id"],
                      "type": r["node_type"], "agent": r["agent"], "status": r["status"],
                      "order_index": r["order_index"], "depth": r["depth"], "label": meta.get("label"),
                      "duration_ms": meta.get("duration_ms"), "execution_order": meta.get("execution_order") or 0,
                      "events": counts.get(r["id"], 0), "tokens": meta_tokens(meta), "cost_usd": _meta_cost(meta)})
    by_db = {n["db_id"]: n for n in nodes}
    # Node meta holds subtree totals; events outside any node (a plain program's calls before
    # its first conversation node, or another writer's rows) count for the run only. Rows of
    # older versions carry no node totals: their nodes show their own events' sums.
    outside = {"events": counts.get(None, 0), "tokens": 0, "cost_usd": 0.0}
    wanted = events_t.c.node_id.is_(None) if not legacy else events_t.c.run_id == run["id"]
    for node_id, meta in conn.execute(select(events_t.c.node_id, events_t.c.meta).where(
            events_t.c.run_id == run["id"], wanted)):
        meta = decode_json(meta) or {}
        target = by_db.get(node_id) if legacy else None
        if target is None and node_id is None:
            target = outside
        if target is not None:
            target["tokens"] += meta_tokens(meta)
            target["cost_usd"] += _meta_cost(meta)
    edges = []
    for f, t, d, c in conn.execute(select(edges_t.c.from_node_id, edges_t.c.to_node_id, edges_t.c.dependency_type,
                                          edges_t.c.condition).where(edges_t.c.from_node_id.in_(list(by_db)))):
        edges.append({"source": by_db[f]["id"], "target": by_db[t]["id"] if t in by_db else t, "type": d,
                      "condition": c})
    nodes.sort(key=lambda n: (n["depth"], n["order_index"], n["execution_order"], n["id"]))
    edges.sort(key=lambda e: (e["source"], e["target"]))
    roots = [n for n in nodes if n["parent"] not in by_db]
    return {
        "run": {"id": run["id"], "mode": run["mode"], "status": run["status"],
                "started_at": str(run["started_at"]) if run["started_at"] else None,
                "completed_at": str(run["completed_at"]) if run["completed_at"] else None,
                "task": run["task_description"], "is_branch": bool(run["is_branch"]),
                "tokens": outside["tokens"] + (sum(n["tokens"] for n in roots) if not legacy else
                                               sum(n["tokens"] for n in nodes)),
                "cost_usd": outside["cost_usd"] + (sum(n["cost_usd"] for n in roots) if not legacy else
                                                   sum(n["cost_usd"] for n in nodes)),
                "events_outside_nodes": outside["events"]},
        "nodes": nodes, "edges": edges,
    }


def _usage_parts(item: dict[str, Any]) -> list[str]:
    parts = []
    if item.get("events"):
        parts.append(f"events={item['events']}")
    if item.get("tokens"):
        parts.append(f"tokens={item['tokens']}")
    if item.get("cost_usd"):
        parts.append(_fmt_cost(item["cost_usd"]))
    return parts


def _node_line(n: dict[str, Any]) -> str:
    parts = [f"[bold]{escape(str(n['id']))}[/bold]", f"({escape(str(n['type']))})", _status(n["status"]),
             f"agent={escape(str(n['agent']))}", _fmt_ms(n["duration_ms"])]
    return " ".join(parts + _usage_parts(n))


def _render_tree(dag: dict[str, Any]) -> Tree:
    run = dag["run"]
    head = [f"[bold]run {run['id']}[/bold]", escape(str(run["mode"])), _status(run["status"])]
    tree = Tree(" ".join(head + _usage_parts({"tokens": run["tokens"], "cost_usd": run["cost_usd"]})))
    children: dict[str | None, list[dict[str, Any]]] = {}
    ids = {n["db_id"] for n in dag["nodes"]}
    for n in dag["nodes"]:
        parent = n["parent"] if n["parent"] in ids else None
        children.setdefault(parent, []).append(n)
    shown: set[str] = set()

    def add(branch: Tree, parent: str | None) -> None:
        for n in children.get(parent, []):
            if n["db_id"] not in shown:  # a damaged parent cycle must not recurse forever
                shown.add(n["db_id"])
                add(branch.add(_node_line(n)), n["db_id"])

    add(tree, None)
    outside = run["events_outside_nodes"]
    if outside:
        tree.add(f"[dim]{outside} event(s) outside any DAG node[/dim]")
    elif not dag["nodes"]:
        tree.add("[dim]no DAG nodes and no events[/dim]")
    return tree


def _dot_text(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"')


def _dot(dag: dict[str, Any]) -> str:
    lines = [f'digraph "{_dot_text(dag["run"]["id"])}" {{', "  rankdir=TB;"]
    for n in dag["nodes"]:
        label = f"{_dot_text(n['id'])}\\n{_dot_text(n['type'])} {_dot_text(n['status'])}"
        lines.append(f'  "{_dot_text(n["id"])}" [label="{label}"];')
    for e in dag["edges"]:
        attr = f' [style=dashed, label="{_dot_text(e["condition"])}"]' if e["type"] == "conditional" else ""
        lines.append(f'  "{_dot_text(e["source"])}" -> "{_dot_text(e["target"])}"{attr};')
    by_db = {n["db_id"]: n for n in dag["nodes"]}
    for n in dag["nodes"]:
        parent = by_db.get(n["parent"]) if n["parent"] else None
        if parent is not None:
            lines.append(f'  "{_dot_text(parent["id"])}" -> "{_dot_text(n["id"])}" [style=dotted, arrowhead=none];')
    lines.append("}")
    return "\n".join(lines)


def _mermaid(dag: dict[str, Any]) -> str:
    keys: dict[str, str] = {}
    used: set[str] = set()

    def key(short: Any) -> str:
        short = str(short)
        if short not in keys:
            base = candidate = "n_" + "".join(ch if ch.isalnum() else "_" for ch in short)
            suffix = 1
            while candidate in used:  # "a-b" and "a_b" must stay two mermaid nodes
                suffix += 1
                candidate = f"{base}__{suffix}"
            used.add(candidate)
            keys[short] = candidate
        return keys[short]

    def text(value: Any) -> str:
        return "".join(ch if ch.isalnum() or ch in " _-.:,/" else f"#{ord(ch)};" for ch in str(value))

    lines = ["flowchart TD"]
    for n in dag["nodes"]:
        lines.append(f'  {key(n["id"])}["{text(n["id"])} ({text(n["type"])}, {text(n["status"])})"]')
    for e in dag["edges"]:
        arrow = f' -.->|{text(e["condition"])}| ' if e["type"] == "conditional" else " --> "
        lines.append(f"  {key(e['source'])}{arrow}{key(e['target'])}")
    return "\n".join(lines)


def _cmd_dag(args: argparse.Namespace) -> int:
    with _connect(args) as conn:
        run = resolve_run(conn, args.run)
        dag = load_dag(conn, run)
    if args.format == "json":
        print(json.dumps(dag, indent=2, default=str))
    elif args.format == "dot":
        print(_dot(dag))
    elif args.format == "mermaid":
        print(_mermaid(dag))
    else:
        _console().print(_render_tree(dag))
    return 0


@subcommand("dag")
def _add_dag(sub: Any) -> None:
    p = sub.add_parser("dag", help="show a run's DAG")
    p.add_argument("run", help="run id, unique id prefix, or 'latest'")
    p.add_argument("--format", choices=("tree", "json", "dot", "mermaid"), default="tree")
    p.set_defaults(func=_cmd_dag)


# --- events -------------------------------------------------------------------------------

def _cmd_events(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from .dag.mapping import node_db_id
    from .dag.writer import T, decode_json

    events_t, nodes_t = T["execution_events"], T["dag_nodes"]
    with _connect(args) as conn:
        run = resolve_run(conn, args.run)
        shorts = {r.id: (decode_json(r.meta) or {}).get("id", r.id) for r in conn.execute(
            select(nodes_t.c.id, nodes_t.c.meta).where(nodes_t.c.run_id == run["id"]))}
        query = select(events_t).where(events_t.c.run_id == run["id"])
        if args.node:
            node_id = node_db_id(run["id"], args.node)
            if node_id not in shorts:
                raise CLIError(f"run {run['id']} has no node {args.node!r}")
            query = query.where(events_t.c.node_id == node_id)
        rows = conn.execute(query.order_by(events_t.c.execution_order, events_t.c.started_at,
                                           events_t.c.id)).mappings().all()
    records = []
    for r in rows:
        meta = decode_json(r["meta"]) or {}
        records.append({
            "id": r["id"], "order": r["execution_order"], "depth": r["depth"], "type": r["event_type"],
            "subtype": r["event_subtype"], "agent": r["agent_name"], "node": shorts.get(r["node_id"]),
            "status": r["status"], "duration_ms": r["duration_ms"], "name": meta.get("span_name"),
            "tokens": meta_tokens(meta) if "tokens" in meta else None, "cost_usd": meta.get("cost_usd"),
            "parent": r["parent_event_id"], "error": r["error_message"],
        })
    if args.format == "json":
        print(json.dumps(records, indent=2, default=str))
        return 0
    table = Table(title=f"events of run {run['id']}")
    for col in ("order", "event", "agent", "node", "status", "duration", "tokens", "name"):
        table.add_column(col)
    for r in records:
        table.add_row(str(r["order"]), "  " * r["depth"] + f"{r['type']}/{r['subtype']}", r["agent"] or "-",
                      r["node"] or "-", _status(r["status"]), _fmt_ms(r["duration_ms"]),
                      str(r["tokens"]) if r["tokens"] is not None else "-", r["name"] or "-")
    _console().print(table)
    return 0


@subcommand("events")
def _add_events(sub: Any) -> None:
    p = sub.add_parser("events", help="list a run's execution events")
    p.add_argument("run", help="run id, unique id prefix, or 'latest'")
    p.add_argument("--node", help="only events of this DAG node (short id, e.g. step_2)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=_cmd_events)


# --- db -----------------------------------------------------------------------------------

def _cmd_db(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from .dag import database

    try:
        if args.action == "upgrade":
            database.upgrade(args.db, args.revision or "head")
        elif args.action == "downgrade":
            database.downgrade(args.db, args.revision or "-1")
        print(f"{database.redacted(database.resolve_url(args.db))}: "
              f"{database.current_revision(args.db) or '<none>'} (head: {', '.join(database.head_revisions())})")
    except database.BadDatabaseURL as exc:
        raise CLIError(str(exc)) from None
    except SQLAlchemyError as exc:
        raise CLIError(f"database error: {getattr(exc, 'orig', None) or exc}") from None
    return 0


@subcommand("db")
def _add_db(sub: Any) -> None:
    p = sub.add_parser("db", help="manage the tracking schema (Alembic)")
    p.add_argument("action", choices=("upgrade", "current", "downgrade"))
    p.add_argument("revision", nargs="?", help="target revision (upgrade: head, downgrade: -1)")
    p.set_defaults(func=_cmd_db)


# --- main ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="cmbagent-otel", description="Inspect runs stored by the DAG exporter and manage the schema.")
    parser.add_argument("--db", metavar="URL", default=None,
                        help="database URL (default: $CMBAGENT_OTEL_DATABASE_URL, $CMBAGENT_DATABASE_URL, "
                             "or <$CMBAGENT_DEFAULT_WORK_DIR or ~/.cmbagent-otel>/database/cmbagent.db)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cmbagent-otel`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except CLIError as exc:
        print(f"cmbagent-otel: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
