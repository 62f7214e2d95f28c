"""call_with_headroom: the call passes through untouched, from a frame that reserves a chunk."""

from __future__ import annotations

import resource
import sys
import traceback

import pytest

from cmbagent_otel._framestack import THRASHES, call_with_headroom

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="minor page faults counted through getrusage")


def test_arguments_result_and_exceptions_pass_through() -> None:
    marker = object()

    def target(a: object, *rest: object, key: object = None, **more: object) -> tuple[object, ...]:
        return a, rest, key, more

    assert call_with_headroom(target, (marker, 1, 2), {"key": marker, "x": 3}) == (marker, (1, 2), marker, {"x": 3})

    error = ValueError("the app's own")

    def fails() -> None:
        raise error

    with pytest.raises(ValueError) as caught:
        call_with_headroom(fails, (), {})
    assert caught.value is error
    assert traceback.extract_tb(caught.value.__traceback__)[-1].name == "fails"


def _deep(levels: int) -> int:
    return 0 if levels == 0 else _deep(levels - 1) + 1


def test_deep_recursion_inside() -> None:
    assert call_with_headroom(_deep, (900,), {}) == 900


def _boundary_faults(run: object) -> int:
    """The most minor page faults 300 calls of a small function take, over the stack depths
    0-400 under it: a depth that puts the function's frame at the base of a new frame-stack
    chunk maps and unmaps a chunk per call on CPython 3.11/3.12 (gh-142183)."""

    def leaf() -> int:
        return 1

    def at_depth(levels: int) -> int:
        if levels:
            return at_depth(levels - 1)
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(300):
            leaf()
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before

    def scan() -> int:
        return max(at_depth(levels) for levels in range(400))

    return run(scan)  # type: ignore[operator,no-any-return]


@pytest.mark.skipif(not THRASHES, reason="only CPython 3.11/3.12 free frame-stack chunks eagerly")
def test_no_chunk_thrash_under_the_call() -> None:
    plain = _boundary_faults(lambda scan: scan())
    reserved = _boundary_faults(lambda scan: call_with_headroom(scan, (), {}))
    assert plain >= 250  # the thrash this guards against is there without it: ~1 fault per call
    assert reserved < 30


def _reserving_frames() -> int:
    frame = sys._getframe()
    count = 0
    while frame is not None:
        count += frame.f_code.co_stacksize > 10_000
        frame = frame.f_back
    return count


@pytest.mark.skipif(not THRASHES, reason="only CPython 3.11/3.12 free frame-stack chunks eagerly")
def test_one_reserving_frame_per_thread() -> None:
    assert call_with_headroom(_reserving_frames, (), {}) == 1
    nested = call_with_headroom(call_with_headroom, (_reserving_frames, (), {}), {})
    assert nested == 1  # a nested call runs directly inside the first one's chunk
    assert _reserving_frames() == 0
