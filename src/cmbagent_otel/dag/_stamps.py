"""Span times as naive UTC datetimes and as the text SQLite stores them as, made together.

``datetime.isoformat`` costs about twice as much as building the datetime itself (its C
code formats through ``PyUnicode_FromFormat``), and the DAG export wrote two or four of
them per span. Here a span time's text is the text of its whole second (formatted once per
distinct second: the spans of a batch share their seconds) followed by the microseconds,
and the datetime is parsed from that text (``fromisoformat`` is the cheapest way to build
one); the text is remembered by the datetime's value, so the SQLite row converter and the
node meta find it instead of formatting it again. Any value not made here (or forgotten:
the memos are bounded) is formatted by ``isoformat`` as before, giving the same text.
"""

from __future__ import annotations

from datetime import datetime, timedelta

EPOCH = datetime(1970, 1, 1)
# timedelta * int builds the delta without timedelta()'s argument parsing
_MICROSECOND = timedelta(microseconds=1)
# The latest time a datetime (and so a row) can hold, in nanoseconds since the epoch
MAX_NS = (datetime(9999, 12, 31, 23, 59, 59, 999999) - EPOCH) // _MICROSECOND * 1000
_THREE_DIGITS = tuple(f"{i:03d}" for i in range(1000))
_MEMO_SIZE = 8192  # datetimes remembered: a batch of 512 spans makes about 1,100
_fromisoformat = datetime.fromisoformat

# whole seconds since the epoch -> "YYYY-MM-DD HH:MM:SS."; datetime -> isoformat(" ", "microseconds")
_seconds: dict[int, str] = {}
_texts: dict[datetime, str] = {}
text_of = _texts.get  # the text of a datetime made by at() (a naive, plain datetime), else None


def at(ns: int) -> datetime:
    """Nanoseconds since the epoch as a naive UTC datetime (``EPOCH + 1 µs * (ns // 1000)``),
    its text remembered for :func:`sqlite_text` and :func:`iso`."""
    if type(ns) is not int or not 0 <= ns <= MAX_NS:
        return bare(ns)
    us = ns // 1000
    second = us // 1_000_000
    prefix = _seconds.get(second)
    if prefix is None:
        if len(_seconds) >= _MEMO_SIZE:
            _seconds.clear()
        prefix = _seconds[second] = (EPOCH + _MICROSECOND * (second * 1_000_000)).isoformat(" ") + "."
    fraction = us - second * 1_000_000
    text = prefix + _THREE_DIGITS[fraction // 1000] + _THREE_DIGITS[fraction % 1000]
    value = _fromisoformat(text)
    if len(_texts) >= _MEMO_SIZE:
        _texts.clear()
    _texts[value] = text
    return value


def bare(ns: int) -> datetime:
    """:func:`at` without the text (for times no row stores as text: PostgreSQL takes datetimes)."""
    return EPOCH + _MICROSECOND * (ns // 1000)


def sqlite_text(value: datetime) -> str:
    """``value.isoformat(" ", "microseconds")`` of a naive datetime (SQLAlchemy's SQLite storage format)."""
    if type(value) is datetime:
        text = text_of(value)
        if text is not None:
            return text
    return value.isoformat(" ", "microseconds")


def iso(value: datetime) -> str:
    """``value.isoformat(" ")`` (without a fraction when its microseconds are 0)."""
    text = text_of(value) if type(value) is datetime else None
    if text is None:
        return value.isoformat(" ")
    return text[:-7] if text.endswith(".000000") else text
