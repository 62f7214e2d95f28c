"""Twenty-eighth fault campaign: the wall clock jumps (an NTP step, a VM resumed, a laptop woken)
while an instrumented app runs and exports.

The child is the suite's traced app (``app.py``) under libfaketime (Debian's ``faketime``):
``FAKETIME_TIMESTAMP_FILE`` holds the offset of its wall clock, re-read at every call
(``FAKETIME_NO_CACHE=1``), and ``FAKETIME_DONT_FAKE_MONOTONIC=1`` leaves ``CLOCK_MONOTONIC`` alone,
so only the wall clock jumps, as in a real NTP step. The parent moves the offset between the steps of
the run (the app waits for a line on stdin after each step: no sleeps). The system clock is never
touched. Without libfaketime the tests skip locally and fail under ``CI=true``
(``.ci/setup-faketime.sh`` installs it).

What is right: spans keep the wall-clock times the OpenTelemetry SDK gave them (by design), but
nothing derived from them is negative: a row's ``completed_at`` never precedes its ``started_at``
and durations are never below zero.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from cmbagent_otel.dag.database import upgrade
from cmbagent_otel.dag.writer import decode_json

from .conftest import cli, dump, read_record, read_started, reference, spawn
from .test_signal_metrics import _points, _stopped

LIBRARY_GLOBS = ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1",
                 "/usr/local/lib/faketime/libfaketime.so.1")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def faketime_library() -> str:
    """libfaketime's preload library; skips locally without it, fails under CI (the tests must run there)."""
    configured = os.environ.get("CMBAGENT_OTEL_FAKETIME_LIB", "").strip()
    if configured:
        if not Path(configured).is_file():
            pytest.fail(f"CMBAGENT_OTEL_FAKETIME_LIB={configured} is not a file")
        return configured
    for pattern in LIBRARY_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    reason = "libfaketime is not installed (bash .ci/setup-faketime.sh, or apt-get install faketime)"
    if in_ci():
        pytest.fail(f"{reason} [CI={os.environ.get('CI')}: the clock-jump tests may not be skipped]")
    pytest.skip(reason)


class Clock:
    """The wall clock of the processes started with :meth:`env`: an offset from the real one."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "faketime-offset"
        self.library = faketime_library()
        self.set(0)

    def set(self, seconds: int) -> None:
        """Move the wall clock to ``seconds`` from the real one (whole: written then renamed)."""
        part = self.path.with_name(self.path.name + ".part")
        part.write_text(f"{seconds:+d}s\n")
        os.replace(part, self.path)

    def freeze(self, at: str) -> None:
        """Stop the wall clock at ``at`` (``YYYY-MM-DD hh:mm:ss``), as freezegun or a stuck clock would."""
        part = self.path.with_name(self.path.name + ".part")
        part.write_text(f"{at}\n")
        os.replace(part, self.path)

    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": self.library, "FAKETIME_TIMESTAMP_FILE": str(self.path), "FAKETIME_NO_CACHE": "1",
                "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


@pytest.fixture
def clock(tmp_path: Path) -> Clock:
    return Clock(tmp_path)


HOUR = 3600
DAY = 24 * HOUR


def run_app(clock: Clock, url: str, spill_dir: Path, record: Path, jumps: dict[int, int], steps: int = 3,
            **settings: Any) -> str:
    """Run app.py with ``steps`` steps; after step n (flushed), the wall clock moves to ``jumps[n]``."""
    child = spawn(url, spill_dir, str(record), sync=1, steps=steps, calls=2, env=clock.env(), **settings)
    try:
        assert child.stdout.readline().strip() == "READY", child.stderr.read()
        for number in range(1, steps + 1):
            line = child.stdout.readline().split()
            assert line[:2] == ["FLUSHED", str(number)], line or child.stderr.read()
            if number in jumps:
                clock.set(jumps[number])
            child.stdin.write("go\n")
            child.stdin.flush()
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0 and "DONE" in out, err
        return err
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _stamp(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).replace(tzinfo=None)


def backwards_rows(url: str) -> Iterator[str]:
    """Rows (and row metas) whose completion precedes their start, or with a negative duration."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            for table in ("workflow_runs", "workflow_steps", "dag_nodes", "execution_events"):
                columns = [c[1] for c in conn.execute(text(f"PRAGMA table_info({table})"))]
                for row in conn.execute(text(f"SELECT * FROM {table}")).mappings():
                    where = f"{table} {row.get('id')}"
                    if "started_at" in columns:
                        start, end = _stamp(row["started_at"]), _stamp(row["completed_at"])
                        if start is not None and end is not None and end < start:
                            yield f"{where}: completed_at {end} < started_at {start}"
                    if (row.get("duration_ms") or 0) < 0:
                        yield f"{where}: duration_ms {row['duration_ms']}"
                    meta = decode_json(row.get("meta")) if "meta" in columns else None
                    if isinstance(meta, dict):
                        start, end = _stamp(meta.get("started_at")), _stamp(meta.get("completed_at"))
                        if start is not None and end is not None and end < start:
                            yield f"{where} meta: completed_at {end} < started_at {start}"
                        if (meta.get("duration_ms") or 0) < 0:
                            yield f"{where} meta: duration_ms {meta['duration_ms']}"
    finally:
        engine.dispose()


def test_a_run_the_clock_jumps_back_in_has_no_row_ending_before_it_starts(tmp_path: Path, clock: Clock) -> None:
    url = f"sqlite:///{tmp_path}/cmbagent.db"
    upgrade(url)
    run_app(clock, url, tmp_path / "spill", tmp_path / "record.jsonl", {1: -HOUR})
    spans, _ = read_record(tmp_path / "record.jsonl")
    assert any(s.end_time < s.start_time for s in spans)  # the jump happened inside the workflow span
    assert list(backwards_rows(url)) == []


def test_spill_files_written_across_a_jump_back_replay_to_the_same_tables(tmp_path: Path, clock: Clock) -> None:
    """The database is unreachable for the whole run (its folder is a file): every batch is spilled,
    some before the jump and some after (their names, by the wall clock, now sort before the first
    ones). Replayed once the database is back, the tables are those of one direct write."""
    folder = tmp_path / "db"
    folder.write_text("not a folder")
    url = f"sqlite:///{folder}/cmbagent.db"
    spill_dir, record = tmp_path / "spill", tmp_path / "record.jsonl"
    run_app(clock, url, spill_dir, record, {1: -HOUR, 2: -2 * HOUR}, timeout=0.5)
    files = sorted(p.name for p in spill_dir.iterdir())
    assert len(files) >= 3, files
    folder.unlink()
    folder.mkdir()
    upgrade(url)
    replay = cli("--db", url, "replay", "--spill-dir", str(spill_dir))
    assert replay.returncode == 0, replay.stderr
    assert list(spill_dir.iterdir()) == []
    spans, _ = read_record(record)
    assert dump(url) == reference(spans, f"sqlite:///{tmp_path}/reference.db", read_started(record))


def test_the_clock_helper_moves_only_the_wall_clock(tmp_path: Path, clock: Clock) -> None:
    """The harness itself: a child's wall clock follows the file, its monotonic clock does not."""
    script = ("import sys, time\n"
              "w, m = time.time(), time.monotonic()\n"
              "print('A', flush=True); sys.stdin.readline()\n"
              "print(round(time.time() - w), round(time.monotonic() - m), flush=True)\n")
    child = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, **clock.env()},
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "A"
    clock.set(-HOUR)
    out, _ = child.communicate("go\n", timeout=60)
    assert out.split() == [str(-HOUR), "0"]


@pytest.mark.parametrize("jump", [DAY, -HOUR], ids=["forward-a-day", "back-an-hour"])
def test_durations_a_signal_records_after_a_jump_are_the_monotonic_ones(tmp_path: Path, clock: Clock,
                                                                         jump: int) -> None:
    """SIGTERM ends the open run and step and records their duration metrics (fourteenth campaign). On
    f5cad67 those durations were the wall clock's: a day long after a jump forward (a VM resumed, then
    stopped), zero after a jump back. Their owners time them with ``perf_counter``; so does the handler."""
    code, documents = _stopped(tmp_path, signal.SIGTERM, clock.env(), lambda: clock.set(jump))
    assert code == -signal.SIGTERM
    for name in ("cmbagent.workflow.duration", "cmbagent.step.duration", "gen_ai.workflow.duration"):
        points = _points(documents, name)
        assert points, name
        assert all(0 < point["sum"] < HOUR for point in points), (name, points)


EXTERNAL_CALL = """
import json, sys
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
import cmbagent.vlm_utils as vlm_utils
import cmbagent_otel
reader = InMemoryMetricReader()
cmbagent_otel.instrument(tracer_provider=TracerProvider(), meter_provider=MeterProvider(metric_readers=[reader]),
                         set_global=False, instrument_threading=False)
with cmbagent_otel.workflow("plot review"):
    vlm_utils.generate_llm_scientific_criteria("a CMB power spectrum")
print(json.dumps([point.sum for resource in reader.get_metrics_data().resource_metrics
                  for scope in resource.scope_metrics for metric in scope.metrics
                  if metric.name == "gen_ai.client.operation.duration" for point in metric.data.data_points]))
"""


def test_an_external_model_call_the_clock_jumps_in_has_its_monotonic_duration(tmp_path: Path, clock: Clock) -> None:
    """cmbagent's own model calls outside AG2 (its VLM's criteria call, here the real
    ``generate_llm_scientific_criteria`` with the real ``openai`` client) get a ``chat`` span and the GenAI
    duration metric. On f5cad67 the duration was the wall clock's: the clock moved forward a day while the
    model answered, and the call took a day. The model server moves it (no sleep)."""
    pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12): ./dev test runs "
                        "this test in its cmbagent_autogen run")
    from cmbagent_otel.testing import FakeOpenAIServer
    from tests.reliability.test_attack5_credential_sources import _echoing

    echo = _echoing(fail=False)

    def answer(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        clock.set(DAY)  # while the call is in flight
        return echo(body, headers)

    with FakeOpenAIServer(raw_responder=answer) as server:
        env = {**os.environ, **clock.env(), "OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "sk-test-clock"}
        env.pop("OTEL_SDK_DISABLED", None)
        # run in tmp_path (whatever the call leaves there), importing the code under test
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                            if p)
        done = subprocess.run([sys.executable, "-c", EXTERNAL_CALL], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    durations = json.loads(done.stdout.strip().splitlines()[-1])
    assert durations and all(0 < seconds < HOUR for seconds in durations), durations


SPILL_TWICE = """
import sys
from cmbagent_otel.spill import SpillStore
from tests.faults.conftest import plan_run_spans
spans = plan_run_spans("frozen clock", steps=1)
for half in (spans[:2], spans[2:]):  # two exporters' stores of one process (an instrument() each), one target
    SpillStore(sys.argv[1], target="sqlite:///x.db").append(half)
print(len(spans))
"""


def test_spill_files_of_a_process_never_share_a_name_when_the_clock_stands_still(tmp_path: Path,
                                                                                 clock: Clock) -> None:
    """A spill file's name was its wall-clock time, the pid and a count of its store: two stores of one
    process (a DAG exporter per ``instrument()``) writing in the same nanosecond of a stopped wall clock
    (freezegun in an app's tests, a clock stepped back onto a used time, a coarse clock) made the same name,
    and the second file replaced the first: its spans were lost without a word. The count is the process's
    now."""
    clock.freeze("2026-12-02 12:00:00")
    env = {**os.environ, **clock.env()}
    done = subprocess.run([sys.executable, "-c", SPILL_TWICE, str(tmp_path / "spill")], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    from cmbagent_otel.spill import SpillStore

    store = SpillStore(tmp_path / "spill")
    assert sum(len(store.read(path)) for path in store.pending()) == int(done.stdout.split()[-1])
