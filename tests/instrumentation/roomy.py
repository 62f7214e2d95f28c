"""An AG2 agent whose id is reliably given to the next one made after it is freed."""

from __future__ import annotations

from autogen import ConversableAgent


class RoomyAgent(ConversableAgent):  # type: ignore[misc]
    """An agent over 512 bytes: the C allocator (not pymalloc's pools, shared with every small object)
    gives a block freed by one of these straight back to the next one made, so ids are reused at once."""

    __slots__ = tuple(f"_room{index}" for index in range(80))
