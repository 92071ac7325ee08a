"""Task containers run with least privilege, checked on running containers.

The first test runs the three real tasks through the runtime, exactly as `ctxrobot run`
starts them, and inspects each container while it serves: `docker inspect` for what Docker
was told, and the container's own /proc and cgroup files for what the kernel enforces. That
the runtime's start returned at all means every task set itself up under these limits
(read-only root, no capabilities, ...). The others check each manifest override on a
burner container, and that the PID limit really stops a runaway.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ctxrobot.actuate.docker import (
    DEFAULT_PIDS_LIMIT,
    LABEL_RUN,
    ContainerSpec,
    DockerBackend,
    Security,
)
from ctxrobot.manifest.schema import load_manifest
from ctxrobot.service.loop import runtime_cpu
from ctxrobot.service.runtime import RunOptions, Runtime
from tests.conftest import REPO, require_data, require_image

pytestmark = pytest.mark.docker

TASKS = {"slam": "lidar", "signs": "camera", "speech": "mic"}
MEMORY = 512 * 1024 * 1024


def inspect(name: str) -> dict[str, Any]:
    out = subprocess.run(["docker", "inspect", name], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)[0]


def in_container(name: str, script: str) -> str:
    """Run `script` with the container's Python, as the container's user."""
    proc = subprocess.run(
        ["docker", "exec", name, "python3", "-c", script], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def assert_least_privilege(name: str, memory: int) -> None:
    info = inspect(name)
    host = info["HostConfig"]
    assert info["State"]["Running"]
    assert info["Config"]["User"] == "10001:10001"
    assert host["NetworkMode"] == "none"
    assert host["CapDrop"] == ["ALL"]
    assert not host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert host["ReadonlyRootfs"] is True
    assert set(host["Tmpfs"]) == {"/tmp"}
    assert "noexec" in host["Tmpfs"]["/tmp"] and "size=64m" in host["Tmpfs"]["/tmp"]
    assert host["PidsLimit"] == DEFAULT_PIDS_LIMIT
    assert host["Memory"] == memory
    assert host["MemorySwap"] == memory  # memory + swap = memory: no swap


# What the kernel enforces, seen from inside: no capabilities, no privilege gain, a root
# filesystem that refuses writes, a /tmp that takes them.
KERNEL_VIEW = """
import json, os
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
view = {key: status[key].strip() for key in ("CapEff", "CapPrm", "CapBnd", "NoNewPrivs")}
view["uid"] = str(os.getuid())
for target in ("/probe", "/app/probe", "/tmp/probe"):
    try:
        open(target, "w").close()
        view["write " + target] = "ok"
    except OSError as err:
        view["write " + target] = err.strerror
print(json.dumps(view))
"""


def kernel_view(name: str) -> dict[str, str]:
    return json.loads(in_container(name, KERNEL_VIEW))


def manifest_text(data: Path) -> str:
    tasks = "".join(
        f"  - name: {task}\n"
        f"    image: ctxrobot/{task}\n"
        f"    input: {source}\n"
        f"    resources: {{memory: {MEMORY}}}\n"
        f"    deadline_ms: 500\n"
        for task, source in TASKS.items()
    )
    return (
        "version: 1\n"
        "robot: {name: locked-rover, cpus: 2}\n"
        f"data_dir: {data}\n"
        f"scenario: {REPO / 'config' / 'scenarios' / 'quick.yaml'}\n"
        f"tasks:\n{tasks}"
        "scheduler: {policy: ctx}\n"
    )


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Runtime]:
    """The three real tasks, started by the runtime, serving."""
    for task in TASKS:
        require_image(f"ctxrobot/{task}")
    data = require_data()
    manifest_path = tmp_path / "robot.yaml"
    manifest_path.write_text(manifest_text(data))
    runtime = Runtime(
        load_manifest(manifest_path), RunOptions(out_dir=tmp_path / "run", duration_s=8)
    )
    try:
        runtime.start()  # returns once every task said hello from its container
        yield runtime
    finally:
        runtime.request_stop()
        runtime.stop()


def test_running_task_containers_have_least_privilege(running: Runtime) -> None:
    running_of_this_run = ["--filter", f"label={LABEL_RUN}={running.run_id}"]
    names = subprocess.run(
        ["docker", "ps", *running_of_this_run, "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(names) == len(TASKS)
    for name in names:
        assert_least_privilege(name, MEMORY)
        view = kernel_view(name)
        assert view["uid"] == "10001"
        for key in ("CapEff", "CapPrm", "CapBnd"):
            assert int(view[key], 16) == 0, f"{name}: {key} {view[key]}"
        assert view["NoNewPrivs"] == "1"
        assert view["write /probe"] == "Read-only file system"
        assert view["write /app/probe"] == "Read-only file system"
        assert view["write /tmp/probe"] == "ok"
    running.wait()  # the rest of the 8 s: the tasks work under these limits too
    summary = running.stop()
    assert summary is not None
    for task in TASKS:
        assert summary["tasks"][task]["samples"] > 0, f"{task} served nothing: {summary}"


# -- overrides and limits, on the burner -------------------------------------------------
StartBurner = Callable[..., str]


@pytest.fixture
def start_burner() -> Iterator[StartBurner]:
    """Starts a burner container for `task` with extra ContainerSpec fields; its name."""
    require_image("ctxrobot/burner")
    backend = DockerBackend()
    run_id = f"privileges-{uuid.uuid4().hex[:8]}"

    def start(task: str, **spec: Any) -> str:
        name = f"ctxrobot-{run_id}-{task}"
        backend.create_and_start(
            ContainerSpec(name=name, image="ctxrobot/burner", task=task, run_id=run_id, **spec)
        )
        return name

    yield start
    backend.cleanup(run_id)


def test_defaults_log_no_warning(
    start_burner: StartBurner, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ctxrobot.actuate.docker"):
        name = start_burner("plain", memory_bytes=128 * 1024 * 1024)
    assert_least_privilege(name, 128 * 1024 * 1024)
    assert caplog.records == []


def test_each_override_is_applied_and_said_once(
    start_burner: StartBurner, caplog: pytest.LogCaptureFixture
) -> None:
    loose = Security(
        cap_add=("SYS_NICE",), read_only_root=False, pids_limit=1024, no_new_privileges=False
    )
    with caplog.at_level(logging.WARNING, logger="ctxrobot.actuate.docker"):
        name = start_burner("loose", security=loose)
    host = inspect(name)["HostConfig"]
    assert host["CapDrop"] == ["ALL"] and host["CapAdd"] == ["SYS_NICE"]
    assert not host["SecurityOpt"]
    assert host["ReadonlyRootfs"] is False
    assert host["PidsLimit"] == 1024
    view = kernel_view(name)
    assert view["write /probe"] == "Permission denied"  # writable root, but not for uid 10001
    assert view["write /tmp/probe"] == "ok"
    assert view["NoNewPrivs"] == "0"
    assert int(view["CapBnd"], 16) == 1 << 23  # CAP_SYS_NICE only
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "task loose runs with capabilities SYS_NICE added back: its manifest's security "
        "section says so",
        "task loose runs with a writable root filesystem: its manifest's security section says so",
        "task loose runs with a PID limit of 1024 instead of 256: its manifest's security "
        "section says so",
        "task loose runs with setuid privilege gain allowed (no-new-privileges off): its "
        "manifest's security section says so",
    ]


RUNAWAY = """
import threading
started = 0
try:
    for _ in range(1000):
        threading.Thread(target=threading.Event().wait, daemon=True).start()
        started += 1
except RuntimeError:
    pass
print(started)
"""


def test_the_pid_limit_stops_a_runaway(start_burner: StartBurner) -> None:
    name = start_burner("runaway")
    started = int(in_container(name, RUNAWAY))
    print(f"\nthreads a task could start under PidsLimit {DEFAULT_PIDS_LIMIT}: {started}")
    assert 100 < started < DEFAULT_PIDS_LIMIT


def test_only_the_decision_thread_is_real_time_and_the_runtime_keeps_to_one_cpu(
    running: Runtime,
) -> None:
    """The runtime's threads share one CPU (see `runtime_cpu`); the decision thread alone is
    SCHED_FIFO; the task containers are not confined with it."""
    cpu = runtime_cpu()
    threads = {t.name: t.native_id for t in threading.enumerate() if t.native_id is not None}
    assert "decide" in threads
    for name, tid in threads.items():
        if cpu is not None:
            assert os.sched_getaffinity(tid) == {cpu}, name
        policy = os.sched_getscheduler(tid)
        assert policy == (os.SCHED_FIFO if name == "decide" else os.SCHED_OTHER), name
    if cpu is None or (os.cpu_count() or 1) < 2:
        return
    for name in running.container_names.values():
        pid = inspect(name)["State"]["Pid"]
        assert os.sched_getaffinity(pid) - {cpu}, f"{name} is confined to the runtime's CPU"
