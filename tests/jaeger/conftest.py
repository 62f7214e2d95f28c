"""Every test here runs the real Jaeger v2 binary (marker ``jaeger``); see support.py."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/jaeger/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.jaeger)
