"""Thirty-first fault campaign: a real cmbagent run whose work dir is not UTF-8.

A folder name holding bytes that are not UTF-8 (kept by Python as lone surrogates) went on the run's span
as given: every OTLP backend got the run without its work dir (the encoder refuses the text) and the DAG
writer stored U+FFFD for the bytes. The span now holds them as ``\\xNN`` (``safe_text``), and the run's files
are still listed from the folder as cmbagent was given it, not from that escaped text (no such folder).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("CMBAGENT_DISABLE_DISPLAY", "true")
pytest.importorskip("cmbagent", reason="cmbagent is not installed (it needs Python >= 3.12; see docs/cmbagent.md)")

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from cmbagent_otel import semconv
from cmbagent_otel.redaction import encodable

from .test_cmbagent_runs import _exported, _rows
from .test_cmbreal8_audit import _through, _written
from .test_real_audit import (  # noqa: F401 - run_cmbagent: the fixture (getfixturevalue)
    _final_rows,
    _one_root_per_trace,
    run_cmbagent,
)

pytestmark = pytest.mark.cmbagent_autogen


@pytest.mark.parametrize("early", [False, True])
def test_a_work_dir_that_is_not_utf8(request: pytest.FixtureRequest, tmp_path: Path, early: bool) -> None:
    """one_shot into ``runs\\xff`` (and through a name bound before ``instrument()``): the run's span carries
    the work dir escaped and encodes for OTLP with it, ``meta.work_dir`` holds the same text, and the
    ``files`` rows are the files cmbagent wrote there (their paths escaped the same way). Fails on 5bc025a:
    the OTLP encoding has no work dir and ``meta.work_dir`` holds U+FFFD."""
    real = Path(os.path.join(str(tmp_path), os.fsdecode(b"runs\xff")))
    run = request.getfixturevalue("run_cmbagent")("one_shot", function=_through("one_shot", str(real), early))
    assert run.error is None
    _one_root_per_trace(run)
    escaped = encodable(str(real))
    (root,) = [s for s in run.spans if s.parent is None]
    assert root.attributes[semconv.WORKFLOW_WORK_DIR] == escaped
    assert escaped.encode() in encode_spans([root]).SerializeToString()
    url = _exported(run, tmp_path)
    rows: dict[str, Any] = _final_rows(url)
    (row,) = rows["runs"]
    assert row["meta"]["work_dir"] == escaped
    written = _written(real)
    assert len(written) >= 4  # code, chats, cost and time reports
    assert {f["file_path"] for f in _rows(url, "files")} == {encodable(str(p)) for p in written}
