"""The Docker engine restarts mid-run: the daemon waits for it and restarts its tasks,
`ctxrobot run` ends cleanly naming the cause, and a guard whose runtime died waits for the
engine to remove what the engine left behind.

On a private engine of the test's own (`PrivateEngine`): the machine's engine runs other
people's containers, and stopping it would kill them. With CTXROBOT_TEST_MACHINE_ENGINE=1,
on a machine where no other container runs, the same tests stop and start the machine's
own engine (`MachineEngine`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import require_image, skip_unless_ci
from tests.test_faults_docker import (
    Daemon,
    Run,
    container_of,
    data,
    docker,
    run_containers,
    run_row,
    until,
    write_manifest,
)

pytestmark = pytest.mark.docker

__all__ = ["data"]  # a fixture of the faults tests, used here too


class PrivateEngine:
    """A second dockerd of this test's own (its own socket, data and state folders): the
    machine's engine runs other people's containers, and stopping it would kill them.

    It runs in a network namespace of its own: a dockerd without a default bridge
    (``--bridge none``; the tasks need no network) deletes any ``docker0`` interface it
    sees, which in the host's namespace is the machine engine's bridge."""

    RUN = Path("/run/ctxrobot-test-engine")
    ROOT = Path("/var/lib/ctxrobot-test-engine")

    def __init__(self) -> None:
        self.socket = self.RUN / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}"}
        self.proc: subprocess.Popen[bytes] | None = None
        #: Containers outlive the engine (dockerd --live-restore), from the next start on.
        self.live_restore = False

    def start(self) -> None:
        self.RUN.mkdir(parents=True, exist_ok=True)
        self.ROOT.mkdir(parents=True, exist_ok=True)
        self._stop_leftover()
        with (self.ROOT / "dockerd.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    "unshare",
                    "--net",
                    "dockerd",
                    "--host",
                    f"unix://{self.socket}",
                    "--data-root",
                    str(self.ROOT / "root"),
                    "--exec-root",
                    str(self.RUN / "exec"),
                    "--pidfile",
                    str(self.RUN / "dockerd.pid"),
                    "--bridge",
                    "none",
                    "--iptables=false",
                    "--ip-masq=false",
                    *(["--live-restore"] if self.live_restore else []),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        until("the private engine to answer", self.answers, 90)

    def answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = (self.ROOT / "dockerd.log").read_text()[-2000:]
            raise AssertionError(f"the private dockerd exited:\n{tail}")
        info = subprocess.run(["docker", "info"], capture_output=True, env=self.env)
        return info.returncode == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(90)

    def _stop_leftover(self) -> None:
        """A private engine left by an interrupted test session holds the pid file."""
        pidfile = self.RUN / "dockerd.pid"
        if not pidfile.exists():
            return
        pid = int(pidfile.read_text().strip() or 0)
        if (
            pid
            and psutil.pid_exists(pid)
            and str(self.socket) in " ".join(psutil.Process(pid).cmdline())
        ):
            psutil.Process(pid).terminate()
            psutil.Process(pid).wait(90)

    def load(self, image: str) -> None:
        """Copy ``image`` from the machine's engine unless the same one is already here."""
        want = docker("image", "inspect", "-f", "{{.Id}}", image).strip()
        have = subprocess.run(
            ["docker", "image", "inspect", "-f", "{{.Id}}", image],
            capture_output=True,
            text=True,
            env=self.env,
        ).stdout.strip()
        if have != want:
            save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
            subprocess.run(
                ["docker", "load"], stdin=save.stdout, check=True, env=self.env, capture_output=True
            )
            assert save.wait() == 0


class MachineEngine:
    """The machine's own engine, stopped and started as tools/setup starts it (an engine
    not under systemd). Only with CTXROBOT_TEST_MACHINE_ENGINE=1 and no other container on
    it: stopping it kills every container."""

    PIDFILE = Path("/var/run/docker.pid")
    LOG = Path("/var/log/ctxrobot-dockerd.log")

    def __init__(self) -> None:
        self.env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}

    def answers(self) -> bool:
        return subprocess.run(["docker", "info"], capture_output=True, env=self.env).returncode == 0

    def start(self) -> None:
        if self.answers():
            return
        with self.LOG.open("ab") as log:
            subprocess.Popen(
                ["nohup", "dockerd"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        until("the machine's engine to answer", self.answers, 90)

    def stop(self) -> None:
        engine = psutil.Process(int(self.PIDFILE.read_text().strip()))
        engine.terminate()
        engine.wait(90)

    def load(self, image: str) -> None:
        """The machine's engine has the images already."""


Engine = PrivateEngine | MachineEngine


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    require_image("ctxrobot/signs")
    if os.geteuid() != 0 or not (shutil.which("dockerd") and shutil.which("unshare")):
        skip_unless_ci("a private Docker engine needs root, dockerd and unshare")
    # Other engines' interfaces come and go (veths of their containers); bridges stay.
    bridges = {
        i for i in os.listdir("/sys/class/net") if Path("/sys/class/net", i, "bridge").exists()
    }
    chosen: Engine = PrivateEngine()
    if os.environ.get("CTXROBOT_TEST_MACHINE_ENGINE") == "1":
        chosen = MachineEngine()
        others = docker("ps", "-q").split()  # running ones: a restart stops them
        if others:
            pytest.skip(f"{len(others)} other container(s) run on the machine's engine")
    chosen.start()
    try:
        chosen.load("ctxrobot/signs")
        if isinstance(chosen, PrivateEngine):  # all its containers are this test's
            leftovers = docker("ps", "-aq", env=chosen.env).split()
            if leftovers:
                docker("rm", "-f", *leftovers, env=chosen.env)
        yield chosen
    finally:
        if isinstance(chosen, MachineEngine):
            chosen.start()  # never leave the machine's engine stopped
        else:
            chosen.stop()
    assert all(Path("/sys/class/net", b).exists() for b in bridges), "the host's bridges stay"


def guard_of(pid: int) -> psutil.Process:
    """The guard process a runtime started."""
    children = psutil.Process(pid).children()
    return next(p for p in children if "ctxrobot.service.guard" in p.cmdline())


def restart(engine: Engine, down_s: float = 3.0) -> None:
    engine.stop()
    time.sleep(down_s)  # an engine that stays away a while, as on a real restart
    engine.start()


def test_the_daemon_survives_an_engine_restart(tmp_path: Path, data: Path, engine: Engine) -> None:
    """The daemon waits for the engine, then restarts the tasks the engine killed, without
    spending their restart budget (max_retries 0 here: a crash would not be restarted)."""
    daemon = Daemon(
        tmp_path, write_manifest(tmp_path / "robot.yaml", data, retries=0), env=engine.env
    )
    try:
        until("signs running", lambda: daemon.signs()["samples"] > 0, 180)
        run_id = run_row(daemon.out)["id"]
        guard = guard_of(daemon.proc.pid)
        old = docker("inspect", "-f", "{{.Id}}", container_of(run_id, "signs"), env=engine.env)
        restart(engine)
        new = until(
            "signs in a new container",
            lambda: (
                daemon.signs()["state"] == "running"
                and docker(
                    "inspect", "-f", "{{.Id}}", container_of(run_id, "signs"), env=engine.env
                )
                not in ("", old)
            ),
            120,
        )
        assert new
        before = daemon.signs()["samples"]
        until("signs processing again", lambda: daemon.signs()["samples"] > before + 5, 120)
        assert run_containers(run_id, engine.env) == [f"{container_of(run_id, 'signs')} running"]
        assert guard.is_running(), "the guard outlived the engine restart"
    finally:
        assert daemon.stop() == 0, daemon.logs()[-3000:]
    logs = daemon.logs()
    print("\n" + "\n".join(line[-150:] for line in logs.splitlines() if "engine" in line))
    assert "the Docker engine stopped answering" in logs and "answers again" in logs
    assert "Traceback" not in logs
    assert run_row(daemon.out)["ended_utc"]
    assert not run_containers(run_id, engine.env), "nothing left behind"


def test_run_ends_cleanly_when_the_engine_restarts(
    tmp_path: Path, data: Path, engine: Engine
) -> None:
    run = Run(
        write_manifest(tmp_path / "robot.yaml", data),
        tmp_path / "run",
        "--duration",
        "120",
        env=engine.env,
    )
    until("the first samples", run.samples, 180)
    run_id = run.run_id()
    restart(engine)
    status, summary, stderr = run.finish()
    print("\n" + stderr.strip().splitlines()[-1][:300])
    assert status == 1
    assert "Traceback" not in stderr
    assert "ctxrobot run: task 'signs' failed" in stderr
    # The engine stops the containers before it stops answering: the line says either.
    assert (
        "the Docker engine stopped answering during the run" in stderr
        or "its container was stopped from outside, exit status 143 (SIGTERM)" in stderr
    ), stderr
    assert summary is not None and "signs" in summary["failed_tasks"]
    assert run_row(tmp_path / "run")["ended_utc"]
    assert not run_containers(run_id, engine.env), "nothing left behind"


def test_the_guard_waits_for_the_engine(tmp_path: Path, data: Path, engine: Engine) -> None:
    """Runtime killed (kill -9) while the engine is away: its guard waits for the engine,
    then removes the containers the engine left `Exited`."""
    run = Run(
        write_manifest(tmp_path / "robot.yaml", data),
        tmp_path / "run",
        "--duration",
        "120",
        env=engine.env,
    )
    until("the first samples", run.samples, 180)
    run_id = run.run_id()
    guard = guard_of(run.proc.pid)
    engine.stop()
    run.proc.kill()
    run.proc.wait(30)
    time.sleep(3)
    assert guard.is_running(), "the guard waits for the engine"
    engine.start()
    until(
        "the guard to remove the run's containers",
        lambda: not run_containers(run_id, engine.env),
        90,
    )
    guard.wait(60)


def test_the_daemon_readopts_tasks_that_outlive_the_engine(
    tmp_path: Path, data: Path, engine: Engine
) -> None:
    """With live-restore the containers survive an engine restart: the daemon keeps them
    (same container, no restart) and goes on using the engine once it is back."""
    if not isinstance(engine, PrivateEngine):
        pytest.skip("the machine's engine is not configured with live-restore")
    engine.live_restore = True
    restart(engine, down_s=0.0)
    try:
        daemon = Daemon(
            tmp_path, write_manifest(tmp_path / "robot.yaml", data, retries=0), env=engine.env
        )
        try:
            until("signs running", lambda: daemon.signs()["samples"] > 0, 180)
            run_id = run_row(daemon.out)["id"]
            name = container_of(run_id, "signs")
            old = docker("inspect", "-f", "{{.Id}}", name, env=engine.env)
            restart(engine)
            before = daemon.signs()["samples"]
            until("signs processing on", lambda: daemon.signs()["samples"] > before + 5, 60)
            assert docker("inspect", "-f", "{{.Id}}", name, env=engine.env) == old
            assert daemon.signs()["state"] == "running"
            until("the daemon to see the engine back", lambda: "answers again" in daemon.logs())
            assert daemon.client.call("ps")[0]["name"] == name, "the engine answers the daemon"
        finally:
            assert daemon.stop() == 0, daemon.logs()[-3000:]
        logs = daemon.logs()
        assert "the Docker engine stopped answering" in logs and "answers again" in logs
        assert "task signs restart" not in logs, "no task was restarted"
        assert not run_containers(run_id, engine.env), "nothing left behind"
    finally:
        engine.live_restore = False
        restart(engine, down_s=0.0)
