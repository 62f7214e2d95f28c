"""Medians and interquartile ranges, as every benchmark reports them."""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def quartiles(values: Iterable[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``values`` (inclusive method; one value: itself
    three times; none: NaN)."""
    ordered = sorted(values)
    if len(ordered) < 2:
        value = ordered[0] if ordered else float("nan")
        return value, value, value
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return q1, statistics.median(ordered), q3


def median_iqr(values: Iterable[float], fmt: str = ".1f", width: int = 0, unit: str = "") -> str:
    """``median<unit> (IQR q1-q3)``, the median padded to ``width``."""
    q1, median, q3 = quartiles(values)
    return f"{median:{width}{fmt}}{unit} (IQR {q1:{fmt}}-{q3:{fmt}})"
