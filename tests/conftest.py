"""Shared test helpers: where the real data are, and whether a Docker engine answers."""

from __future__ import annotations

import functools
import os
import queue
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest

from ctxtask.datasets import data_dir

REPO = Path(__file__).resolve().parents[1]

Result = TypeVar("Result")


def ctxrobot(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the `ctxrobot` command line as a user would: a real process, from the repo."""
    return subprocess.run(
        [sys.executable, "-m", "ctxrobot", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def side_by_side(jobs: Mapping[str, Callable[[int], Result]]) -> dict[str, Result]:
    """Run CPU-bound jobs at once, one per usable CPU: each job starts, in the order given
    (longest first keeps the CPUs evenly busy), when a CPU is free, and is called with that
    CPU for it to pin itself there. Returns each job's result by name; a job that raises
    raises here."""
    free: queue.Queue[int] = queue.Queue()
    for cpu in sorted(os.sched_getaffinity(0))[: max(1, len(jobs))]:
        free.put(cpu)

    def on_a_free_cpu(job: Callable[[int], Result]) -> Result:
        cpu = free.get()
        try:
            return job(cpu)
        finally:
            free.put(cpu)

    with ThreadPoolExecutor(max_workers=free.qsize()) as pool:
        futures = {name: pool.submit(on_a_free_cpu, job) for name, job in jobs.items()}
    return {name: future.result() for name, future in futures.items()}


def in_ci() -> bool:
    """Whether this is a CI run (`CI=true`, as CI services and `.ci/run` set it)."""
    return os.environ.get("CI", "").lower() == "true"


def skip_unless_ci(reason: str) -> NoReturn:
    """Skip, saying why; in CI fail instead: a green CI must mean the real-data and
    real-engine tests ran, not that they were skipped."""
    if in_ci():
        pytest.fail(f"CI=true, so this is a failure, not a skip: {reason}", pytrace=False)
    pytest.skip(reason)


def require_checkout_open_to_others() -> None:
    """Tests that switch to another user (`setpriv`) run ctxrobot from this checkout: every
    folder above it must let other users through, or skip (in CI: fail) saying which."""
    for folder in [REPO, *REPO.parents]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            skip_unless_ci(
                f"other users cannot reach this checkout: {folder} is mode {mode & 0o777:o}; "
                f"`chmod o+x {folder}` (tests that act as another user run ctxrobot from here)"
            )


def require_data(subpath: str = "") -> Path:
    """The data folder `subpath` under the data root, or skip the test saying why."""
    path = data_dir() / subpath
    if not path.exists():
        skip_unless_ci(
            f"real data not found at {path}: set CTXROBOT_DATA to the shared data folder "
            "(it holds slam/, signs/, speech/)"
        )
    return path


@functools.cache
def docker_problem() -> str | None:
    """Why Docker tests cannot run here, or None when the engine answers."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed (run tools/setup)"
    proc = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if proc.returncode != 0:
        return f"no Docker engine answers (run tools/setup): {proc.stderr.strip()[:200]}"
    return None


def require_image(name: str) -> None:
    """Skip unless the Docker engine answers and holds image `name`."""
    problem = docker_problem()
    if problem:
        skip_unless_ci(problem)
    proc = subprocess.run(["docker", "image", "inspect", name], capture_output=True, timeout=30)
    if proc.returncode != 0:
        skip_unless_ci(f"image {name} is missing: run tools/setup to build it")


@pytest.fixture
def data_root() -> Path:
    return require_data()
