"""What a user sees when the machine or the input is wrong: one line that says what to do,
exit status 2, never a traceback (`-v` shows the details).

Each failure is produced for real: an engine that does not answer, an image that was never
built, a mount Docker refuses, a port another process holds, a cgroup tree this user may not
write, a data folder that is not there.
"""

from __future__ import annotations

import grp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    REPO,
    require_checkout_open_to_others,
    require_data,
    require_image,
    skip_unless_ci,
)

pytestmark = pytest.mark.docker

QUICK = REPO / "config" / "scenarios" / "quick.yaml"
NOBODY = 65534


def manifest(
    folder: Path,
    *,
    image: str = "ctxrobot/signs",
    task_extra: str = "",
    data_dir: str | None = None,
) -> Path:
    """A one-task robot (signs on the replayed camera), by default on the real data."""
    path = folder / "robot.yaml"
    path.write_text(
        "version: 1\n"
        "robot: {name: errors-rover, cpus: 2}\n"
        f"data_dir: {data_dir or require_data()}\n"
        f"scenario: {QUICK}\n"
        "tasks:\n"
        "  - name: signs\n"
        f"    image: {image}\n"
        "    input: camera\n"
        f"{task_extra}"
        "scheduler: {policy: cfs}\n"
    )
    return path


def ctxrobot_cli(
    *args: str, env: dict[str, str] | None = None, user: int | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ctxrobot", *args]
    if user is not None:
        docker_gid = grp.getgrnam("docker").gr_gid
        command = [
            "setpriv",
            f"--reuid={user}",
            f"--regid={docker_gid}",
            "--clear-groups",
            *command,
        ]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def assert_one_line(proc: subprocess.CompletedProcess[str], command: str, *needles: str) -> str:
    """Exit 2, no traceback, and the last line of stderr is the verdict with its fix."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ctxrobot {command}: "), last
    for needle in needles:
        assert needle in last, last
    return last


@pytest.fixture
def data() -> Path:
    return require_data()


@pytest.fixture
def out(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "run"
    yield folder


ENGINE_DOWN = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}


@pytest.mark.parametrize(
    "command",
    [
        ["run", "--out", "{out}", "--duration", "5"],
        ["daemon", "--out", "{out}", "--socket", "{tmp}/ctl.sock"],
        ["bench", "--quick", "--out", "{out}", "--policies", "cfs", "--repeat", "1"],
        ["eval", "signs", "{data}/signs"],
    ],
    ids=["run", "daemon", "bench", "eval"],
)
def test_engine_down(command: list[str], tmp_path: Path, data: Path) -> None:
    robot = manifest(tmp_path)
    args = [a.format(out=tmp_path / "out", tmp=tmp_path, data=data) for a in command]
    if args[0] != "eval":
        args += ["--config", str(robot)]
    proc = ctxrobot_cli(*args, env=ENGINE_DOWN)
    assert_one_line(proc, args[0], "Docker engine does not answer", "tools/setup")


def test_verbose_shows_the_details(tmp_path: Path) -> None:
    robot = manifest(tmp_path)
    proc = ctxrobot_cli("-v", "run", "--config", str(robot), env=ENGINE_DOWN)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("ctxrobot run: the Docker engine")
    assert "Traceback" in proc.stderr and "DockerException" in proc.stderr


def test_image_missing(tmp_path: Path, out: Path) -> None:
    require_image("ctxrobot/signs")
    robot = manifest(tmp_path, image="ctxrobot/never-built")
    proc = ctxrobot_cli("run", "--config", str(robot), "--out", str(out), "--duration", "5")
    assert_one_line(proc, "run", "'ctxrobot/never-built'", "run tools/setup")


def test_mount_docker_refuses(tmp_path: Path, out: Path) -> None:
    require_image("ctxrobot/signs")
    # The manifest cannot know the image's folders: a file over the image's /etc passes
    # validation and only the container runtime refuses it.
    (tmp_path / "model.txt").write_text("weights\n")
    robot = manifest(tmp_path, task_extra="    mounts: [{source: model.txt, target: /etc}]\n")
    proc = ctxrobot_cli("run", "--config", str(robot), "--out", str(out), "--duration", "5")
    assert_one_line(proc, "run", "mount")


def test_metrics_port_in_use(tmp_path: Path, out: Path) -> None:
    require_image("ctxrobot/signs")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = ctxrobot_cli(
            "run",
            "--config",
            str(manifest(tmp_path)),
            "--out",
            str(out),
            "--duration",
            "5",
            "--metrics-port",
            str(port),
        )
    assert_one_line(proc, "run", f"port 127.0.0.1:{port} is in use", "--metrics-port")


def test_no_permission_on_the_cgroup_tree() -> None:
    """A user who may use Docker but not write cgroups asks for an envelope (`--cpus`)."""
    require_image("ctxrobot/signs")
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        skip_unless_ci("acting as another user needs root and setpriv (util-linux)")
    require_checkout_open_to_others()
    # pytest's tmp_path is private to root; this user needs a folder of its own.
    with tempfile.TemporaryDirectory(prefix="ctxrobot-nobody-") as folder:
        Path(folder).chmod(0o777)
        robot = manifest(Path(folder))
        proc = ctxrobot_cli(
            "run",
            "--config",
            str(robot),
            "--out",
            f"{folder}/out",
            "--duration",
            "5",
            "--cpus",
            "0.5",
            user=NOBODY,
        )
        # The run folder now belongs to that user; let cleanup remove it as root.
    assert_one_line(proc, "run", "no permission", "run as root")


def test_data_folder_missing(tmp_path: Path, out: Path) -> None:
    robot = manifest(tmp_path, data_dir="${CTXROBOT_DATA}")
    proc = ctxrobot_cli(
        "run",
        "--config",
        str(robot),
        "--out",
        str(out),
        env={"CTXROBOT_DATA": str(tmp_path / "no-data-here")},
    )
    assert_one_line(proc, "run", "data folder", "CTXROBOT_DATA", "ctxrobot data fetch")


def test_a_bad_runtime_cpu_setting_names_the_choices_before_anything_starts(
    tmp_path: Path, out: Path
) -> None:
    robot = manifest(tmp_path)
    proc = ctxrobot_cli(
        "run", "--config", str(robot), "--out", str(out), env={"CTXROBOT_RUNTIME_CPU": "first"}
    )
    assert_one_line(proc, "run", "CTXROBOT_RUNTIME_CPU='first' is not a CPU", "`last`", "`any`")
    assert not out.exists(), "nothing is made for a run that cannot start"


def test_a_relative_out_folder_is_made_absolute(tmp_path: Path) -> None:
    """The README's first command writes its run under ./runs; the run folder is a bind
    source, which Docker accepts only as an absolute path."""
    require_image("ctxrobot/signs")
    robot = manifest(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctxrobot",
            "run",
            "--config",
            str(robot),
            "--out",
            "relative/run",
            "--duration",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run database: {tmp_path / 'relative' / 'run' / 'run.db'}" in proc.stdout
