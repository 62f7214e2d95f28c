"""``cmbagent-otel runs``: the runs in the database, newest first."""

from __future__ import annotations

import argparse

from rich.table import Table

from ._common import (
    CLIError,
    console,
    fmt_cost,
    fmt_ms,
    json_text,
    markup,
    positive_int,
    reading,
    shown,
    styled_status,
)

NAME = "runs"
HELP = "list runs (newest first)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=positive_int, default=50, help="at most this many runs (default: 50)")
    parser.add_argument("--all", action="store_true",
                        help="also show empty branch runs (a redo's branch run whose work is in its parent's DAG)")
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help="table (terminal) or json (default: table)")


def run(args: argparse.Namespace) -> int:
    with reading(args.db) as reader:
        records, hidden = reader.runs(args.limit, include_empty_branches=args.all)
        records = shown(records, display=args.format != "json")
        where = reader.where
    if not records:
        raise CLIError(f"no runs in {where}" + (f" ({hidden} empty branch runs hidden, --all shows them)"
                                                if hidden else ""))
    if args.format == "json":
        print(json_text(records))
        return 0
    table = Table(title=f"cmbagent runs in {markup(where)}")
    for col in ("id", "mode", "status", "started", "duration", "nodes", "events", "cost"):
        table.add_column(col, no_wrap=col == "id")
    for r in records:
        table.add_row(markup(r["id"]) + (" (branch)" if r["is_branch"] else ""), markup(r["mode"]),
                      styled_status(r["status"]), markup((r["started"] or "-")[:19]), fmt_ms(r["duration_ms"]),
                      str(r["nodes"]), str(r["events"]), fmt_cost(r["cost_usd"]))
    if hidden:
        table.caption = f"{hidden} empty branch run(s) hidden (--all shows them)"
    console().print(table)
    return 0
