"""``_forksafe.append_pruned`` (the registry of locks reset in a child, and ``_forkexport``'s of exporters): objects
that are gone are dropped, once per doubling."""

from __future__ import annotations

import gc
import threading
import weakref

from cmbagent_otel import _forksafe


class _Owner:
    def __init__(self) -> None:
        self.lock = threading.Lock()


def test_a_registry_of_objects_gone_stays_bounded_and_keeps_the_living() -> None:
    items: list[weakref.ref[_Owner]] = []
    prune_at = [64]
    living = [_Owner() for _ in range(10)]
    for owner in living:
        _forksafe.append_pruned(items, weakref.ref(owner), prune_at)
    for _ in range(1000):
        _forksafe.append_pruned(items, weakref.ref(_Owner()), prune_at)  # gone at once (no cycle)
    assert len(items) <= 64
    assert prune_at[0] == 64
    assert all(any(ref() is owner for ref in items) for owner in living)


def test_pruning_waits_for_twice_what_the_last_pruning_kept() -> None:
    items: list[tuple[weakref.ref[_Owner], str]] = []
    prune_at = [64]
    living = [_Owner() for _ in range(100)]
    for owner in living:
        _forksafe.append_pruned(items, (weakref.ref(owner), "lock"), prune_at, lambda item: item[0])
    assert len(items) == 100
    assert prune_at[0] == 128  # pruned once, at 64, keeping 64 alive: next at twice that


def test_the_packages_registries_drop_owners_that_are_gone() -> None:
    gc.collect()
    before = len(_forksafe._owners)
    for _ in range(3000):
        _forksafe.reset_in_child(_Owner(), "lock")
    assert len(_forksafe._owners) <= max(64, 2 * before) + 1
