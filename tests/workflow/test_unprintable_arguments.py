"""workflow()/phase()/step()/redo() never raise because str() of an argument raises; they
still raise ValueError/WorkflowNestingError for documented bad input."""

from __future__ import annotations

import pytest

from cmbagent_otel import phase, redo, step, workflow
from cmbagent_otel.workflow import WorkflowNestingError


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    __repr__ = __str__
    __format__ = lambda self, spec: self.__str__()  # noqa: E731


class HostileStr(str):
    def __str__(self) -> str:
        raise RuntimeError("hostile str")

    def __format__(self, spec: str) -> str:
        raise RuntimeError("hostile format")

    def __hash__(self) -> int:
        raise RuntimeError("hostile hash")


class HostileInt(int):
    def __str__(self) -> str:
        raise RuntimeError("hostile int")

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        raise RuntimeError("hostile format")


class HostileMapping(dict):
    def items(self):
        raise RuntimeError("hostile mapping")

    def keys(self):
        raise RuntimeError("hostile mapping")

    def __iter__(self):
        raise RuntimeError("hostile mapping")


def test_unprintable_arguments_never_raise_and_the_run_is_traced(capture):
    ran = []
    with workflow(Unprintable(), mode=Unprintable(), task=Unprintable(), agent=HostileStr("planner"),
                  model=Unprintable(), work_dir=Unprintable(), task_id=HostileInt(7), max_redos=HostileInt(2),
                  session_id=HostileStr("s1"), attributes=HostileMapping(a=1)), \
            phase(HostileStr("control"), attributes={"k": HostileStr("v")}), \
            step(HostileInt(1), Unprintable(), agent=Unprintable(), attributes={"n": HostileInt(3)}) as s:
        s.set_summary(Unprintable())
        with redo(HostileInt(1), HostileInt(1), hypothesis=Unprintable()):
            ran.append("redo")
        with pytest.raises(WorkflowNestingError), redo(1, 3):  # max_redos=2 still counts
            pass
    assert ran == ["redo"]
    names = [s.name for s in capture.spans]
    assert "phase control" in names and "step 1" in names and "redo step 1 attempt 1" in names
    run = capture.one("workflow <unprintable Unprintable>")
    assert run.attributes["cmbagent.workflow.agent"] == "planner"
    assert run.attributes["cmbagent.session.id"] == "s1"
    step_span = capture.one("step 1")
    assert step_span.attributes["cmbagent.step.goal"] == "<unprintable Unprintable>"
    assert step_span.attributes["n"] == 3 and type(step_span.attributes["n"]) is int
    assert capture.one("phase control").attributes["k"] == "v"


@pytest.mark.parametrize("make", [
    lambda: step(0), lambda: step(True), lambda: step("1"), lambda: redo(1, 0), lambda: redo(Unprintable(), 1),
    lambda: phase(""), lambda: phase(Unprintable()), lambda: step(HostileInt(-1)),
])
def test_documented_bad_input_still_raises_value_error(make):
    with pytest.raises(ValueError):
        make()


def test_nesting_errors_still_raise(capture):
    with pytest.raises(WorkflowNestingError), phase(HostileStr("control")):
        pass
