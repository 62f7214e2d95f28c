"""Thirty-first fault campaign: text from the OS that is not UTF-8 reaches every backend, escaped.

Python keeps bytes that are not UTF-8 in a path, an argument or an environment value as lone
surrogates (``surrogateescape``). A run's work dir (or task) holding one went on its workflow span as
given: the OTLP encoder cannot encode it, so every OTLP backend (Jaeger, Phoenix, ``cmbagent-otel
ingest``) got the span without that attribute and a traceback was logged for it, and the DAG writer
stored U+FFFD for the bytes, where the run's files show them as ``\\xNN``. Application text passes
through ``safe_text``, which now escapes them as the file names are (``redaction.encodable``).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

import cmbagent_otel
from cmbagent_otel import semconv
from cmbagent_otel.redaction import safe_text


def test_a_run_whose_work_dir_and_task_are_not_utf8_reaches_otlp_and_the_database_escaped(
        capture: object, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Fails on 5bc025a: the OTLP encoding has no work dir (the encoder logged ``surrogates not allowed``)
    and the database holds U+FFFD for the bytes."""
    work = os.path.join(str(tmp_path), os.fsdecode(b"run\xff"))
    task = "plot " + os.fsdecode(b"data\xfe.csv")
    with cmbagent_otel.workflow("not utf8", task=task, work_dir=work):
        pass
    (span,) = capture.named("workflow not utf8")  # type: ignore[attr-defined]
    escaped_dir = str(tmp_path) + "/run\\xff"
    assert span.attributes[semconv.WORKFLOW_WORK_DIR] == escaped_dir
    assert span.attributes[semconv.WORKFLOW_TASK] == "plot data\\xfe.csv"
    with caplog.at_level(logging.DEBUG):
        encoded = encode_spans([span]).SerializeToString()
    assert escaped_dir.encode() in encoded and b"plot data\\xfe.csv" in encoded
    assert "surrogates not allowed" not in caplog.text
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    capture.write_dag(url)  # type: ignore[attr-defined]
    with sqlite3.connect(tmp_path / "runs.db") as conn:
        (meta,) = conn.execute("select meta from workflow_runs").fetchone()
    assert json.loads(meta)["work_dir"] == escaped_dir


@pytest.mark.parametrize(("given", "shown"), [
    (os.fsdecode(b"a\xffb"), "a\\xffb"),  # from the OS (surrogateescape)
    ("a\ud800b", "a\\ud800b"),  # a lone surrogate no byte became (a model server's JSON "\ud800")
    ("plain é text", "plain é text"),  # valid text unchanged
])
def test_safe_text_is_always_encodable(given: str, shown: str) -> None:
    """Text shows the bytes as ``\\xNN``; a value rendered as JSON keeps JSON's own escape, and so stays
    the JSON of that value (the content attributes are read back as JSON)."""
    assert safe_text(given) == shown
    for value in ([given, "x"], {"content": given}):
        rendered = safe_text(value)
        assert rendered is not None
        rendered.encode("utf-8")
        assert json.loads(rendered) == value
