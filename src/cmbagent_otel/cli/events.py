"""``cmbagent-otel events RUN``: a run's execution events in execution order."""

from __future__ import annotations

import argparse

from rich.table import Table

from ._common import CLIError, console, fmt_ms, json_text, markup, reading, shown, styled_status

NAME = "events"
HELP = "list a run's execution events"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run id, unique id prefix, or 'latest'")
    parser.add_argument("--node", help="only events of this DAG node (short id, e.g. step_2)")
    parser.add_argument("--recursive", "-r", action="store_true",
                        help="with --node: also the events of the node's descendants (sub-agents, redos)")
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help="table (terminal) or json (default: table)")


def run(args: argparse.Namespace) -> int:
    if args.recursive and not args.node:  # a run's events are all its events: -r alone asks for nothing
        raise CLIError("--recursive needs --node (the node whose descendants' events to add)")
    with reading(args.db) as reader:
        run_row = reader.run(args.run)
        records = shown(reader.events(run_row, args.node, recursive=args.recursive), display=args.format != "json")
    if args.format == "json":
        print(json_text(records))
        return 0
    what = f"node {args.node}{' and its descendants' if args.recursive else ''} of run" if args.node else "run"
    table = Table(title=f"events of {markup(what)} {markup(run_row['id'])}")
    for col in ("order", "event", "agent", "node", "status", "duration", "tokens", "name", "error"):
        table.add_column(col)
    for r in records:
        table.add_row(str(r["order"]), _indent(r["depth"]) + markup(f"{r['type']}/{r['subtype']}"),
                      markup(r["agent"] or "-"), markup(r["node"] or "-"), styled_status(r["status"]),
                      fmt_ms(r["duration_ms"]), str(r["tokens"]) if r["tokens"] is not None else "-",
                      markup(r["name"] or "-"), markup(_short(r["error"])))
    console().print(table)
    return 0


def _indent(depth: object) -> str:
    # another writer's depth may be text, a float or 2**62 (a multiplication error, or a string
    # too long to build): indent only by a whole number, at most as deep as a screen shows
    if isinstance(depth, bool) or not isinstance(depth, int):
        return ""
    return "  " * min(max(depth, 0), _MAX_INDENT)


_MAX_INDENT = 40


def _short(text: str | None, limit: int = 80) -> str:
    if not text:
        return ""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
