"""docs/cmbagent.md against the cmbagent integration (session 41, docs against behaviour, third pass):
the entry-point table is the integration's ``ENTRY_POINTS`` and the PyPI entry points README lists are
those the table gives without MARS."""

from __future__ import annotations

import re
from pathlib import Path

from cmbagent_otel.integrations.cmbagent import ENTRY_POINTS

from ._read import table, ticked

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "cmbagent.md").read_text()
README = (ROOT / "README.md").read_text()


def _table() -> dict[str, tuple[str, bool]]:
    """function -> (mode, a MARS-only function)"""
    found: dict[str, tuple[str, bool]] = {}
    for functions, mode in table(DOC, "| function | `cmbagent.workflow.mode` |"):
        (mode,) = ticked(mode)
        pypi, _, mars = functions.partition("MARS ")  # the cell's names after "MARS" are the fork's
        found.update({name: (mode, False) for name in ticked(pypi)})
        found.update({name: (mode, True) for name in ticked(mars)})
    return found


def test_docs_entry_point_table_is_the_integrations() -> None:
    assert {name: mode for name, (mode, _) in _table().items()} == dict(ENTRY_POINTS)


def test_docs_readme_names_every_pypi_entry_point() -> None:
    listed = " ".join(README.split("Every public entry point", 1)[1].split("is run offline", 1)[0].split())
    named = set(re.findall(r"`([a-z_]+)`", listed)) - {"camb_context", "classy_context", "evaluate_plots"}
    named |= {"summarize_document", "summarize_documents"} if "summarize_document(s)" in listed else set()
    pypi = {name for name, (_, mars) in _table().items() if not mars}
    assert named == pypi


def test_docs_the_offline_examples_options_are_its_parsers() -> None:
    """Session 42: examples/cmbagent_offline/README.md against run.py (read, not imported: it needs cmbagent):
    the options it names are the parser's, and its `--workflow` list is the script's `WORKFLOWS`."""
    import ast

    example = ROOT / "examples" / "cmbagent_offline"
    tree = ast.parse((example / "run.py").read_text())
    options = {arg.value for node in ast.walk(tree) if isinstance(node, ast.Call)
               and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
               for arg in node.args if isinstance(arg, ast.Constant)}
    workflows = next(ast.literal_eval(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                     and any(isinstance(t, ast.Name) and t.id == "WORKFLOWS" for t in node.targets))
    text = " ".join((example / "README.md").read_text().split())
    assert set(re.findall(r"`(--[a-z-]+)", text)) | {"--db"} == options
    listed = text.split("`--workflow` picks the entry point (", 1)[1].split(")", 1)[0]
    assert tuple(ticked(listed)) == workflows
