"""How the docs tests read the docs: markdown tables, ticked names and stated numbers, one way for all.

A table is found by its header row and read as GitHub renders it (cells split at every ``|`` not
escaped as ``\\|``), so a row that would render with a cell too many or too few fails the test that
reads it instead of being skipped by a regular expression that no longer matches.
"""

from __future__ import annotations

import re

_DELIMITER = re.compile(r"^\|(?:\s*:?-{3,}:?\s*\|)+$")
_PIPE = re.compile(r"(?<!\\)\|")
TICKED = re.compile(r"`([^`]+)`")


def _cells(line: str) -> list[str]:
    line = line.strip()
    assert line.startswith("|") and line.endswith("|"), line
    return [cell.strip().replace("\\|", "|") for cell in _PIPE.split(line[1:-1])]


def table(text: str, header: str) -> list[list[str]]:
    """The body rows (lists of stripped cells) of the one table in ``text`` whose header row starts with
    ``header`` (e.g. ``"| scope | spans |"``). Fails when there is no such table or more than one, when
    its delimiter row is missing, when it has no rows, or when a row's cell count is not the header's."""
    lines = text.splitlines()
    starts = [index for index, line in enumerate(lines) if line.startswith(header)]
    assert len(starts) == 1, f"{len(starts)} tables headed {header!r}"
    start = starts[0]
    width = len(_cells(lines[start]))
    assert start + 1 < len(lines) and _DELIMITER.match(lines[start + 1]), f"no delimiter row under {header!r}"
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        assert len(cells) == width, (header, line)
        rows.append(cells)
    assert rows, f"table {header!r} has no rows"
    return rows


def ticked(cell: str) -> list[str]:
    """The names in backticks in ``cell``, in order."""
    return TICKED.findall(cell)


def number(text: str, pattern: str) -> float:
    """The number ``pattern``'s first group finds in ``text`` (thousands commas allowed); fails when the
    sentence is not there."""
    match = re.search(pattern, text)
    assert match, pattern
    return float(match.group(1).replace(",", ""))
