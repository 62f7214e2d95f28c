"""A ``with`` block that sets a context variable and resets it with no signal-handler window.

A ``contextlib.contextmanager`` that sets a variable leaves it set for good when a ``KeyboardInterrupt`` lands as
its generator yields to ``__enter__`` (the ``next()``'s return there, a point where a signal handler runs) or as
its ``__exit__`` (a Python function) is entered: the ``with`` statement never reaches the generator's ``finally``,
which runs only when the suspended generator is collected, after whatever holds the interrupt's traceback lets it
go (an interactive session keeps the last one: ``sys.last_traceback``, a notebook's next cells). Our statements'
suppression of instrumentation stayed on in the application's thread (its SQLAlchemy, HTTP and model-call spans
no longer made), a database deadline stayed passed (every write of ours in that thread spilled at once).

:class:`VarSet`'s ``__exit__`` is C code from start to end: ``io.IOBase.__exit__`` calls the instance's
``close``, here a ``deque`` consuming the ``map`` of the reset over the tokens taken, so nothing runs in Python
between the ``with`` statement's exit and the reset. Its ``__enter__`` stores the token by the same C call that
sets the variable, inside a ``try`` that resets it on any exception (an interrupt as that call returns).
"""

from __future__ import annotations

import collections
import functools
import io
import itertools
from collections.abc import Callable, Iterator
from typing import Any


class VarSet(io.IOBase):
    """``with VarSet(set, reset, value):`` ``set(value)`` inside the block (``ContextVar.set`` or another C
    callable returning a token), ``reset(token)`` when the block is left, however it is left, then ``then(token)``
    (Python code may run there: what must not be skipped goes into ``reset``); the block's exception propagates
    unchanged (the exit returns an empty, false, ``deque``). One entry per object."""

    def __init__(self, set_: Callable[[Any], Any], reset: Callable[[Any], Any], value: Any,
                 then: Callable[[Any], Any] | None = None) -> None:
        super().__init__()
        self._set = set_
        self._value = value
        tokens: list[Any] = []
        self._tokens = tokens
        # io.IOBase.__exit__ (C) calls it; the maps read the list when they run, once (a second call does nothing,
        # the one the finaliser makes too)
        undo: Iterator[Any] = map(reset, tokens)
        if then is not None:
            undo = itertools.chain(undo, map(then, tokens))
        self.close = functools.partial(collections.deque, undo, 0)  # type: ignore[method-assign]

    def __enter__(self) -> VarSet:
        try:
            self._tokens.extend(map(self._set, (self._value,)))
        except BaseException:  # Ctrl-C as the set returned: the block is not entered, its exit never runs
            self.close()
            raise
        return self
