"""SIGTERM while the main thread itself exports a batch (fourteenth fault campaign).

Our SIGTERM/SIGHUP handler runs in the main thread. When the signal came while the main thread
was exporting (its own ``force_flush``, ``uninstrument()``, a ``multiprocessing`` child's flush
at its exit), the export stopped half-way, the handler's flush (from another thread) waited for
the export lock the main thread held until its deadline, and the process ended without the
batch. The handler now waits for such an export to finish (no application code runs in between)
and then does its work; the process still ends by the signal. The exporter is the application's
own, behind the SDK's batch processor: it tells the test when it is exporting, and blocks until
the test has sent the signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

APP = textwrap.dedent('''
    import sys
    import cmbagent_otel
    from cmbagent_otel import phase, step, workflow
    from cmbagent_otel._spans import TracedSpan
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Told(SpanExporter):
        def export(self, spans):
            print("EXPORTING", flush=True)
            sys.stdin.readline()  # the test sends SIGTERM now, then a line
            with open(sys.argv[1], "a") as record:
                record.writelines(f"{span.name}\\n" for span in spans)
            return SpanExportResult.SUCCESS

    provider = cmbagent_otel.instrument(exporters="none", span_exporters=[Told()], instrument_cmbagent=False,
                                        instrument_threading=False)
    with workflow("flushed", mode="one-shot"), phase("control"), step(1, "fit"):
        for call in range(3):
            with TracedSpan(f"chat m{call}", "llm", {"gen_ai.request.model": "m"}):
                pass
    provider.force_flush()
    print("APPLICATION CODE AFTER THE FLUSH", flush=True)
''')


def test_a_sigterm_during_the_main_threads_export_waits_for_it(tmp_path: Path) -> None:
    record = tmp_path / "exported.txt"
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "600000", "CMBAGENT_OTEL_EXPORT_TIMEOUT": "1"}
    env.pop("OTEL_SDK_DISABLED", None)
    proc = subprocess.Popen([sys.executable, "-c", APP, str(record)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline().strip() == "EXPORTING", proc.communicate(timeout=60)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == -signal.SIGTERM  # still ended by the signal
    assert "APPLICATION CODE" not in out and "Traceback" not in err, (out, err)
    exported = record.read_text().splitlines() if record.exists() else []
    assert len(exported) == 6 and sum(name.startswith("chat m") for name in exported) == 3, exported  # was none


FORKED = textwrap.dedent('''
    import os, signal, threading
    import cmbagent_otel
    from cmbagent_otel import _termination
    cmbagent_otel.instrument(exporters="none", instrument_cmbagent=False, instrument_threading=False)
    child = []
    ready, tell = os.pipe()

    def forker():
        pid = os.fork()
        if pid == 0:
            os.write(tell, b"r")  # past its fork hooks: the SIGTERM comes after them
            signal.pause()  # returns once a handler has run; our handler ends the process first
            os._exit(0)
        child.append(pid)

    with _termination.signals_deferred():  # the main thread flushes while another thread forks
        thread = threading.Thread(target=forker)
        thread.start()
        thread.join()
    os.read(ready, 1)
    os.kill(child[0], signal.SIGTERM)
    _, status = os.waitpid(child[0], 0)
    print("CHILD", os.WTERMSIG(status) if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}")
''')


def test_a_child_forked_during_a_deferred_flush_still_ends_by_sigterm() -> None:
    """The deferral belongs to the parent's main thread: a child forked meanwhile by another thread
    (its main thread is not flushing) must not defer our handler for ever."""
    env = {k: v for k, v in os.environ.items() if k != "OTEL_SDK_DISABLED"}
    proc = subprocess.run([sys.executable, "-c", FORKED], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.stdout.strip() == f"CHILD {int(signal.SIGTERM)}", (proc.stdout, proc.stderr[-2000:])
