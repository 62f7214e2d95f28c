"""How many values the redaction learns from ordinary text: the attack campaigns' check that a rule does not teach
ordinary words (a learned word is redacted in every later text, inside longer words too).

The corpus is what the venv holds (nothing fetched or committed): the Python sources of AG2, httpx and openai, the
first 900 in sorted order (AG2's 766, httpx's 23, then openai's), and, with ``--prose``, the package descriptions of
every installed distribution (``*.dist-info/METADATA``: READMEs, ordinary prose and examples), and with ``--system``
the machine's own text: Python's standard library (``/usr/lib/python3.11``, tests left out), the manual pages of
sections 5 and 8 and the documentation under ``/usr/share/doc`` (plain and gzipped: READMEs, changelogs, NEWS; not
test logs and reports: their hashes and generated names are no prose),
prose of every kind (configuration, logins, commands, messages). Each file is read
paragraph by paragraph (split at blank lines), each paragraph given to ``redaction.redact`` as a tool result or a
model's message would be; every value ``learn_secret`` takes as new is recorded with the paragraph it came from.
Session 42 counted 31 values on 900 files this way (178 before its fix).

    PYTHONPATH=src .venv/bin/python bench/learned_corpus.py [--prose] [--system] [--show]
"""

from __future__ import annotations

import argparse
import gzip
import sys
import sysconfig
from pathlib import Path
from typing import Any

FILES = 900


def corpus(prose: bool, system: bool = False) -> list[Path]:
    """The files read: see the module's docstring."""
    site = Path(sysconfig.get_paths()["purelib"])
    files = [path for package in ("autogen", "httpx", "openai") for path in sorted((site / package).rglob("*.py"))]
    files = files[:FILES]
    if prose:
        files += sorted(site.glob("*.dist-info/METADATA"))
    if system:
        files += sorted(path for path in Path("/usr/lib/python3.11").rglob("*.py")
                        if not {"test", "tests", "site-packages", "dist-packages"} & set(path.parts))
        files += sorted(Path("/usr/share/man/man5").glob("*.gz")) + sorted(Path("/usr/share/man/man8").glob("*.gz"))
        files += sorted(path for path in Path("/usr/share/doc").rglob("*") if path.is_file() and not path.is_symlink()
                        and path.name != "copyright" and path.suffix in ("", ".gz", ".txt", ".md", ".rst")
                        and not any(word in path.name for word in ("check.log", "test", "jtreport", ".json")))
    return files


def read(path: Path) -> str:
    """The text of ``path`` (gunzipped), undecodable bytes replaced."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            return ""
    return raw.decode("utf-8", "replace")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prose", action="store_true", help="also the installed distributions' descriptions")
    parser.add_argument("--system", action="store_true", help="also the machine's stdlib, manual pages and docs")
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
    files = corpus(args.prose, args.system)
    for path in files:
        text = read(path)
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
