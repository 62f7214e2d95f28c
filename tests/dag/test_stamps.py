"""Span times made with their text (``dag._stamps``) equal the datetimes and texts made the plain way."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from typing import Any

from cmbagent_otel.dag import _stamps
from cmbagent_otel.dag.schema import metadata
from cmbagent_otel.dag.statements import Sql, _sqlite_dt

_EPOCH = datetime(1970, 1, 1)
_EDGES = [0, 1, 999, 1000, 999_999_999, 1_000_000_000, 1_000_000_999, 1_796_147_325_000_000_000,
          1_796_147_325_000_001_000, 1_796_147_325_999_999_999, _stamps.MAX_NS - 1, _stamps.MAX_NS]


def _plain(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=1) * (ns // 1000)


def test_span_times_and_their_texts_are_the_plain_ones() -> None:
    rng = random.Random(13)
    values = _EDGES + [rng.randrange(0, _stamps.MAX_NS) for _ in range(2000)]
    # whole seconds and whole milliseconds: the texts without a fraction, or with zeros in it
    values += [rng.randrange(0, 10**10) * 10**9 + rng.choice([0, 1000, 999_000, 999_999_000]) for _ in range(500)]
    for ns in values:
        made = _stamps.at(ns)
        plain = _plain(ns)
        assert made == plain and type(made) is datetime and made.tzinfo is None and made.fold == 0
        assert _stamps.sqlite_text(made) == plain.isoformat(" ", "microseconds")
        assert _stamps.iso(made) == plain.isoformat(" ")
        assert _sqlite_dt(made) == plain.isoformat(" ", "microseconds")


class _Shifted(datetime):
    """A datetime subclass with its own text: never given a span time's remembered text."""

    def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:
        return "shifted"


def test_datetimes_not_made_from_span_times_are_formatted_as_before() -> None:
    # below the epoch, past year 9999's nanoseconds, not ints: made the plain way
    for ns in (-1, -1000, -10**18, 1.5e18, True):
        assert _stamps.at(ns) == _plain(ns)  # type: ignore[arg-type]
    made = _stamps.at(1_796_147_325_000_001_000)
    aware = datetime(2026, 12, 1, 10, 0, 0, 5, tzinfo=timezone(timedelta(hours=2)))
    same_as_made = _Shifted.fromisoformat(made.isoformat())  # equal to a remembered datetime
    assert same_as_made == made
    sql = Sql("sqlite")
    cols = sql.columns(metadata.tables["execution_events"])
    row = dict.fromkeys(name for name, _ in cols)
    for value, text in ((made, "2026-12-01 17:48:45.000001"), (aware, "2026-12-01 10:00:00.000005"),
                        (same_as_made, "shifted"), (datetime(2026, 12, 1, 10), "2026-12-01 10:00:00.000000")):
        params = sql.params([{**row, "timestamp": value, "started_at": value}], cols)[0]
        names = [name for name, _ in cols]
        assert params[names.index("timestamp")] == params[names.index("started_at")] == text
        assert _sqlite_dt(value) == text
    assert _stamps.iso(datetime(2026, 12, 1, 10, 0, 0)) == "2026-12-01 10:00:00"
    assert _stamps.iso(same_as_made) == "shifted"


def test_rows_are_the_same_with_or_without_time_texts(capture: Any) -> None:
    """map_spans(texts=False) (PostgreSQL: times go as datetimes) maps the same rows as with texts."""
    from cmbagent_otel.dag.mapping import map_spans

    from .scenario import run_scenario

    run_scenario()
    spans = capture.spans
    with_texts, without = map_spans(spans), map_spans(spans, texts=False)
    assert with_texts.nodes and with_texts.events
    for table in ("sessions", "nodes", "events", "node_placeholders", "event_placeholders", "messages"):
        assert getattr(with_texts, table) == getattr(without, table), table
    assert {k: (v.rank, v.row) for k, v in with_texts.runs.items()} == {
        k: (v.rank, v.row) for k, v in without.runs.items()}
