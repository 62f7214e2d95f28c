"""``cmbagent-otel dag RUN``: a run's DAG as a tree, JSON, mermaid, DOT or an SVG picture."""

from __future__ import annotations

import argparse
import sys

from . import render
from ._common import console, json_text, reading, shown

NAME = "dag"
HELP = "show a run's DAG (tree, json, mermaid, dot, svg)"
FORMATS = ("tree", "json", "mermaid", "dot", "svg")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run id, unique id prefix, or 'latest'")
    add_format(parser)


def add_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="tree",
                        help="tree (terminal), json, mermaid, dot (Graphviz source) or svg (a picture: needs "
                             "Graphviz's dot program); default: tree")


def show(dag: dict[str, object], fmt: str) -> None:
    """Print ``dag`` in ``fmt`` on stdout."""
    dag = shown(dag, display=fmt != "json")
    if fmt == "json":
        print(json_text(dag))
    elif fmt == "mermaid":
        print(render.mermaid(dag))
    elif fmt == "dot":
        print(render.dot_source(dag))
    elif fmt == "svg":
        sys.stdout.write(render.svg(dag))
    else:
        console().print(render.tree(dag))


def run(args: argparse.Namespace) -> int:
    with reading(args.db) as reader:
        dag = reader.dag(reader.run(args.run))
    show(dag, args.format)
    return 0
