"""tests/ci.py: a test that cannot run here skips on a developer's machine and fails, naming the reason,
under CI. Checked on a small pytest run in a subprocess: one test that calls skip_or_fail itself and one
whose session fixture does (as tests/slurm/conftest.py's cluster and tests/conftest.py's inductor probe)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ci import in_ci

TESTS = Path(__file__).resolve().parents[1]

CANNOT_RUN = f"""
import sys
import pytest
sys.path.insert(0, {str(TESTS)!r})
from ci import skip_or_fail

@pytest.fixture(scope="session")
def cluster():
    skip_or_fail("no cluster: slurmctld did not start")
    yield

def test_direct():
    skip_or_fail("no toolchain: cc not found")

def test_through_session_fixture(cluster):
    pass
"""


def _run(tmp_path, ci):
    (tmp_path / "test_cannot_run.py").write_text(CANNOT_RUN)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsfE", "-p", "no:cacheprovider",
                           "test_cannot_run.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


def test_under_ci_a_test_that_cannot_run_fails_with_its_reason(tmp_path):
    proc = _run(tmp_path, "true")
    assert proc.returncode == 1, proc.stdout
    assert "1 failed, 1 error" in proc.stdout, proc.stdout
    assert "skipped" not in proc.stdout, proc.stdout
    assert "no toolchain: cc not found" in proc.stdout and "no cluster: slurmctld did not start" in proc.stdout


def test_outside_ci_it_skips_with_its_reason(tmp_path):
    proc = _run(tmp_path, None)
    assert proc.returncode == 0, proc.stdout
    assert "2 skipped" in proc.stdout and "failed" not in proc.stdout, proc.stdout
    assert "no toolchain: cc not found" in proc.stdout and "no cluster: slurmctld did not start" in proc.stdout


@pytest.mark.parametrize("value,expected", [("true", True), ("1", True), ("yes", True), ("", False),
                                            ("false", False), ("0", False), (None, False)])
def test_what_counts_as_ci(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert in_ci() is expected
