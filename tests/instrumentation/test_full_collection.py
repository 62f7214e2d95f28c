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


def _instrumentation_loads_pkg_resources() -> bool:
    """opentelemetry-instrumentation 0.48b0 (the oldest pyproject allows) imports pkg_resources with
    its instrumentor base: ~9,000 long-lived objects more at import, which are not ours to avoid."""
    import inspect

    from opentelemetry.instrumentation import dependencies

    return "pkg_resources" in inspect.getsource(dependencies)


@pytest.mark.skipif(not GENERATIONAL, reason="CPython's generational collector (3.10-3.13) only")
@pytest.mark.skipif(_instrumentation_loads_pkg_resources(),
                    reason="this opentelemetry-instrumentation imports pkg_resources (~9,000 objects more)")
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


# The same application without and with instrument() at one point: its heap (AG2, cmbagent_otel
# imported: only instrument()'s own work differs) is brought to a set distance below its next
# full collection (SHORT objects), with generation 2's count past its threshold, and holds YOUNG
# young long-lived objects when instrument() is (or would be) called; then it allocates RUN
# long-lived objects (and, with FLUSH, promotes them explicitly) and a few thousand more, whose
# automatic collections decide. Counted: full collections from instrument() on.
APP_PAIR = textwrap.dedent("""
    import gc, json, sys, threading
    heap = [[] for _ in range(400_000)]
    import autogen  # noqa: F401
    import cmbagent_otel
    gc.collect()
    long_lived = len(gc.get_objects())
    traced, short, young_count, run_count, flush = json.loads(sys.argv[1])
    promoted = [[] for _ in range(long_lived // 4 - short)]
    for _ in range(12):
        gc.collect(1)  # counted as promoted; generation 2's count past its threshold
    young = [[] for _ in range(young_count)]  # in the young generations at instrument() time
    full = []
    gc.callbacks.append(lambda phase, info: full.append(1) if phase == "stop" and info["generation"] == 2 else None)
    if traced:
        cmbagent_otel.instrument()
        for thread in threading.enumerate():
            if thread.name == "cmbagent-otel-schema":
                thread.join()
    run = [[] for _ in range(run_count)]
    if flush:
        for _ in range(12):
            gc.collect(1)
    more = [[] for _ in range(3_000)]
    print(json.dumps({"full_collections": len(full)}))
""")


@pytest.mark.skipif(not GENERATIONAL, reason="CPython's generational collector (3.10-3.13) only")
@pytest.mark.parametrize(("short", "young", "run", "flush"), [
    # a full collection due 5,000 promotions on: gc.freeze() zeroed generation 2's count, and
    # instrument() used to postpone it by eleven generation-1 collections (none in 20,000 allocations)
    (5_000, 0, 20_000, False),
    # 6,000 of the application's long-lived objects still young at instrument(): they used to move
    # into the oldest generation uncounted, which postponed its full collection past the run
    (8_000, 6_000, 4_000, True),
], ids=["due", "young"])
def test_instrument_leaves_the_applications_full_collections_where_they_were(
        tmp_path: Path, short: int, young: int, run: int, flush: bool) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    upgrade(url)
    env = {**os.environ, "CMBAGENT_OTEL_DATABASE_URL": url, "OTEL_TRACES_EXPORTER": "cmbagent_dag"}
    counts = {}
    for traced in (False, True):
        out = subprocess.run([sys.executable, "-c", APP_PAIR, json.dumps([traced, short, young, run, flush])],
                             env=env, capture_output=True, text=True, timeout=300, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        counts[traced] = json.loads(out.stdout.strip().splitlines()[-1])["full_collections"]
    assert counts == {False: 1, True: 1}, counts  # plain: 1, the collection the scenario sets up


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
