"""Pricing a LangChain Gemini call with AG2's table leaves the application's warnings alone.

AG2's ``calculate_gemini_cost`` warns about a model it has no price for. x-cmbreal20 silenced that with
``warnings.catch_warnings()`` around the call, which replaces the process's filters for its duration: any
other thread's warning meanwhile was lost (an "ignore" filter for everything), and two such calls at once
could leave the filters of one in place (catch_warnings is not thread-safe). Now AG2's function runs with
its ``warnings`` standing for a module that says nothing, and the process's filters are never touched.
"""

from __future__ import annotations

import warnings

import pytest

gemini = pytest.importorskip("autogen.oai.gemini")

from cmbagent_otel.integrations import _langchain  # noqa: E402


class _Watched(str):
    """A model name that notes the process's warning filters when AG2's table looks inside it."""

    seen: list[list[object]] = []

    def __contains__(self, part: object) -> bool:
        _Watched.seen.append(list(warnings.filters))
        return str.__contains__(self, part)  # type: ignore[operator]

    def lower(self) -> _Watched:
        _Watched.seen.append(list(warnings.filters))
        return _Watched(str.lower(self))


def test_an_unpriced_gemini_model_warns_nothing_and_leaves_the_filters_alone() -> None:
    _Watched.seen.clear()
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        during = list(warnings.filters)
        assert _langchain._gemini_cost(False, 1000, 100, [_Watched("gemini-0.0-unknown")]) is None
    assert not said, [str(w.message) for w in said]
    assert _Watched.seen, "AG2's table never looked at the model"
    assert all(filters == during for filters in _Watched.seen), "the process's warning filters changed"
    assert list(warnings.filters) == before


def test_a_priced_gemini_model_costs_what_ag2_says() -> None:
    expected = gemini.calculate_gemini_cost(False, 1000, 100, "gemini-2.5-pro")
    assert expected > 0
    assert _langchain._gemini_cost(False, 1000, 100, ["gemini-2.5-pro"]) == expected
