"""The README's quick start, run verbatim in a fresh clone, as a new user would.

The two commands are read from README.md (so this breaks when the README changes without
it) and run from the root of a fresh `git clone` with the data folder beside it. Only a
shorter duration is added to the run (`--duration 10`) and a small selection to the test
command (running the whole suite inside the suite would recurse).

Both tests first stop the Docker engine when this machine runs it outside systemd, the way
a fresh machine has none: the first `tools/setup` must start it, and the second must not
wait for a lock the engine inherited. They run only where this process may stop and start
the engine (root).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ctxtask.datasets import data_dir
from tests.conftest import REPO, docker_problem, require_data, skip_unless_ci

pytestmark = pytest.mark.docker

#: A cold `tools/setup` in a fresh clone creates a venv and installs every dependency.
SETUP_TIMEOUT_S = 1200
ENGINE_STOP_TIMEOUT_S = 60
QUICK_DURATION = "--duration 10"
QUICK_TESTS = "-q -p no:cacheprovider tests/test_stats.py"


def quick_start_commands() -> list[str]:
    """The shell lines of the README's quick start, comments stripped."""
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Quick start' section"
    block = re.search(r"```sh\n(.*?)```", section.group(1), re.S)
    assert block, "the quick start has no ```sh block"
    lines = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line]


def test_the_readme_quick_start_is_two_commands() -> None:
    run, tests = quick_start_commands()
    assert run.startswith("tools/setup && ") and " run " in run
    assert tests.startswith("tools/setup && ") and "pytest" in tests
    assert (REPO / ".ci" / "run").read_text().count("tools/setup") == 1


def _engine_pids() -> list[int]:
    proc = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True)
    return [int(pid) for pid in proc.stdout.split()]


def stop_engine() -> None:
    """Stop the Docker engine (and so every container), as on a machine that has none
    running; tools/setup starts it again."""
    if os.geteuid() != 0:
        skip_unless_ci("stopping and starting the Docker engine needs root")
    if Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "stop", "docker.socket", "docker.service"], check=True)
    for pid in _engine_pids():
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + ENGINE_STOP_TIMEOUT_S
    while _engine_pids():
        assert time.monotonic() < deadline, "dockerd did not stop within a minute"
        time.sleep(0.5)
    assert docker_problem.__wrapped__() is not None, "an engine still answers"


def shell(command: str, cwd: Path, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run one line as a user types it; on a timeout, say where it hung."""
    try:
        return subprocess.run(
            ["bash", "-c", command],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={k: v for k, v in os.environ.items() if k != "CTXROBOT_DATA"},
        )
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace")[-3000:]
        pytest.fail(f"{command!r} did not finish within {timeout_s:.0f} s; output:\n{out}")


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Path:
    """A clone of this repository's committed state with the data folder beside it, at
    `../shared/data` as the README has it."""
    data = require_data()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(data)
    clone = tmp_path / "main"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    assert data_dir() == data
    return clone


def test_the_quick_start_runs_verbatim_in_a_fresh_clone(fresh_clone: Path) -> None:
    run, tests = quick_start_commands()
    stop_engine()

    started = time.monotonic()
    proc = shell(f"{run} {QUICK_DURATION}", fresh_clone, SETUP_TIMEOUT_S)
    run_s = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[setup] docker engine: started" in proc.stdout
    folder = re.search(r"run database: (\S+)", proc.stdout)
    assert folder, proc.stdout[-2000:]
    run_db = Path(folder.group(1))
    assert run_db.is_absolute() and run_db.is_file()
    assert run_db.is_relative_to(fresh_clone / "runs")

    started = time.monotonic()
    proc = shell(f"{tests} {QUICK_TESTS}", fresh_clone, SETUP_TIMEOUT_S)
    tests_s = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[setup] docker engine: running" in proc.stdout
    assert re.search(r"\d+ passed", proc.stdout), proc.stdout[-2000:]
    print(f"\nquick start in a fresh clone: run {run_s:.0f} s, tests {tests_s:.0f} s")


def test_setup_twice_when_the_first_started_the_engine() -> None:
    """The engine that the first setup starts must not keep the setup lock."""
    stop_engine()
    first = shell("tools/setup --no-images", REPO, SETUP_TIMEOUT_S)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "[setup] docker engine: started" in first.stdout
    second = shell("tools/setup --no-images", REPO, 120)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "waiting for another tools/setup run" not in second.stdout
    lock = (REPO / ".cache" / "setup" / "lock").resolve()
    for pid in _engine_pids():
        held = {os.path.realpath(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert str(lock) not in held, f"dockerd (pid {pid}) holds {lock}"
