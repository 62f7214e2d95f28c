"""instrument() called after a large application was imported does not pull a full collection
of the application's heap into its run (src/cmbagent_otel/_gcquiet.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cmbagent_otel.dag.database import upgrade

# An application with a large long-lived heap imports AG2, then calls instrument(); afterwards
# it promotes objects of its own, fewer than a full collection needs by itself (a quarter of
# the long-lived objects) but more than that once instrument()'s ~40,000 objects are added.
# Explicit young collections flush survivors into the oldest generation's "promoted" count and
# raise its collection counter, so that the automatic collections of the last allocations
# decide on that count alone.
APP = textwrap.dedent("""
    import gc, json, sys, threading
    heap = [[] for _ in range(400_000)]
    import autogen  # noqa: F401
    gc.collect()
    long_lived = len(gc.get_objects())
    import cmbagent_otel
    cmbagent_otel.instrument()
    for thread in threading.enumerate():
        if thread.name == "cmbagent-otel-schema":
            thread.join()
    full = []
    gc.callbacks.append(lambda phase, info: full.append(1) if phase == "stop" and info["generation"] == 2 else None)
    promoted = [[] for _ in range(long_lived // 4 - 20_000)]
    for _ in range(12):
        gc.collect(1)
    more = [[] for _ in range(3_000)]  # the first automatic collection decides
    print(json.dumps({"full_collections": len(full), "long_lived": long_lived}))
""")

GENERATIONAL = sys.implementation.name == "cpython" and sys.version_info[:2] < (3, 14)


@pytest.mark.skipif(not GENERATIONAL, reason="CPython's generational collector (3.10-3.13) only")
def test_instrument_after_a_large_import_adds_no_full_collection(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    upgrade(url)  # at head: instrument() checks the version with one query, as in a second run
    env = {**os.environ, "CMBAGENT_OTEL_DATABASE_URL": url, "OTEL_TRACES_EXPORTER": "cmbagent_dag"}
    out = subprocess.run([sys.executable, "-c", APP], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["long_lived"] > 400_000
    assert result["full_collections"] == 0, result


APP_SETTINGS = textwrap.dedent("""
    import gc, json
    heap = [[] for _ in range(50_000)]
    gc.freeze()  # the pre-fork pattern: the application's heap stays out of every collection
    frozen = gc.get_freeze_count()
    gc.disable()
    import cmbagent_otel
    cmbagent_otel.instrument()
    print(json.dumps({"frozen_before": frozen, "frozen_after": gc.get_freeze_count(), "enabled": gc.isenabled()}))
""")


def test_instrument_leaves_the_applications_collector_settings_alone(tmp_path: Path) -> None:
    env = {**os.environ, "CMBAGENT_OTEL_DATABASE_URL": f"sqlite:///{tmp_path / 'runs.db'}"}
    out = subprocess.run([sys.executable, "-c", APP_SETTINGS], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["frozen_before"] >= result["frozen_after"] > 50_000  # never unfrozen (frozen objects may die)
    assert result["enabled"] is False


APP_FIRST_LINE = textwrap.dedent("""
    import gc, json
    import cmbagent_otel
    cmbagent_otel.instrument()  # the program's first line: instrument() imports AG2 itself
    print(json.dumps({"full_collections": gc.get_stats()[2]["collections"]}))
""")


@pytest.mark.skipif(not GENERATIONAL, reason="CPython's generational collector (3.10-3.13) only")
def test_instrument_as_the_first_line_lets_the_collector_size_the_heap(tmp_path: Path) -> None:
    """Settling AG2's own import too would leave the collector's long-lived count at the
    interpreter's startup size: the application's first full collection would come inside its run."""
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    upgrade(url)
    env = {**os.environ, "CMBAGENT_OTEL_DATABASE_URL": url}
    out = subprocess.run([sys.executable, "-c", APP_FIRST_LINE], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["full_collections"] > 0
