"""``with`` blocks whose exit is C code: no signal-handler window between leaving the block and its undoing.

A ``contextlib.contextmanager`` leaves what it set up in place when a ``KeyboardInterrupt`` lands as its generator
yields to ``__enter__`` (the ``next()``'s return there, a point where a signal handler runs) or as its
``__exit__`` (a Python function) is entered: the ``with`` statement never reaches the generator's ``finally``,
which runs only when the suspended generator is collected, after whatever holds the interrupt's traceback lets it
go (an interactive session keeps the last one: ``sys.last_traceback``, a notebook's next cells). Our statements'
suppression of instrumentation stayed on in the application's thread (its spans no longer made), a database
deadline stayed passed (every write of ours there spilled at once), our SIGTERM handler stayed deferred (the
process went on after SIGTERM), a folder's or a spill file's ``flock`` stayed held (the next wait for it ran out
its bound).

:class:`CExit`'s ``__exit__`` is ``io.IOBase.__exit__``, C code that calls the instance's ``close``: a subclass
sets it to a C callable (a ``functools.partial`` of a ``deque`` consuming ``map`` objects, or
:func:`~cmbagent_otel._forksafe.closer`), so nothing runs in Python between the ``with`` statement's exit and the
undoing. Its ``__enter__`` does the setting up inside a ``try`` that calls ``close`` on any exception (an
interrupt as a C call returns), each step's result stored by the C call that makes it.
"""

from __future__ import annotations

import collections
import functools
import io
import itertools
from collections.abc import Callable, Iterator
from typing import Any


class CExit(io.IOBase):
    """Base of a ``with`` block whose ``close`` (set per instance, a C callable returning a false value: what the
    exit returns, a true one would swallow the block's exception) undoes what ``__enter__`` did, once (a second
    call, the one the finaliser makes too, does nothing). One entry per object."""


class VarSet(CExit):
    """``with VarSet(set, reset, value):`` ``set(value)`` inside the block (``ContextVar.set`` or another C
    callable returning a token), ``reset(token)`` when the block is left, however it is left, then ``then(token)``
    (Python code may run there: what must not be skipped goes into ``reset``); the block's exception propagates
    unchanged (the exit returns an empty, false, ``deque``)."""

    def __init__(self, set_: Callable[[Any], Any], reset: Callable[[Any], Any], value: Any,
                 then: Callable[[Any], Any] | None = None) -> None:
        super().__init__()
        self._set = set_
        self._value = value
        tokens: list[Any] = []
        self._tokens = tokens
        # the maps read the list when they run, once
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
