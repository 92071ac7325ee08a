"""Real engine, real cgroups: the fast path and the Docker fallback move real CPU time.

CPU use is read from each container's own cgroup accounting (``cpuacct.usage``), so the
tests measure what the kernel gave, not what the burner claims. All containers live under
a per-test-session parent cgroup with a high weight: on this shared 2-core machine that
keeps other host load from starving the burners, so a quota or weight split is what
limits them. Windows are >= 2 s and tolerances 15 %; nothing is retried.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import psutil
import pytest
from docker.models.containers import Container

from ctxrobot.actuate.actuator import Actuator
from ctxrobot.actuate.cgroups import (
    CgroupV1Controller,
    CgroupV2Controller,
    CpuController,
    ParentCgroup,
)
from ctxrobot.actuate.docker import (
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_RUN,
    LABEL_TASK,
    ContainerSpec,
    DockerApiController,
    DockerBackend,
)
from ctxrobot.model.allocation import Machine, TaskAllocation
from tests.conftest import require_image

pytestmark = pytest.mark.docker

IMAGE = "ctxrobot/burner"
WINDOW_S = 2.5


@pytest.fixture(scope="module")
def parent() -> Iterator[ParentCgroup]:
    require_image(IMAGE)
    if os.geteuid() != 0:
        pytest.skip("the cgroup fast path needs root (writable cgroup files)")
    cgroup = ParentCgroup(f"ctxrobot-test-{os.getpid()}")
    cgroup.create()
    cgroup.set_weight(10000)
    yield cgroup
    cgroup.remove()


@pytest.fixture
def run_id() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def backend(parent: ParentCgroup, run_id: str) -> Iterator[DockerBackend]:
    backend = DockerBackend()
    yield backend
    backend.cleanup(run_id)


StartBurner = Callable[..., Container]


@pytest.fixture
def start_burner(backend: DockerBackend, parent: ParentCgroup, run_id: str) -> StartBurner:
    def start(
        task: str, *, owner: DockerBackend | None = None, cpuset: str | None = None
    ) -> Container:
        spec = ContainerSpec(
            name=f"ctxrobot-{run_id}-{task}",
            image=IMAGE,
            task=task,
            run_id=run_id,
            cgroup_parent=parent.docker_parent,
            cpuset_cpus=cpuset,
        )
        return (owner or backend).create_and_start(spec)

    return start


def cpu_rate(controller: CpuController, seconds: float = WINDOW_S) -> float:
    """CPUs' worth of time the container used over ``seconds`` of wall time."""
    u0, t0 = controller.usage_ns(), time.monotonic()
    time.sleep(seconds)
    u1, t1 = controller.usage_ns(), time.monotonic()
    return (u1 - u0) / 1e9 / (t1 - t0)


def fast_controller(backend: DockerBackend, container: Container) -> CpuController:
    controller = backend.controller_for(container)
    assert isinstance(controller, CgroupV1Controller | CgroupV2Controller), (
        f"expected the cgroup fast path as root on this host, got {controller!r}"
    )
    return controller


def test_labels_and_listing(backend: DockerBackend, start_burner: StartBurner, run_id: str) -> None:
    container = start_burner("slam")
    assert container.labels[LABEL_MANAGED] == "1"
    assert container.labels[LABEL_TASK] == "slam"
    assert container.labels[LABEL_RUN] == run_id
    assert container.labels[LABEL_INSTANCE] == str(os.getpid())
    assert [c.name for c in backend.list_managed(run_id)] == [container.name]
    assert backend.remove(container.name)
    assert backend.list_managed(run_id) == []
    assert not backend.remove(container.name)


def test_quota_through_the_fast_path_caps_cpu(
    backend: DockerBackend, start_burner: StartBurner
) -> None:
    controller = fast_controller(backend, start_burner("burn"))
    ncpus = 2  # shares are fractions of a 2-CPU machine here, whatever the host has
    for share in (0.25, 0.1):  # 0.5 CPU, then 0.2 CPU
        controller.set_share_cap(share, ncpus)
        time.sleep(0.3)  # let the previous cap's period run out
        rate = cpu_rate(controller)
        assert rate == pytest.approx(share * ncpus, rel=0.15), f"cap {share}: used {rate:.3f}"


def test_freeze_stops_progress_and_thaw_resumes(
    backend: DockerBackend, start_burner: StartBurner
) -> None:
    controller = fast_controller(backend, start_burner("burn"))
    controller.freeze()
    assert controller.frozen
    time.sleep(0.2)  # v1 freezing is asynchronous: let every task reach the fridge
    frozen_rate = cpu_rate(controller, 2.0)
    controller.thaw()
    assert not controller.frozen
    thawed_rate = cpu_rate(controller, 2.0)
    assert frozen_rate < 0.005, f"frozen container still used {frozen_rate:.4f} CPU"
    assert thawed_rate > 0.5, f"thawed burner used only {thawed_rate:.3f} CPU"


def test_weights_split_one_cpu(backend: DockerBackend, start_burner: StartBurner) -> None:
    """Two burners pinned to the same CPU share it in the ratio of their weights."""
    controllers = {task: fast_controller(backend, start_burner(task)) for task in ("a", "b")}
    for controller in controllers.values():
        controller.set_cpuset("1")  # the fast path moves them onto one CPU
    actuator = Actuator(controllers, Machine(2))
    for wa, wb in ((300, 100), (100, 300)):
        actuator.apply(
            {"a": (None, TaskAllocation(weight=wa)), "b": (None, TaskAllocation(weight=wb))}
        )
        time.sleep(0.3)
        u0 = {t: c.usage_ns() for t, c in controllers.items()}
        time.sleep(WINDOW_S)
        used = {t: c.usage_ns() - u0[t] for t, c in controllers.items()}
        fraction_a = used["a"] / (used["a"] + used["b"])
        expected = wa / (wa + wb)
        assert fraction_a == pytest.approx(expected, rel=0.15), f"weights {wa}:{wb}: {used}"


def test_stop_thaws_a_frozen_container_first(
    backend: DockerBackend, start_burner: StartBurner
) -> None:
    """The burner exits 0 on SIGTERM; it can only see the signal if stop() thawed it."""
    container = start_burner("burn")
    # Its first report comes after it installed its SIGTERM handler; before that, SIGTERM
    # kills it (143) whatever stop() did.
    deadline = time.monotonic() + 60
    while not container.logs(stdout=True, stderr=False) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert container.logs(stdout=True, stderr=False), "the burner reported"
    fast_controller(backend, container).freeze()
    assert backend.stop(container.name, timeout=5)
    container.reload()
    assert container.status == "exited"
    assert container.attrs["State"]["ExitCode"] == 0


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not psutil.pid_exists(proc.pid)
    return proc.pid


def test_cleanup_removes_stale_containers_frozen_or_not(
    backend: DockerBackend, start_burner: StartBurner, run_id: str
) -> None:
    orphan_owner = DockerBackend(instance=_dead_pid())
    orphan = start_burner("orphan", owner=orphan_owner)
    frozen_orphan = start_burner("frozen", owner=orphan_owner)
    fast_controller(backend, frozen_orphan).freeze()
    alive = start_burner("alive")

    removed = backend.cleanup()  # stale only: owners that are gone

    assert set(removed) >= {orphan.name, frozen_orphan.name}
    assert alive.name not in removed
    remaining = {c.name for c in backend.list_managed(run_id)}
    assert remaining == {alive.name}
    assert backend.cleanup(run_id) == [alive.name]  # a named run goes whoever owns it
    assert backend.list_managed(run_id) == []


def test_create_replaces_a_stale_container_of_the_same_name(
    backend: DockerBackend, start_burner: StartBurner
) -> None:
    old = start_burner("slam", owner=DockerBackend(instance=_dead_pid()))
    new = start_burner("slam")
    assert new.id != old.id
    with pytest.raises(docker.errors.NotFound):
        backend.client.containers.get(old.id)


def test_docker_api_fallback_controller(backend: DockerBackend, start_burner: StartBurner) -> None:
    container = start_burner("burn")
    fast = fast_controller(backend, container)  # only to read back what Docker wrote
    controller = DockerApiController(container)

    controller.set_weight(300)
    controller.set_share_cap(0.25, 2)
    controller.set_cpuset("0")
    container.reload()
    host = container.attrs["HostConfig"]
    assert (host["CpuShares"], host["CpuQuota"], host["CpusetCpus"]) == (3072, 50000, "0")
    assert isinstance(fast, CgroupV1Controller)
    assert (fast.dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "50000"

    controller.set_share_cap(None, 2)
    assert (fast.dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "-1"

    controller.freeze()
    assert controller.frozen
    assert fast.frozen
    before = controller.usage_ns()
    time.sleep(1.0)
    assert controller.usage_ns() - before < 5_000_000
    controller.thaw()
    assert not controller.frozen
    assert controller.usage_ns() > before


def test_controller_for_falls_back_when_cgroups_are_unreachable(
    backend: DockerBackend,
    start_burner: StartBurner,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    container = start_burner("burn")
    blind = DockerBackend(backend.client, cgroup_root=tmp_path)  # no /proc, no cgroups there
    with caplog.at_level(logging.WARNING, logger="ctxrobot.actuate.docker"):
        first = blind.controller_for(container)
        second = blind.controller_for(container.name)
    assert isinstance(first, DockerApiController)
    assert isinstance(second, DockerApiController)
    warnings = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "cgroup files not writable at" in warnings[0]
    assert "20-70 ms per change" in warnings[0]
