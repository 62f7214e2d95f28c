"""A workflow block decorating a ``classmethod`` or ``staticmethod`` object.

``@step(1)`` written above ``@classmethod`` receives the ``classmethod`` object, not a function:
before, the wrapper called it, which raises ``TypeError: 'classmethod' object is not callable``
on every call, so the application's method broke only because it was traced (the same method
without the block works). The block now wraps the function inside and gives back a
``classmethod``/``staticmethod`` of the wrapper, so the call binds as written and opens its span.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from cmbagent_otel import phase, step, workflow


class Pipeline:
    tag = "pipe"

    @step(1, "class method")
    @classmethod
    def load(cls, x: int) -> tuple[str, int]:
        return cls.tag, x

    @step(2, "static method")
    @staticmethod
    def fit(x: int) -> int:
        return x * 2

    @step(3, "async class method")
    @classmethod
    async def a_load(cls, x: int) -> tuple[str, int]:
        await asyncio.sleep(0)
        return cls.tag, x

    @step(4, "generator class method")
    @classmethod
    def chunks(cls, n: int) -> Iterator[str]:
        for i in range(n):
            yield f"{cls.tag}{i}"

    @step(5, "async generator static method")
    @staticmethod
    async def a_chunks(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @phase("control")
    @classmethod
    def control(cls) -> str:
        return cls.tag


class Child(Pipeline):
    tag = "child"


def test_blocks_over_classmethods_and_staticmethods_bind_as_written(provider: Any) -> None:
    async def async_calls() -> tuple[Any, Any]:
        return await Child.a_load(3), [i async for i in Pipeline.a_chunks(2)]

    with workflow("w"):
        with phase("p"):
            results = [Pipeline.load(1), Child().load(1), Pipeline.fit(2), Pipeline().fit(2),
                       list(Child.chunks(2)), asyncio.run(async_calls())]
        control = Child.control()
    assert results == [("pipe", 1), ("child", 1), 4, 4, ["child0", "child1"], (("child", 3), [0, 1])]
    assert control == "child"
    names = sorted(s.name for s in provider.memory.get_finished_spans())
    assert names == sorted(["workflow w", "phase p", "phase control", "step 1", "step 1", "step 2", "step 2",
                            "step 3", "step 4", "step 5"])
    assert isinstance(Pipeline.__dict__["load"], classmethod)
    assert isinstance(Pipeline.__dict__["fit"], staticmethod)
    assert Pipeline.__dict__["load"].__func__.__name__ == "load"
