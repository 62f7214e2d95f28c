"""Drawing a run's DAG (as :meth:`~cmbagent_otel.dag.query.DagReader.dag` returns it) for people.

* ``tree``: the terminal tree (rich): every node under its parent, in the order they ran,
  with status, agent, duration, usage and a failed node's reason.
* ``mermaid``: a flowchart that keeps the hierarchy: an arrow for each stored edge (``A -->
  B``: B runs after A, or A starts with its child B), a dashed labelled arrow for each redo
  branch, and a plain line (``A --- B``) from a parent to each other child, so every node
  is connected; nodes coloured by status, with agent, duration and a failure's reason.
* ``dot`` / ``svg``: the same picture through Graphviz (the ``graphviz`` package writes the
  DOT source, the ``dot`` program lays it out): the tree laid out left to right, sequence and
  branch edges drawn over it, nodes coloured by status with durations, usage and a failed
  node's reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

from rich.tree import Tree

from ._common import _CONTROL, FIELD_CHARS, CLIError, cut, field, fmt_cost, fmt_ms, markup, plain, styled_status

REASON_CHARS = 160  # a failure reason longer than this is cut in the tree and the picture

# fill and border per status (green / red / amber / grey)
COLOURS = {
    "completed": ("#d9f2dd", "#2e7d32"),
    "failed": ("#fadbd8", "#c62828"),
    "running": ("#fff4cc", "#b8860b"),
    "executing": ("#fff4cc", "#b8860b"),
}
OTHER_COLOURS = ("#ececec", "#616161")


# letters that show as nothing (Hangul fillers): mermaid keeps letters and digits as they are
_INVISIBLE = frozenset(map(chr, _CONTROL))
_KEY_CHARS = 64  # of a node's id in its mermaid key (written on each of its edges); kept apart by a suffix


def one_line(text: Any, limit: int = REASON_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _usage_parts(item: dict[str, Any]) -> list[str]:
    parts = []
    if item.get("events"):
        parts.append(f"events={item['events']}")
    if item.get("tokens"):
        parts.append(f"tokens={item['tokens']}")
    if item.get("cost_usd"):
        parts.append(fmt_cost(item["cost_usd"]))
    return parts


def _children(dag: dict[str, Any]) -> dict[str | None, list[dict[str, Any]]]:
    children: dict[str | None, list[dict[str, Any]]] = {}
    for n in dag["nodes"]:  # already in display order
        children.setdefault(n["parent"], []).append(n)
    return children


# --- terminal tree ---------------------------------------------------------------------------
def _node_line(n: dict[str, Any]) -> str:
    parts = [f"[bold]{markup(n['id'])}[/bold]", f"({markup(n['type'])})", styled_status(n["status"]),
             f"agent={markup(n['agent'])}", fmt_ms(n["duration_ms"])]
    line = " ".join(parts + _usage_parts(n))
    if n.get("error"):
        line += f" [red]error: {markup(one_line(n['error']))}[/red]"
    return line


#: the deepest level the tree draws (4 columns each); deeper nodes are listed at it, marked
TREE_DEPTH = 16


def tree(dag: dict[str, Any]) -> Tree:
    """The run as a rich Tree."""
    run = dag["run"]
    head = [f"[bold]run {markup(run['id'])}[/bold]", markup(run["mode"]), styled_status(run["status"]),
            fmt_ms(run.get("duration_ms"))]
    root = Tree(" ".join(head + _usage_parts({"tokens": run["tokens"], "cost_usd": run["cost_usd"]})))
    children = _children(dag)
    # iterative: a deep DAG must not hit the recursion limit
    stack: list[tuple[Tree, dict[str, Any], int]] = [(root, n, 1) for n in reversed(children.get(None, []))]
    shown: set[int] = set()
    while stack:
        branch, n, depth = stack.pop()
        if id(n) in shown:  # a node listed under itself must not be printed for ever
            continue
        shown.add(id(n))
        line = _node_line(n)
        added = branch.add(line if depth <= TREE_DEPTH else f"[dim](depth {depth})[/dim] {line}")
        # deeper nodes stand at the last level shown, marked: rich draws each line's guides anew (a
        # chain of 6,000 nodes took 30 s) and a line past the width shows nothing of its node
        under = added if depth < TREE_DEPTH else branch
        stack.extend((under, c, depth + 1) for c in reversed(children.get(n["id"], [])))
    for n in dag["nodes"]:  # another writer's parent cycle: no chain from these reaches the run
        if id(n) not in shown:
            root.add(f"{_node_line(n)} [dim](parent {markup(n['parent'])}: a cycle)[/dim]")
    outside = run["events_outside_nodes"]
    if outside:
        root.add(f"[dim]{outside} event(s) outside any DAG node[/dim]")
    elif not dag["nodes"]:
        root.add("[dim]no DAG nodes and no events[/dim]")
    return root


class _Names:
    """Each id's name in a picture (``base(id)``), distinct for distinct ids: a base already given to
    another id gets ``__2``, ``__3``... Each base remembers the last suffix it tried, so ids sharing
    one base (another writer's thousands of ids alike in their first 64 characters) cost one step
    each, not a scan of every suffix taken before (quadratic: 20,000 such ids took minutes)."""

    def __init__(self, base: Callable[[str], str]) -> None:
        self._base = base
        self._names: dict[str, str] = {}
        self._used: set[str] = set()
        self._suffix: dict[str, int] = {}

    def __call__(self, value: Any) -> str:
        short = str(value)
        name = self._names.get(short)
        if name is None:
            base = name = self._base(short)
            suffix = self._suffix.get(base, 1)
            while name in self._used:
                suffix += 1
                name = f"{base}__{suffix}"
            self._suffix[base] = suffix
            self._used.add(name)
            self._names[short] = name
        return name


# --- edges: hierarchy plus stored edges ----------------------------------------------------------
def _edges(dag: dict[str, Any]) -> Iterator[tuple[str, str, str, str | None, bool]]:
    """``(source, target, kind, label, tree)``: kind ``next`` (a stored sequence edge),
    ``branch`` (a stored conditional redo edge) or ``child`` (a parent -> child pair no stored
    edge joins); ``tree`` tells whether it joins a parent to its child (the layout's skeleton)."""
    ids = {n["id"] for n in dag["nodes"]}
    pairs = {(n["parent"], n["id"]) for n in dag["nodes"] if n["parent"] is not None}
    stored = set()
    for e in dag["edges"]:
        source, target = str(e["source"]), str(e["target"])
        if source not in ids or target not in ids:
            continue
        stored.add((source, target))
        kind = "branch" if e["type"] == "conditional" else "next"
        yield source, target, kind, e["condition"], (source, target) in pairs
    for n in dag["nodes"]:
        if n["parent"] is not None and (n["parent"], n["id"]) not in stored:
            yield n["parent"], n["id"], "child", None, True


# --- mermaid -----------------------------------------------------------------------------------
def mermaid(dag: dict[str, Any]) -> str:
    """A mermaid flowchart (see the module docstring)."""
    # "a-b" and "a_b" (and ids alike in their first 64 characters) must stay two mermaid nodes
    key = _Names(lambda short: "n_" + "".join(ch if ch.isalnum() and ch not in _INVISIBLE else "_"
                                              for ch in short[:_KEY_CHARS]))

    def text(value: Any) -> str:
        return "".join(ch if (ch.isalnum() or ch in " _-.:,/$=") and ch not in _INVISIBLE else f"#{ord(ch)};"
                       for ch in cut(value))

    lines = ["flowchart LR"]
    for status, (fill, stroke) in (*COLOURS.items(), ("other", OTHER_COLOURS)):
        lines.append(f"  classDef {status} fill:{fill},stroke:{stroke},color:#000")
    for n in dag["nodes"]:
        detail = " ".join(p for p in (str(n["type"]), str(n["status"]), f"agent={n['agent']}",
                                      fmt_ms(n["duration_ms"]) if n["duration_ms"] is not None else "") if p)
        label = f"{text(n['id'])}<br/>{text(detail)}"
        if n.get("error"):
            label += f"<br/>error: {text(one_line(n['error'], 80))}"
        status = n["status"] if n["status"] in COLOURS else "other"
        lines.append(f'  {key(n["id"])}["{label}"]:::{status}')
    for source, target, kind, label, _tree in _edges(dag):
        if kind == "child":
            lines.append(f"  {key(source)} --- {key(target)}")
        elif kind == "branch":
            lines.append(f"  {key(source)} -.->|{text(label or 'branch')}| {key(target)}")
        else:
            lines.append(f"  {key(source)} --> {key(target)}")
    return "\n".join(lines)


# --- Graphviz ------------------------------------------------------------------------------------
def _dot_id(value: Any) -> str:
    """The DOT name of a node: its id, or a digest of it when the ``graphviz`` package would not
    write the id as one quoted string. It writes a name in ``<...>`` as it is (an HTML-like
    string: a stored id could add nodes, edges and attributes such as ``URL="javascript:..."``
    to the SVG), reads ``a:b`` in an edge as node ``a``, port ``b`` (another node), and a
    trailing backslash escapes the closing quote (the rest of the file fails to parse). The
    label still shows the id. Not unique by itself (an id may be another's digest name, and two ids
    may show alike once escaped): :func:`graph` keeps the names apart."""
    text = plain(value)
    if ":" not in text and "\\" not in text and not text.startswith("<") and len(text) <= FIELD_CHARS:
        return text  # a longer one (another writer's) would be written on every edge of the node
    return "id_" + hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def graph(dag: dict[str, Any]) -> Any:
    """The run as a ``graphviz.Digraph``."""
    import graphviz

    def label(*lines: str) -> str:
        text = "\n".join(graphviz.escape(field(line)) for line in lines if line)
        return " " + text if text.startswith("<") else text  # never an HTML-like label

    run = dag["run"]
    title = [f"run {run['id']}  {run['mode']}  {run['status']}  {fmt_ms(run.get('duration_ms'))}",
             " ".join(_usage_parts({"tokens": run["tokens"], "cost_usd": run["cost_usd"]})),
             "blue: runs next (or starts with)   grey: contains   dashed: redo branch"]
    dot = graphviz.Digraph(name="run", graph_attr={
        "rankdir": "LR", "ordering": "out", "fontname": "Helvetica", "fontsize": "12", "labelloc": "t",
        "nodesep": "0.25", "ranksep": "0.45", "label": label(*title), "newrank": "true",
    }, node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica", "fontsize": "10",
                  "penwidth": "1.4"}, edge_attr={"fontname": "Helvetica", "fontsize": "9", "arrowsize": "0.7"})
    # one box per node: "a\x1b" and a literal "a\\x1b" escape alike, and an id may be another's digest name
    name = _Names(_dot_id)
    for n in dag["nodes"]:
        fill, border = COLOURS.get(n["status"], OTHER_COLOURS)
        detail = " · ".join(p for p in (str(n["type"]), str(n["agent"]),
                                        fmt_ms(n["duration_ms"]) if n["duration_ms"] is not None else "") if p)
        lines = [str(n["id"]), detail, " ".join(_usage_parts(n))]
        if n.get("error"):
            lines.append(f"✗ {one_line(n['error'], 60)}")
        attrs = {"fillcolor": fill, "color": border}
        if n["type"] == "branch_point":
            attrs["shape"] = "diamond"
            attrs["style"] = "filled"
        dot.node(name(n["id"]), label(*lines), **attrs)
    for source, target, kind, edge_label, tree_edge in _edges(dag):
        source, target = name(source), name(target)
        # parent -> child edges lay the tree out; the others are drawn over it
        constraint = "true" if tree_edge else "false"
        if kind == "child":
            dot.edge(source, target, color="#9e9e9e")
        elif kind == "branch":
            dot.edge(source, target, style="dashed", color="#e65100", fontcolor="#e65100",
                     label=label(str(edge_label or "branch")), constraint=constraint)
        else:
            dot.edge(source, target, color="#1565c0", penwidth="1.3", constraint=constraint)
    return dot


def dot_source(dag: dict[str, Any]) -> str:
    """The DOT text of :func:`graph`."""
    return str(graph(dag).source)


def svg(dag: dict[str, Any]) -> str:
    """The picture as SVG, laid out by Graphviz's ``dot`` program."""
    import graphviz

    try:
        return graph(dag).pipe(format="svg", encoding="utf-8")  # type: ignore[no-any-return]
    except graphviz.ExecutableNotFound:
        raise CLIError("--format svg needs Graphviz's `dot` program on PATH (Debian/Ubuntu: apt-get install "
                       "graphviz; macOS: brew install graphviz); --format dot prints the source without it") from None
    except graphviz.CalledProcessError as exc:
        raise CLIError(f"Graphviz's dot failed: {one_line(exc.stderr or exc)}") from None
