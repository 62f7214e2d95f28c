"""bench/README.md against the benchmark scripts' command lines (session 42, docs against behaviour, fourth
pass): bench_ab.py's `--no-check`, bench_export_pg.py's `--server-breakdown` and bench_memory.py's `--every` and
`--rss-only` were named nowhere in it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "bench" / "README.md").read_text()


def _options(path: Path) -> list[str]:
    """The long options a script's argparse parser takes, those whose help is ``argparse.SUPPRESS`` left out."""
    options = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            continue
        hidden = any(keyword.arg == "help" and isinstance(keyword.value, ast.Attribute)
                     and keyword.value.attr == "SUPPRESS" for keyword in node.keywords)
        options += [arg.value for arg in node.args if isinstance(arg, ast.Constant) and not hidden
                    and isinstance(arg.value, str) and arg.value.startswith("--")]
    return options


def test_docs_every_bench_option_is_in_the_readme() -> None:
    scripts = sorted(path for path in (ROOT / "bench").glob("*.py") if not path.name.startswith("_"))
    options = {path.name: _options(path) for path in scripts}
    assert sum(map(len, options.values())) > 50
    undocumented = {name: [option for option in found if not re.search(rf"{re.escape(option)}(?![\w-])", README)]
                    for name, found in options.items()}
    assert not {name: missing for name, missing in undocumented.items() if missing}
    for path in scripts:
        assert f"bench/{path.name}" in README or f"## {path.name}" in README, path.name
