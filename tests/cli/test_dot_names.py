"""Node ids read from a database never rewrite the DOT source or the SVG of ``dag --format dot|svg``.

Found by the seventh campaign: labels were escaped, node names were not. The ``graphviz`` package
writes a name in ``<...>`` as it is (an HTML-like string), so a phase named
``<x> [URL="javascript:alert(1)"] ; <y>`` (an app's, or any ingest client's span) put a live link
into the picture; a name ending in a backslash escaped its closing quote and ``dot`` refused the
whole run (``--format svg`` failed); ``a:b`` in an edge was read as node ``a``, port ``b`` and drew
a node that does not exist.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cmbagent_otel import phase, workflow
from cmbagent_otel.cli import main

NAMES = ['<x> [URL="javascript:alert(1)"] ; <y>', "ends in a backslash\\", "host:port", "planck\\: <b>"]


@pytest.fixture
def hostile_ids(tmp_path: Path, provider: Any) -> str:
    url = f"sqlite:///{tmp_path}/names.db"
    with workflow("wf", mode="one_shot"):
        for name in NAMES:
            with phase(name):
                pass
    provider.store(url)
    return url


def test_dot_source_holds_each_node_once_and_nothing_else(hostile_ids: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--db", hostile_ids, "dag", "latest", "--format", "dot"]) == 0
    dot = capsys.readouterr().out
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed")
    laid_out = subprocess.run(["dot", "-Tcanon"], input=dot, capture_output=True, text=True, check=False)
    assert laid_out.returncode == 0, laid_out.stderr  # the whole file parses
    # "dot -Tcanon" writes the graph back as dot read it: one statement per node, no attribute
    # the source did not set, and no node beyond init, the four phases and the terminator
    assert not re.search(r"^\s*(?:URL|href)=", laid_out.stdout, re.MULTILINE)  # an attribute, not label text
    statements = re.findall(r"^\t(\S[^\t]*)\t\[", laid_out.stdout, re.MULTILINE)
    nodes = [s for s in statements if " -> " not in s]
    assert len(nodes) == len(NAMES) + 2, nodes


def test_svg_has_no_link_and_every_name_as_text(hostile_ids: str, capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed")
    assert main(["--db", hostile_ids, "dag", "latest", "--format", "svg"]) == 0
    svg = capsys.readouterr().out
    assert "<a " not in svg and "xlink:href" not in svg
    assert svg.count('class="node"') == len(NAMES) + 2
    for name in ("host:port", "ends in a backslash\\", "javascript:alert(1)"):  # shown, as text
        assert name.replace('"', "&quot;") in svg.replace("&#45;", "-")
