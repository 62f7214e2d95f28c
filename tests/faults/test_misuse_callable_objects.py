"""A workflow block decorating a callable object whose ``__call__`` is ``async def`` or a generator.

The decorator chose its wrapper from the object itself, which is neither a coroutine function
nor a generator function, so it wrapped it as a plain function: the block's span ended as soon as
the call returned the coroutine (or generator), before its body ran. The body then ran outside
the block: a ``redo`` of the step opened in it raised ``WorkflowNestingError`` (the application
broke because it was traced) and its work went under the enclosing block. The wrapper is now
chosen from ``__call__``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from cmbagent_otel import phase, redo, step, workflow


class AsyncFit:
    async def __call__(self, x: int) -> int:
        await asyncio.sleep(0)
        with redo(1, 1, "inside the step"):
            return x * 2


class Chunks:
    def __call__(self, n: int) -> Iterator[int]:
        for i in range(n):
            with redo(2, i + 1):
                yield i


class AsyncChunks:
    async def __call__(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            await asyncio.sleep(0)
            with redo(3, i + 1):
                yield i


def test_callable_objects_run_inside_their_block(provider: Any) -> None:
    fit = step(1, "fit")(AsyncFit())
    chunks = step(2, "chunks")(Chunks())
    a_chunks = step(3, "async chunks")(AsyncChunks())

    async def main() -> tuple[int, list[int]]:
        return await fit(21), [i async for i in a_chunks(2)]

    with workflow("w", max_redos=3), phase("control"):
        result = asyncio.run(main())
        listed = list(chunks(2))
    assert result == (42, [0, 1]) and listed == [0, 1]
    spans = {s.name: s for s in provider.memory.get_finished_spans()}
    for number, attempts in ((1, 1), (2, 2), (3, 2)):
        for attempt in range(1, attempts + 1):
            child = spans[f"redo step {number} attempt {attempt}"]
            assert child.parent.span_id == spans[f"step {number}"].context.span_id
