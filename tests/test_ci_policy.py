"""Under `CI=true` a test that would skip for want of the shared data fails instead: a green
CI must mean the data-backed tests ran (`.ci/run` sets it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DATA_TEST = "tests/test_manifest.py::test_default_scenario_changes_context_every_few_seconds"


def run_data_test(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["CTXROBOT_DATA"] = str(tmp_path / "no-data")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsf", DATA_TEST],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize("ci", ["true", "TRUE"])
def test_missing_data_fails_in_ci(tmp_path: Path, ci: str) -> None:
    proc = run_data_test(tmp_path, ci)
    assert proc.returncode == 1, proc.stdout
    assert "1 failed" in proc.stdout
    assert "CI=true, so this is a failure, not a skip" in proc.stdout


def test_missing_data_skips_outside_ci(tmp_path: Path) -> None:
    proc = run_data_test(tmp_path, None)
    assert proc.returncode == 0, proc.stdout
    assert "1 skipped" in proc.stdout
    assert "CTXROBOT_DATA" in proc.stdout
    assert run_data_test(tmp_path, "false").returncode == 0
