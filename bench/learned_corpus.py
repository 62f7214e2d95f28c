"""How many values the redaction learns from ordinary text: the attack campaigns' check that a rule does not teach
ordinary words (a learned word is redacted in every later text, inside longer words too).

The corpus is what the venv holds (nothing fetched or committed): the Python sources of AG2, httpx and openai, the
first 900 in sorted order (AG2's 766, httpx's 23, then openai's), and, with ``--prose``, the package descriptions of
every installed distribution (``*.dist-info/METADATA``: READMEs, ordinary prose and examples). Each file is read
paragraph by paragraph (split at blank lines), each paragraph given to ``redaction.redact`` as a tool result or a
model's message would be; every value ``learn_secret`` takes as new is recorded with the paragraph it came from.
Session 42 counted 31 values on 900 files this way (178 before its fix).

    PYTHONPATH=src .venv/bin/python bench/learned_corpus.py [--prose] [--show]
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path
from typing import Any

FILES = 900


def corpus(prose: bool) -> list[Path]:
    """The files read: see the module's docstring."""
    site = Path(sysconfig.get_paths()["purelib"])
    files = [path for package in ("autogen", "httpx", "openai") for path in sorted((site / package).rglob("*.py"))]
    files = files[:FILES]
    if prose:
        files += sorted(site.glob("*.dist-info/METADATA"))
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prose", action="store_true", help="also the installed distributions' descriptions")
    parser.add_argument("--show", action="store_true", help="print each learned value and where it came from")
    args = parser.parse_args()
    from cmbagent_otel import redaction

    learned: dict[str, str] = {}
    original = redaction.learn_secret

    def recording(value: Any) -> bool:
        new = original(value)
        if new and isinstance(value, str):
            learned.setdefault(value, current[0])
        return new

    current = [""]
    redaction.learn_secret = recording  # the module's own calls look the name up at run time
    files = corpus(args.prose)
    for path in files:
        text = path.read_text("utf-8", "replace")
        for paragraph in text.split("\n\n"):
            if paragraph.strip():
                current[0] = f"{path.parent.name}/{path.name}: {paragraph.strip()[:160]!r}"
                redaction.redact(paragraph)
    redaction.learn_secret = original
    if args.show:
        for value, where in learned.items():
            print(f"{value!r}\n    {where}")
    print(f"{len(learned)} values learned from {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
