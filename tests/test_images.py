"""The container images tools/setup builds: present, unprivileged, offline-complete, and the
burner really turns CPU time into a measurable count.

Needs a running Docker engine and the images (`tools/setup`); skips when `docker info` fails.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, docker_problem, skip_unless_ci

pytestmark = pytest.mark.docker

TASKS = ("slam", "signs", "speech")
IMAGES = (*TASKS, "burner")
TASK_UID = "10001"
# The packages the tasks import directly, by distribution name -> module. Every pin is checked
# by version; only these are imported (some transitive pins, e.g. sounddevice, load system
# libraries such as PortAudio on import that a task container has no use for).
TASK_MODULES = {
    "numpy": "numpy",
    "scipy": "scipy",
    "opencv-python-headless": "cv2",
    "pocketsphinx": "pocketsphinx",
    "vosk": "vosk",
}


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def run_in(image: str, *command: str, extra: tuple[str, ...] = ()) -> str:
    """Run `command` in a throw-away container without network; return its stdout."""
    result = docker("run", "--rm", "--network", "none", *extra, f"ctxrobot/{image}", *command)
    assert result.returncode == 0, f"{image}: {command} failed:\n{result.stderr}"
    return result.stdout


def pinned_requirements(task: str) -> dict[str, str]:
    """`name==version` lines of containers/<task>/requirements.txt (other lines: version '')."""
    pins: dict[str, str] = {}
    for raw in (REPO / "containers" / task / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        assert name, f"containers/{task}/requirements.txt: cannot parse {raw!r}"
        pinned = re.match(r"==\s*([^\s;,]+)\s*$", line[name.end() :].split(";")[0].strip())
        pins[name.group()] = pinned.group(1) if pinned else ""
    return pins


@pytest.fixture(scope="module", autouse=True)
def _docker_engine() -> None:
    problem = docker_problem()
    if problem:
        skip_unless_ci(problem)


@pytest.mark.parametrize("image", IMAGES)
def test_image_exists_and_was_built_by_setup(image: str) -> None:
    result = docker(
        "image",
        "inspect",
        "-f",
        '{{ index .Config.Labels "ctxrobot.source-hash" }}',
        f"ctxrobot/{image}",
    )
    assert result.returncode == 0, f"ctxrobot/{image} missing: run tools/setup"
    assert len(result.stdout.strip()) == 64, "no ctxrobot.source-hash label: run tools/setup"


@pytest.mark.parametrize("image", IMAGES)
def test_runs_as_unprivileged_user_10001(image: str) -> None:
    assert run_in(image, "id", "-u").strip() == TASK_UID
    assert run_in(image, "id", "-g").strip() == TASK_UID


@pytest.mark.parametrize("task", TASKS)
def test_requirements_installed_and_import_offline(task: str) -> None:
    pins = pinned_requirements(task)
    assert pins, f"containers/{task}/requirements.txt lists nothing"
    check = (
        "import importlib, importlib.metadata as md, json, sys\n"
        "pins = json.loads(sys.argv[1]); modules = json.loads(sys.argv[2])\n"
        "for name, want in pins.items():\n"
        "    have = md.version(name)\n"
        "    assert not want or have == want, f'{name}: {have} != {want}'\n"
        "for module in modules:\n"
        "    importlib.import_module(module)\n"
        "print('ok')\n"
    )
    modules = [TASK_MODULES[name] for name in pins if name in TASK_MODULES]
    assert modules, f"containers/{task}/requirements.txt pins none of {sorted(TASK_MODULES)}"
    out = run_in(task, "python", "-c", check, json.dumps(pins), json.dumps(modules))
    assert out.strip() == "ok"


@pytest.mark.parametrize("task", TASKS)
def test_task_package_is_runnable(task: str) -> None:
    """`python -m <task>` (CMD) and `python -m <task>.evaluate` (ctxrobot eval) resolve."""
    check = (
        "import importlib, importlib.util, sys\n"
        "task = sys.argv[1]\n"
        "importlib.import_module('ctxtask'); importlib.import_module(task)\n"
        "for sub in ('__main__', 'evaluate'):\n"
        "    assert importlib.util.find_spec(f'{task}.{sub}'), f'no {task}/{sub}.py'\n"
        "print('ok')\n"
    )
    assert run_in(task, "python", "-c", check, task).strip() == "ok"


def burn(seconds: float, extra: tuple[str, ...] = ()) -> list[dict[str, float]]:
    out = run_in(
        "burner",
        "python3",
        "-m",
        "burner",
        "--seconds",
        str(seconds),
        "--interval",
        "0.25",
        extra=extra,
    )
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_burner_counts_up_and_writes_counter_file(tmp_path: Path) -> None:
    tmp_path.chmod(0o777)  # the burner runs as uid 10001
    reports = burn(1.5, extra=("-v", f"{tmp_path}:/out", "-e", "BURNER_COUNTER_FILE=/out/n"))
    counts = [r["iterations"] for r in reports]
    assert len(counts) >= 3, reports
    assert counts == sorted(counts) and counts[-1] > counts[0] > 0
    assert int((tmp_path / "n").read_text()) == counts[-1]


def test_burner_rate_follows_cpu_quota() -> None:
    """The count measures CPU received: capping the container at 0.1 CPU slows it down."""

    def rate(extra: tuple[str, ...]) -> float:
        reports = burn(2.0, extra=extra)
        first, last = reports[0], reports[-1]
        return (last["iterations"] - first["iterations"]) / (last["t"] - first["t"])

    free = rate(())
    capped = rate(("--cpus", "0.1"))
    assert capped < 0.6 * free, f"capped {capped:.0f}/s vs free {free:.0f}/s"
