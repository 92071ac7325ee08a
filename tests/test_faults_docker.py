"""Faults are handled, not fatal: each fault produced for real, under `ctxrobot run` and the
daemon, asserting what the user sees and that nothing is left behind.

- a task frozen by someone else (`docker pause`, a write to its freezer file) is thawed;
- a task that breaks the wire protocol is a failed task (and is restarted by the daemon);
- a run folder on a full disk, a missing image, a truncated laser log.

The Docker engine restarting mid-run is in tests/test_engine_restart_docker.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import psutil
import pytest

from ctxrobot.actuate.cgroups import discover
from ctxrobot.service.control import ControlClient, ControlError
from tests.conftest import REPO, ctxrobot, require_data, require_image, skip_unless_ci

pytestmark = pytest.mark.docker

QUICK = REPO / "config" / "scenarios" / "quick.yaml"

SIGNS = (
    "  - name: signs\n"
    "    image: {image}\n"
    "    input: camera\n"
    "    deadline_ms: 400\n"
    "    queue: {{depth: 2, overflow: drop_oldest}}\n"
    "    restart: {{policy: on-failure, max_retries: {retries}, backoff_s: 0.2}}\n"
)


def garbage_command(frame: str) -> str:
    """A task command that says hello, waits for its first sample, then sends ``frame``
    (Python source of a bytes value) and sleeps: a real container speaking garbage."""
    return (
        "    command:\n"
        "      - python\n"
        "      - -c\n"
        "      - |\n"
        "        import os, socket, json, struct, time\n"
        "        s = socket.socket(socket.AF_UNIX)\n"
        "        s.connect(os.environ['CTXROBOT_SOCKET'])\n"
        "        hello = json.dumps({'type': 'hello', 'task': 'signs', 'pid': 1}).encode()\n"
        "        s.sendall(struct.pack('>I', len(hello)) + hello)\n"
        "        s.recv(65536)\n"
        "        def frame(header):\n"
        "            body = json.dumps(header).encode()\n"
        "            return struct.pack('>I', len(body)) + body\n"
        f"        s.sendall({frame})\n"
        "        time.sleep(300)\n"
    )


GARBAGE = {
    "result without id": (
        "frame({'type': 'result', 't_sensor': 1.0, 't_start': 1.0, 't_end': 1.1})",
        "result needs 'id'",
    ),
    "payload_len -5": (
        "frame({'type': 'result', 'id': 0, 't_sensor': 1.0, 't_start': 1.0, 't_end': 1.1, "
        "'payload_len': -5})",
        "payload_len must be a non-negative integer",
    ),
    "payload_len 3e9": (
        "frame({'type': 'result', 'id': 0, 't_sensor': 1.0, 't_start': 1.0, 't_end': 1.1, "
        "'payload_len': 3000000000})",
        "exceeds the limit",
    ),
}


def write_manifest(
    path: Path, data: Path, *, image: str = "ctxrobot/signs", retries: int = 1, extra: str = ""
) -> Path:
    path.write_text(
        f"version: 1\n"
        f"robot: {{name: test-rover, cpus: 2}}\n"
        f"data_dir: {data}\n"
        f"scenario: {QUICK}\n"
        f"tasks:\n{SIGNS.format(image=image, retries=retries)}{extra}"
        f"scheduler: {{policy: ctx}}\n"
        f"context:\n"
        f"  sign: {{source: camera, task: signs, hold_s: 2.0}}\n"
        f"rules: []\n"
    )
    return path


def docker(*args: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=True, env=env
    ).stdout


def run_containers(run_id: str, env: dict[str, str] | None = None) -> list[str]:
    """`name state` of each container of one run (any state)."""
    out = docker(
        "ps",
        "-a",
        "--filter",
        f"label=ctxrobot.run={run_id}",
        "--format",
        "{{.Names}} {{.State}}",
        env=env,
    )
    return out.splitlines()


def run_row(out: Path) -> dict[str, Any]:
    # closing(): a reader left open would keep the runtime from folding its WAL at the end.
    with closing(sqlite3.connect(f"file:{out / 'run.db'}?mode=ro", uri=True)) as conn:
        conn.row_factory = sqlite3.Row
        return dict(conn.execute("SELECT * FROM run").fetchone())


def task_states(out: Path, task: str) -> list[tuple[str, str]]:
    with closing(sqlite3.connect(f"file:{out / 'run.db'}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT state, detail FROM task_states WHERE task = ? ORDER BY t", (task,)
        )
        return [(r[0], r[1]) for r in rows]


def until(what: str, check: Callable[[], Any], timeout_s: float = 120) -> Any:
    """Poll ``check`` until it returns something true; a bound, never a speed claim."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (ControlError, subprocess.CalledProcessError, sqlite3.OperationalError) as err:
            last = err
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class Run:
    """`ctxrobot run` as a user starts it, in the background. Its output goes to files:
    the guard it starts writes to the same stderr and may outlive it."""

    def __init__(
        self,
        manifest: Path,
        out: Path,
        *args: str,
        env: dict[str, str] | None = None,
        json_summary: bool = True,
    ) -> None:
        self.out = out
        logs = manifest.parent  # not beside the run folder: that may be on a full disk
        self.stdout_path, self.stderr_path = logs / "run.stdout", logs / "run.stderr"
        with self.stdout_path.open("w") as stdout, self.stderr_path.open("w") as stderr:
            command = ["run", "--config", str(manifest), "--out", str(out), *args]
            command += ["--json"] if json_summary else []
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ctxrobot", *command],
                stdout=stdout,
                stderr=stderr,
                cwd=REPO,
                env=env,
            )

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def samples(self) -> int:
        if self.proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{self.stderr()}")
        with closing(sqlite3.connect(f"file:{self.out / 'run.db'}?mode=ro", uri=True)) as conn:
            return int(conn.execute("SELECT count(*) FROM samples").fetchone()[0])

    def run_id(self) -> str:
        return str(run_row(self.out)["id"])

    def finish(self, timeout_s: float = 180) -> tuple[int, dict[str, Any] | None, str]:
        """Exit status, the --json summary (None without one) and stderr."""
        try:
            self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        lines = self.stdout().strip().splitlines()
        return self.proc.returncode, json.loads(lines[-1]) if lines else None, self.stderr()

    def stdout(self) -> str:
        return self.stdout_path.read_text()


@pytest.fixture
def data() -> Path:
    require_image("ctxrobot/signs")
    return require_data()


# -- someone else freezes a task ------------------------------------------------------------


def container_of(run_id: str, task: str) -> str:
    return f"ctxrobot-{run_id}-{task}"


def freeze_from_outside(how: str, name: str) -> None:
    if how == "docker pause":
        docker("pause", name)
    else:  # what any root process can do behind ctxrobot's back
        pid = int(docker("inspect", "-f", "{{.State.Pid}}", name))
        discover(pid).freeze()


def paused(name: str) -> bool:
    state = json.loads(docker("inspect", "-f", "{{json .State}}", name))
    pid = state["Pid"]
    return bool(state["Paused"]) or (pid > 0 and discover(pid).frozen)


@pytest.mark.parametrize("how", ["docker pause", "freezer write"])
def test_a_task_frozen_from_outside_is_thawed_under_run(
    tmp_path: Path, data: Path, how: str
) -> None:
    run = Run(write_manifest(tmp_path / "robot.yaml", data), tmp_path / "run", "--duration", "40")
    until("the first samples", run.samples)
    run_id = run.run_id()
    name = container_of(run_id, "signs")
    freeze_from_outside(how, name)
    until("the runtime to thaw the task", lambda: not paused(name), 30)
    before = run.samples()
    until("samples flowing again", lambda: run.samples() > before + 5, 60)
    run.proc.send_signal(signal.SIGINT)
    status, summary, stderr = run.finish()
    print(f"\n{how}: " + "\n".join(line[-160:] for line in stderr.splitlines() if "froz" in line))
    assert status == 0, stderr
    assert "task signs was frozen from outside ctxrobot" in stderr, "one warning line"
    assert summary is not None
    faults = summary["faults"]
    assert [(f["task"], f["fault"], f["outcome"]) for f in faults] == [
        ("signs", "frozen from outside", "thawed")
    ]
    states = [s for s, _ in task_states(tmp_path / "run", "signs")]
    assert states[-2:] == ["paused", "running"], states
    assert run_row(tmp_path / "run")["ended_utc"]
    assert not run_containers(run_id), "nothing left behind"


# -- a task that breaks the wire protocol ---------------------------------------------------


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_a_task_that_breaks_the_protocol_fails_the_run(
    tmp_path: Path, data: Path, case: str
) -> None:
    frame, said = GARBAGE[case]
    manifest = write_manifest(tmp_path / "robot.yaml", data, extra=garbage_command(frame))
    run = Run(manifest, tmp_path / "run", "--duration", "60")
    status, summary, stderr = run.finish()
    assert status == 1, stderr
    assert "Traceback" not in stderr
    line = next(ln for ln in stderr.splitlines() if ln.startswith("ctxrobot run: "))
    assert line.startswith("ctxrobot run: task 'signs' failed: broke the wire protocol: ")
    assert said in line
    print(f"\n{case}: {line}")
    assert summary is not None and said in summary["failed_tasks"]["signs"]
    assert ("failed", summary["failed_tasks"]["signs"]) in task_states(tmp_path / "run", "signs")
    row = run_row(tmp_path / "run")
    assert row["ended_utc"] and row["id"]
    assert not run_containers(row["id"]), "nothing left behind"


def test_the_printed_summary_names_the_failed_task(tmp_path: Path, data: Path) -> None:
    frame, said = GARBAGE["result without id"]
    manifest = write_manifest(tmp_path / "robot.yaml", data, extra=garbage_command(frame))
    run = Run(manifest, tmp_path / "run", "--duration", "60", json_summary=False)
    assert run.proc.wait(180) == 1
    printed = run.stdout()
    print("\n" + printed)
    assert "samples" in printed and "p99 ms" in printed, "the summary table"
    assert f"failed: task signs: broke the wire protocol: {said}" in printed


# -- the daemon: pause and protocol faults ---------------------------------------------------


class Daemon:
    """`ctxrobot daemon` on a manifest, with a control client."""

    def __init__(self, tmp: Path, manifest: Path, env: dict[str, str] | None = None) -> None:
        tmp.chmod(0o755)
        self.socket = tmp / "ctl.sock"
        self.out = tmp / "run"
        self.log_path = tmp / "daemon.log"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ctxrobot",
                    "daemon",
                    "--config",
                    str(manifest),
                    "--socket",
                    str(self.socket),
                    "--out",
                    str(self.out),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
            )
        self.client = ControlClient(self.socket, timeout_s=10)

    def signs(self) -> dict[str, Any]:
        if self.proc.poll() is not None:
            raise AssertionError(f"the daemon died:\n{self.logs()[-3000:]}")
        return dict(self.client.call("status")["tasks"]["signs"])

    def logs(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def test_the_daemon_thaws_a_task_paused_from_outside(tmp_path: Path, data: Path) -> None:
    daemon = Daemon(tmp_path, write_manifest(tmp_path / "robot.yaml", data))
    try:
        until("signs running", lambda: daemon.signs()["samples"] > 0, 180)
        run_id = run_row(daemon.out)["id"]
        name = container_of(run_id, "signs")
        docker("pause", name)
        until("signs thawed", lambda: not paused(name), 30)
        signs = until(
            "the status to say what happened",
            lambda: (s := daemon.signs())["state"] == "running" and "outside" in s["detail"] and s,
            30,
        )
        print(f"\nctl status after a docker pause: {signs['state']}: {signs['detail']}")
        before = signs["samples"]
        until("signs processing again", lambda: daemon.signs()["samples"] > before + 5, 60)
    finally:
        assert daemon.stop() == 0
    assert "task signs was frozen from outside ctxrobot" in daemon.logs()
    assert run_row(daemon.out)["ended_utc"]
    assert not run_containers(run_id)


def test_the_daemon_restarts_a_task_that_breaks_the_protocol(tmp_path: Path, data: Path) -> None:
    frame, said = GARBAGE["payload_len 3e9"]
    manifest = write_manifest(
        tmp_path / "robot.yaml", data, retries=1, extra=garbage_command(frame)
    )
    daemon = Daemon(tmp_path, manifest)
    try:
        signs = until(
            "signs given up after its one restart",
            lambda: (
                (s := daemon.signs())["state"] == "failed" and "not restarted" in s["detail"] and s
            ),
            180,
        )
        print(f"\nctl status: signs {signs['state']}: {signs['detail']}")
        assert "1 restart(s) so far" in signs["detail"]
        assert psutil.Process(daemon.proc.pid).memory_info().rss < 1 << 30, "no 3 GB frame"
        run_id = run_row(daemon.out)["id"]
    finally:
        assert daemon.stop() == 0, daemon.logs()[-3000:]
    logs = daemon.logs()
    crashes = re.findall(rf"task signs crashed: broke the wire protocol: .*{said}", logs)
    assert len(crashes) == 2, logs[-3000:]
    assert "task signs restarted" in logs
    assert "Traceback" not in logs
    assert run_row(daemon.out)["ended_utc"]
    assert not run_containers(run_id)


# -- a full disk, a missing image, a truncated laser log ------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB file system for the run folder: a few seconds of the run's rows fill it."""
    if os.geteuid() != 0:
        skip_unless_ci("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_disk_that_fills_during_the_run(tmp_path: Path, data: Path, small_disk: Path) -> None:
    """The run goes on with a bounded buffer, says so in one line, and its summary counts
    what the disk refused."""
    out = small_disk / "run"
    run = Run(write_manifest(tmp_path / "robot.yaml", data), out, "--duration", "30")
    status, summary, stderr = run.finish()
    assert status == 0, stderr
    assert "Traceback" not in stderr
    said = [line for line in stderr.splitlines() if "disk is full" in line]
    print("\n" + "\n".join(line[line.index("run store") :][:200] for line in said))
    assert said and "keeping the newest" in said[0], "one line says the run goes on, and how"
    assert summary is not None
    assert summary["recording"]["rows_lost"] > 0
    assert summary["recording"]["write_error"] == "the disk is full"
    row = run_row(out)
    assert row["ended_utc"], "the end of the run is recorded even on a full disk"
    assert not run_containers(row["id"])


def test_a_full_disk_at_the_start_is_one_line(tmp_path: Path, data: Path, small_disk: Path) -> None:
    filler = small_disk / "filler"
    with filler.open("wb") as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 65536)
    before = set(docker("ps", "-aq").split())
    run = Run(write_manifest(tmp_path / "robot.yaml", data), small_disk / "run")
    status, summary, stderr = run.finish()
    assert status == 2 and summary is None
    assert stderr.strip().splitlines() == [
        f"ctxrobot run: cannot create {small_disk / 'run' / 'run.db'}: the disk is full: free "
        "space there or give --out a folder on another disk"
    ]
    assert set(docker("ps", "-aq").split()) <= before, "no container was started"


@pytest.mark.parametrize("command", ["run", "daemon"])
def test_a_missing_image_is_one_line(tmp_path: Path, data: Path, command: str) -> None:
    manifest = write_manifest(tmp_path / "robot.yaml", data, image="ctxrobot/never-built")
    args = ["--socket", str(tmp_path / "ctl.sock")] if command == "daemon" else []
    proc = ctxrobot(
        command, "--config", str(manifest), "--out", str(tmp_path / "run"), *args, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ctxrobot {command}: image 'ctxrobot/never-built' of task 'signs' is not built: run "
        "tools/setup"
    )
    row = run_row(tmp_path / "run")
    assert row["ended_utc"]
    assert not run_containers(row["id"])


def test_a_truncated_laser_log_is_one_line_naming_the_file(tmp_path: Path, data: Path) -> None:
    """The scenario's data are read before anything starts: a broken recording is the
    user's to fix (exit 2), named, and no container ever ran."""
    copy = tmp_path / "data"
    (copy / "slam" / "intel").mkdir(parents=True)
    for folder in ("signs", "speech"):
        (copy / folder).symlink_to(data / folder)
    intel = data / "slam" / "intel"
    for name in ("laser.yaml", "intel_odom.txt"):
        (copy / "slam" / "intel" / name).write_bytes((intel / name).read_bytes())
    laser = copy / "slam" / "intel" / "intel_laser.txt.gz"
    laser.write_bytes((intel / "intel_laser.txt.gz").read_bytes()[:300_000])
    manifest = write_manifest(tmp_path / "robot.yaml", copy)
    before = set(docker("ps", "-aq").split())
    proc = ctxrobot("run", "--config", str(manifest), "--out", str(tmp_path / "run"), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctxrobot run: cannot replay scenario"), lines
    assert f"{laser}: malformed laser scan" in lines[0]
    assert set(docker("ps", "-aq").split()) <= before, "no container was started"
