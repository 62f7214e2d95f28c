"""``SystemExit`` leaving a block: a clean exit code (0, None) ends it like a return, any other code fails it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

from cmbagent_otel import phase, step, workflow


@pytest.mark.parametrize("code", [0, None, False])
def test_a_clean_exit_code_is_no_failure(capture: Any, code: Any) -> None:
    with pytest.raises(SystemExit) as raised, workflow("w"), phase("control"), step(1, "exit"):
        raise SystemExit(code)
    assert raised.value.code == code  # the app's exception, unchanged
    for name in ("workflow w", "phase control", "step 1"):
        span = capture.one(name)
        assert span.status.status_code is StatusCode.UNSET, name
        assert not [e for e in span.events if e.name == "exception"], name


@pytest.mark.parametrize("code", [1, 2, "fatal: no data"])
def test_a_failing_exit_code_fails_every_block_it_leaves(capture: Any, code: Any) -> None:
    with pytest.raises(SystemExit), workflow("w"), phase("control"), step(1, "exit"):
        raise SystemExit(code)
    for name in ("workflow w", "phase control", "step 1"):
        span = capture.one(name)
        assert span.status.status_code is StatusCode.ERROR, name
        (event,) = [e for e in span.events if e.name == "exception"]
        assert event.attributes["exception.type"] == "SystemExit"


def test_keyboard_interrupt_is_a_failure(capture: Any) -> None:
    with pytest.raises(KeyboardInterrupt), workflow("w"):
        raise KeyboardInterrupt
    assert capture.one("workflow w").status.status_code is StatusCode.ERROR


def test_decorated_function_and_generator_exiting_cleanly(capture: Any) -> None:
    @workflow("decorated")
    def run() -> None:
        sys.exit(0)

    @step(1, "gen")
    def produce() -> Iterator[int]:
        yield 1
        sys.exit()

    with pytest.raises(SystemExit):
        run()
    with workflow("outer"), phase("control"), pytest.raises(SystemExit):
        list(produce())
    assert capture.one("workflow decorated").status.status_code is StatusCode.UNSET
    assert capture.one("step 1").status.status_code is StatusCode.UNSET
