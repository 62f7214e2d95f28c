"""The speaker selection in one frame of ours (issue 13, session 43).

``_specialise`` gains what the generated selection wrapper needs: ``specialiser`` (free parameters bound per
copy, ``*args``/``**kwargs`` kept) and a helper's results written straight into the caller's names when no
``try`` around the call reads them on failure.
"""

from __future__ import annotations

from typing import Any

import pytest

from cmbagent_otel import _specialise
from cmbagent_otel._specialise import specialise, specialiser

# _specialise: what the generated selection wrapper needed


def _pair(x: Any, n: int) -> tuple[Any, int]:
    second = n + 1
    first = x * 2
    return first, second


def _before_the_try(x: Any, n: int, flag: bool) -> Any:
    a, b = _pair(x, n)  # outside any try: no handler can see its partial work
    try:
        c = a // n
    except ZeroDivisionError:
        return ("failed", a, b)  # reads a and b, but only for what the try runs
    return (c, b, flag)


def test_a_helper_written_in_outside_any_try_returns_straight_into_its_targets() -> None:
    """A ``try`` later in the caller whose handler reads the targets does not keep a copy at the helper's end:
    only a ``try`` around the call could show the helper's partial work."""
    made = specialise(_before_the_try, "made", {"flag": True}, inline=(_pair,))
    assert not {"_pair_first", "_pair_second"} & set(made.__code__.co_varnames), made.__code__.co_varnames
    assert made(3, 4) == _before_the_try(3, 4, True) == (1, 5, True)
    assert made(3, 0) == _before_the_try(3, 0, True) == ("failed", 6, 1)


def _wrapped(bound: Any, offset: int, self: Any, *args: Any, **kwargs: Any) -> Any:
    return bound(self, offset, *args, **kwargs)


def test_free_parameters_are_bound_per_copy_and_star_arguments_kept() -> None:
    """``specialiser``: one generated code, a closure per copy binding the free parameters; ``*args`` and
    ``**kwargs`` passed on; where the source cannot be read, the copies call the function with the same result."""
    def collect(*args: Any, **kwargs: Any) -> Any:
        return args, kwargs

    make = specialiser(_wrapped, "copy", ("bound", "offset"))
    one, two = make(collect, 1), make(collect, 2)
    assert one.__code__ is two.__code__ and one.__name__ == "copy"
    assert one("s", 3, k=4) == _wrapped(collect, 1, "s", 3, k=4) == (("s", 1, 3), {"k": 4})
    assert two("s") == (("s", 2), {})
    with pytest.raises(TypeError):
        make(collect)
    namespace: dict[str, Any] = {}
    exec("def unreadable(bound, offset, self, *args, **kwargs):\n"
         "    return bound(self, offset, *args, **kwargs)\n", namespace)
    fallback = specialiser(namespace["unreadable"], "copy", ("bound", "offset"))(collect, 5)
    assert fallback("s", 3, k=4) == (("s", 5, 3), {"k": 4})
    reference = _specialise._calling(namespace["unreadable"], "copy", {"bound": collect, "offset": 6})
    assert reference("s", k=1) == (("s", 6), {"k": 1})
