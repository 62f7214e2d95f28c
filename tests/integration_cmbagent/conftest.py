"""Fixtures for the real cmbagent package run offline against the scripted backend."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import importlib.util
import logging
import os
import shutil
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .scripted_cmbagent import DEFAULT_PLAN


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


# Environment entries that differ from test to test without reaching a run: pytest's own, the
# scripted backend's URL (each run sets it to its own server) and the spill dir of exporters built
# without one (the shared runs export to an in-memory capture only; SharedRuns.put checks it stayed empty)
_PER_TEST_ENV = frozenset({"PYTEST_CURRENT_TEST", "OPENAI_BASE_URL", "CMBAGENT_OTEL_SPILL_DIR"})
_PLAIN = (str, int, float, bool, type(None))


class SharedRuns:
    """Runs of the real package shared by the tests that ask for the same one, run once per session.

    A run is shared only when everything that goes into it is the same: the entry points, the options
    (plain values only: no responder, no function), the environment and the working directory. Each
    test gets a private copy: its own results, sequence and span list, and the run's work dir put back
    as the run left it (from a pristine copy taken right after the run), so no test sees what another
    wrote there; the spans name that work dir, so it keeps its path. Tests run one at a time, so one
    path is enough.
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._runs: dict[tuple[Any, ...], tuple[Any, Path, Path]] = {}
        self._made = 0

    def key(self, kinds: tuple[str, ...], options: dict[str, Any]) -> tuple[Any, ...] | None:
        """What the run depends on, or None when an option is not a plain value (never shared)."""
        if not all(isinstance(v, _PLAIN) for v in options.values()):
            return None
        env = tuple(sorted((k, v) for k, v in os.environ.items() if k not in _PER_TEST_ENV))
        return kinds, tuple(sorted(options.items())), os.getcwd(), env

    def work_dir(self, name: str) -> Path:
        """A new directory ``name`` for a run to share (under this session's temp dir)."""
        self._made += 1
        return self._root / f"run-{self._made}" / name

    def put(self, key: tuple[Any, ...], run: Any) -> None:
        """Keep ``run`` (its work dir as it is now) for the next test that asks for ``key``."""
        spill = os.environ.get("CMBAGENT_OTEL_SPILL_DIR")
        assert not spill or not any(Path(spill).iterdir()), "a shared run used the per-test spill dir"
        kept = _private(run)  # before the test that ran it can change anything
        pristine = run.work_dir.with_name(run.work_dir.name + "-pristine")
        shutil.copytree(run.work_dir, pristine, symlinks=True)
        self._runs[key] = (kept, run.work_dir, pristine)

    def get(self, key: tuple[Any, ...]) -> Any | None:
        """A private copy of the run kept for ``key``, its work dir back as the run left it; or None."""
        if key not in self._runs:
            return None
        run, work, pristine = self._runs[key]
        shutil.rmtree(work)
        shutil.copytree(pristine, work, symlinks=True)
        return _private(run)


def _private(run: Any) -> Any:
    """A copy of a ``Run`` that shares nothing mutable with it but what cannot be copied (spans are
    read-only): the agent objects some entry points return (one_shot's ``engineer``, ...) hold locks,
    so they are shared; the tests read only the results' plain values (``final_context``, ...)."""
    return dataclasses.replace(run, results={k: _copied(v) for k, v in run.results.items()},
                               error=_copied(run.error), sequence=list(run.sequence),
                               unexpected=list(run.unexpected), spans=list(run.spans), warnings=list(run.warnings))


def _copied(value: Any) -> Any:
    try:
        return copy.deepcopy(value)
    except Exception:  # an app object holding a lock or a socket
        return value


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory: pytest.TempPathFactory) -> SharedRuns:
    """The session's :class:`SharedRuns`."""
    return SharedRuns(tmp_path_factory.mktemp("shared-runs"))


# --- MARS's own phases next to the PyPI package (CMBAGENT_OTEL_MARS_SRC) ----------------------------------
MARS_MODULES = ("cmbagent.phases.execution_manager", "cmbagent.phases.control", "cmbagent.phases.registry",
                "cmbagent.workflows.composer")


@pytest.fixture(scope="module")
def mars_phases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """MARS's own ``cmbagent.phases`` and ``cmbagent.workflows`` modules (``CMBAGENT_OTEL_MARS_SRC``), imported
    from its source tree next to the installed PyPI cmbagent, whose ``CMBAgent`` its phases then build (the
    packages' ``__init__`` files, which import every phase, are not run). Loaded once for the module, before
    its tests: each test's ``instrument()`` patches them as already imported modules, as an application's would.
    Skips without ``CMBAGENT_OTEL_MARS_SRC``. The MARS tests' one setup: they take this fixture and build MARS's
    phases with :data:`MARS_CONTROL_CONFIG` inside :func:`pypi_cmbagent_for_mars`."""
    from .test_backend_rows import _mars_source  # here: that module skips itself without cmbagent

    mars = _mars_source(tmp_path_factory.mktemp("mars"))
    if mars is None:
        pytest.skip("CMBAGENT_OTEL_MARS_SRC is not set")
    import cmbagent

    with pytest.MonkeyPatch.context() as monkeypatch:
        # the fork's modules the PyPI package lacks (cmbagent.callbacks, ...) found after the package's own
        monkeypatch.setattr(cmbagent, "__path__", [*cmbagent.__path__, str(mars / "cmbagent")])
        for name in ("cmbagent.phases", "cmbagent.workflows"):
            package = types.ModuleType(name)
            package.__path__ = [str(mars / "cmbagent" / name.rpartition(".")[2])]
            monkeypatch.setitem(sys.modules, name, package)
        try:
            import structlog  # noqa: F401 - the fork's callbacks module logs through it
        except ImportError:
            shim = types.ModuleType("structlog")
            shim.get_logger = logging.getLogger  # type: ignore[attr-defined]
            monkeypatch.setitem(sys.modules, "structlog", shim)
        # imported here, before a test's instrument() (which patches them as imported modules): imported in a
        # test after an instrument() of an earlier module's test, their post-import hooks have fired already
        for name in MARS_MODULES:
            importlib.import_module(name)
        yield mars
        for name in [m for m in sys.modules if m.startswith(("cmbagent.phases.", "cmbagent.workflows.",
                                                             "cmbagent.callbacks"))]:
            del sys.modules[name]
        if "callbacks" in vars(cmbagent):  # bound on the package by its import
            delattr(cmbagent, "callbacks")


# MARS's ControlPhase config for DEFAULT_PLAN, preloaded (no planning phase)
MARS_CONTROL_CONFIG = {"params": {"preloaded_plan": [{"sub_task": s.task, "sub_task_agent": s.agent,
                                                      "bullet_points": [s.task]} for s in DEFAULT_PLAN]},
                       "max_rounds": 30}


# pypi_cmbagent_for_mars's threads inside it (test16 runs two phases at once, one a thread) and what it put back
_FOR_MARS_LOCK = threading.Lock()
_for_mars: list[Any] = []  # while a thread is inside: [depth, the PyPI CMBAgent, the manager's own kwargs method]


@contextlib.contextmanager
def pypi_cmbagent_for_mars() -> Iterator[None]:
    """MARS's phases (1f77da3) building the PyPI ``CMBAgent``: it takes none of the managed-mode arguments MARS's
    manager adds (its own database), so the manager adds none, and clears a work dir given as a ``Path``
    only (MARS's gives a ``str``). Threads may be inside at once: the first one in installs the subclass, the
    last one out puts back what the first found (each thread putting back what it found left the other's
    subclass behind when they left in the order they came: later PyPI runs lost their ``solve`` spans)."""
    import cmbagent.cmbagent as module
    from cmbagent.phases.execution_manager import PhaseExecutionManager

    with _FOR_MARS_LOCK:
        if not _for_mars:
            class PyPICMBAgent(module.CMBAgent):  # type: ignore[misc,name-defined]
                def __init__(self, *args: Any, work_dir: str, **kwargs: Any) -> None:
                    super().__init__(*args, work_dir=Path(work_dir), **kwargs)

            _for_mars[:] = [0, module.CMBAgent, vars(PhaseExecutionManager).get("get_managed_cmbagent_kwargs")]
            PhaseExecutionManager.get_managed_cmbagent_kwargs = lambda self: {}  # type: ignore[method-assign]
            module.CMBAgent = PyPICMBAgent
        _for_mars[0] += 1
    try:
        yield
    finally:
        with _FOR_MARS_LOCK:
            _for_mars[0] -= 1
            if not _for_mars[0]:
                _, module.CMBAgent, managed = _for_mars
                if managed is None:
                    del PhaseExecutionManager.get_managed_cmbagent_kwargs
                else:
                    PhaseExecutionManager.get_managed_cmbagent_kwargs = managed  # type: ignore[method-assign]
                _for_mars.clear()
