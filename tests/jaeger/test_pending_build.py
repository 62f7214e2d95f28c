"""``./dev test`` builds Jaeger in the background and the tests start meanwhile: the first test that
needs the binary waits for the build, which holds an exclusive lock on CMBAGENT_OTEL_JAEGER_PENDING."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from tests.jaeger import support


def test_the_binary_is_looked_up_only_after_the_pending_build_is_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not shutil.which("flock"):
        pytest.skip("no flock(1): ./dev builds Jaeger before the tests then")
    lock, built = tmp_path / ".pending", tmp_path / "built"
    # the build as ./dev runs it: a background shell holding the lock; it "finishes" (writes
    # `built`, then exits and so releases the lock) only when told to
    build = subprocess.Popen(["bash", "-c", 'exec 8>"$1"; flock 8; echo locked; read -r _; : >"$2"', "_",
                              str(lock), str(built)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert build.stdout is not None and build.stdin is not None
    assert build.stdout.readline() == "locked\n"
    monkeypatch.setenv("CMBAGENT_OTEL_JAEGER_PENDING", str(lock))
    support._wait_for_pending_build.cache_clear()
    try:
        # told to finish from another thread, so that a wait that does not block returns first
        finish = threading.Thread(target=lambda: (build.stdin.write("go\n"), build.stdin.flush()))
        finish.start()
        support._wait_for_pending_build()
        assert built.exists()
        finish.join()
        assert build.wait() == 0
    finally:
        support._wait_for_pending_build.cache_clear()   # the real pending build, if any, is waited for again
        if build.poll() is None:
            build.kill()
            build.wait()


def test_no_pending_build_and_a_missing_lock_file_do_not_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        for value in ("", str(tmp_path / "never-made")):
            monkeypatch.setenv("CMBAGENT_OTEL_JAEGER_PENDING", value)
            support._wait_for_pending_build.cache_clear()
            assert support._wait_for_pending_build() is None
    finally:
        support._wait_for_pending_build.cache_clear()


def test_a_build_that_never_ends_fails_the_jaeger_tests_with_the_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung build (a Go module proxy that stops answering) hung the test run for ever on 0c80923: the
    wait had no deadline. Past ``BUILD_DEADLINE_S`` the test fails naming the lock, and every later one
    fails at once with the same reason (the result is cached), instead of waiting again."""
    if not shutil.which("flock"):
        pytest.skip("no flock(1): ./dev builds Jaeger before the tests then")
    lock = tmp_path / ".pending"
    build = subprocess.Popen(["bash", "-c", 'exec 8>"$1"; flock 8; echo locked; read -r _', "_", str(lock)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert build.stdout is not None and build.stdin is not None
    assert build.stdout.readline() == "locked\n"
    monkeypatch.setenv("CMBAGENT_OTEL_JAEGER_PENDING", str(lock))
    monkeypatch.setattr(support, "BUILD_DEADLINE_S", 0.2)  # the build above ends only when told to
    support._wait_for_pending_build.cache_clear()
    try:
        for _ in range(2):
            with pytest.raises(pytest.fail.Exception) as failed:
                support.jaeger_binary()
            assert str(lock) in str(failed.value) and "not over after" in str(failed.value)
        assert support._wait_for_pending_build.cache_info().misses == 1  # waited once
        assert build.poll() is None
    finally:
        support._wait_for_pending_build.cache_clear()
        build.stdin.write("go\n")
        build.stdin.flush()
        build.wait()
