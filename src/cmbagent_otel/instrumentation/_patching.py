"""One body per wrapper for both ways a method is patched.

A class method is patched with a plain function, the wrapper's body calling ``original(self, ...)``
(``method_for(original)``; see ``ag2._plain_method``). What keeps a wrapt proxy (module functions,
late patches, another instrumentation's proxy underneath) gets a wrapt-style wrapper built from
the same ``method_for`` here, so the two never drift apart. That path is cold (a workflow's entry,
a custom executor), so the adaptor object and closure it builds per call do not matter.

Both kinds carry their cycle's state (``_cmbagent_otel``) and ``__wrapped__``: :func:`unwrap_ours` takes one
cycle's wrapper out of a chain of them (the AG2 instrumentation's and the cmbagent integration's
``uninstrument``).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import wrapt

# What every wrapt wrapper is an instance of. wrapt 2 moved the proxy machinery into BaseObjectProxy:
# its FunctionWrapper is no longer a wrapt.ObjectProxy (which only adds iteration on top), so a test
# against ObjectProxy missed every wrapper and uninstrument() left ours in place.
PROXY: type = getattr(wrapt, "BaseObjectProxy", wrapt.ObjectProxy)


class _BoundCall:
    """wrapt's ``wrapped`` (already bound) as the ``original`` a ``method_for`` body calls with
    ``self`` first; binding it again (``original.__get__``) gives ``wrapped`` back."""

    __slots__ = ("wrapped",)

    def __init__(self, wrapped: Callable[..., Any]) -> None:
        self.wrapped = wrapped

    def __call__(self, _instance: Any, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped(*args, **kwargs)

    def __get__(self, instance: Any, owner: Any = None) -> Callable[..., Any]:
        return self.wrapped


def wrapt_wrapper(method_for: Callable[[Any], Callable[..., Any]], state: Any) -> Callable[..., Any]:
    """A wrapt-style ``wrapper(wrapped, instance, args, kwargs)`` running ``method_for``'s body, which
    also patches plain methods (``wrapper._method_for``)."""
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not state.active:
            return wrapped(*args, **kwargs)
        return method_for(_BoundCall(wrapped))(instance, *args, **kwargs)

    wrapper._cmbagent_otel = state  # type: ignore[attr-defined]
    wrapper._method_for = method_for  # type: ignore[attr-defined]
    return wrapper


def defining_class(cls: Any, name: str) -> type | None:
    """The class of ``cls``'s MRO whose own namespace holds ``name``: the one to patch so that ``cls`` and
    every class inheriting the attribute from there run the wrapper (``None``: none does, or ``cls`` is no
    class). A subclass that only inherits the method has nothing of its own to patch: an application's
    adaptation of cmbagent's ``CMBAgent`` rebound in its module lost every step span that way."""
    if not isinstance(cls, type):
        return None
    return next((c for c in cls.__mro__ if name in vars(c)), None)


def state_of(node: Any) -> Any:
    """The state (``ag2._State``, the cmbagent integration's) a wrapper of ours (wrapt, or a plain-function
    wrapper) belongs to (``None``: not ours)."""
    if type(node) is types.FunctionType:  # never through a proxy: it would answer for what it wraps
        return vars(node).get("_cmbagent_otel")
    return getattr(getattr(node, "_self_wrapper", None), "_cmbagent_otel", None)


def is_link(node: Any) -> bool:
    """Whether ``node`` is a link of a wrapper chain: a wrapt wrapper, or a plain-function wrapper of ours."""
    return isinstance(node, PROXY) or (type(node) is types.FunctionType
                                                   and "_cmbagent_otel" in vars(node))


def unwrap_ours(owner: Any, attr: str, state: Any) -> None:
    """Remove the wrapper ``state``'s cycle installed on ``owner.attr`` and only that one, wherever it
    is in the chain: a wrapper applied after ours stays (it then wraps what ours wrapped), one
    applied before stays inside."""
    current = vars(owner).get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
    parent = None
    node = current
    for _ in range(32):
        if not is_link(node) or (parent is not None and not isinstance(parent, PROXY)):
            return  # not there any more (someone else restored the original): nothing of ours to remove
        if state_of(node) is state:
            if parent is None:
                setattr(owner, attr, node.__wrapped__)
            else:
                parent.__wrapped__ = node.__wrapped__
            return
        parent, node = node, node.__wrapped__
