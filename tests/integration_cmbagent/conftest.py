"""Fixtures for the real cmbagent package run offline against the scripted backend."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _loopback_tls(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """cmbagent builds hundreds of OpenAI clients per run and each loads the CA bundle named by
    SSL_CERT_FILE (~20 ms); the scripted backend is plain HTTP on loopback, so the tests point
    the clients at an empty CA directory instead (the app's behaviour is unchanged)."""
    empty = tmp_path_factory.getbasetemp() / "no-ca-certs"
    empty.mkdir(exist_ok=True)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(empty))


def cmbagent_dir() -> Path | None:
    spec = importlib.util.find_spec("cmbagent")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


@pytest.fixture(scope="session")
def loopback_env() -> Iterator[dict[str, str]]:
    """Environment for the subprocess apps: the same loopback TLS shortcut, display off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "SSL_CERT_FILE"}
    env["CMBAGENT_DISABLE_DISPLAY"] = "true"
    yield env
