"""Run a workflow call with its own CPython frame-stack chunk (CPython 3.11 and 3.12 only).

CPython 3.11 and 3.12 keep Python frames in 16 KiB chunks mapped on demand and unmapped as soon
as the frame at a chunk's base returns (python/cpython gh-142183; 3.13.x and 3.14 keep a spare
chunk). A call site in a hot loop that lands exactly on a chunk boundary then maps and unmaps a
chunk on every call: two system calls and fresh page faults each time. Which call lands there
depends on the total size of the frames under it, so the frames of any wrapper (ours) move the
boundaries: in a real cmbagent ``one_shot`` run it fell on openai's lazy imports in the first
LLM call (thousands of ``inspect.signature`` calls), ~5,000 chunk map/unmap pairs and ~5,000
page faults traced against ~150 and ~2,400 plain.

:func:`call_with_headroom` calls through one frame whose size makes CPython give it a 256 KiB
chunk of which ~133 KiB stay free for the frames the call pushes, so a workflow's call stack
lives in one chunk that stays mapped until the workflow returns, whatever the wrappers under
it. The call is otherwise untouched (arguments, result and exceptions pass through; the frame
adds one line to a traceback, as every wrapper does; a frame object made of it, for a traceback
or a stack walk, is as large as the frame, ~123 KiB, once per call); on other interpreters it is
a plain call.
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Callable
from typing import Any

# CPython's push_chunk sizes a new chunk by doubling 16 KiB while it is smaller than
# 8 * (frame slots + 1,000): a frame of more than 15,384 slots gets a 256 KiB chunk. The slots
# are evaluation-stack slots, which a frame push leaves untouched (locals would be zeroed), so
# the pages above the few the call uses are never faulted in.
_SLOTS = 15_400


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return fn(*args, **kwargs)


def _with_headroom(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` with a frame of ``_SLOTS`` evaluation-stack slots (an upper bound the
    interpreter only allocates; the code uses the few it needs)."""
    code = function.__code__.replace(co_stacksize=_SLOTS)
    return types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__)


#: whether this interpreter frees frame-stack chunks eagerly (gh-142183)
THRASHES = sys.implementation.name == "cpython" and sys.version_info[:2] in ((3, 11), (3, 12))
_reserved = _with_headroom(_call) if THRASHES else _call
_inside = threading.local()  # frame stacks are per thread


def call_with_headroom(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``fn(*args, **kwargs)``; on CPython 3.11/3.12 from a frame that reserves a 256 KiB
    frame-stack chunk, unless this thread is already inside such a call (a nested workflow
    entry: a second reserving frame could land inside the first chunk and use up its room)."""
    if not THRASHES or getattr(_inside, "active", False):
        return fn(*args, **kwargs)
    _inside.active = True
    try:
        return _reserved(fn, args, kwargs)
    finally:
        _inside.active = False
