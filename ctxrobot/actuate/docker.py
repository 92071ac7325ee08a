"""The lifecycle path: create, start, stop and remove task containers with the Docker SDK.

Lifecycle changes are rare and may take Docker's tens of milliseconds; CPU re-allocation is
frequent and goes through the cgroup fast path (:mod:`ctxrobot.actuate.cgroups`).
:meth:`DockerBackend.controller_for` hands out that fast path when the container's cgroup
files are writable, and otherwise a :class:`DockerApiController` that does the same through
``docker update`` / ``pause`` (correct, but 20-70 ms per change: one field to a whole allocation).

Every container carries the labels of ARCHITECTURE.md ("Container labels"), so a later run
can find and clean up what a crashed one left behind.

Task containers get least privilege by default (:class:`Security`): the unprivileged task
user, no network, no capabilities, no privilege gain through setuid files, a read-only root
filesystem with a small tmpfs at /tmp, a PID limit, and no swap beyond the memory limit. A
task's manifest may loosen the first four (its ``security:`` section); each loosening is
logged as a warning when the container is created.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors
import psutil
from docker.models.containers import Container
from docker.types import Mount

from ctxrobot.actuate.cgroups import (
    DEFAULT_PERIOD_US,
    CgroupError,
    CgroupV1Controller,
    CgroupV2Controller,
    CpuController,
    check_weight,
    discover,
    quota_us,
    weight_to_shares,
)
from ctxrobot.model.errors import EngineUnavailableError, ImageMissingError, MountError

log = logging.getLogger(__name__)

LABEL_MANAGED = "ctxrobot.managed"
LABEL_TASK = "ctxrobot.task"
LABEL_RUN = "ctxrobot.run"
LABEL_INSTANCE = "ctxrobot.instance"


class ContainerError(RuntimeError):
    """A container could not be created, found or controlled."""


def _mount_problem(explanation: str) -> str | None:
    """``SOURCE at TARGET (why)`` from the OCI runtime's refusal of a bind mount, whose
    message also names the overlay path of the container's root filesystem (noise)."""
    match = re.search(r'error mounting "([^"]+)" to rootfs at "([^"]+)": (.*)', explanation)
    if match is None:
        return None
    source, target, why = match.groups()
    why = re.sub(r'"[^"]*"\s*', "", why).removesuffix(": unknown").strip()
    return f"{source} at {target} ({why})"


def connect() -> docker.DockerClient:
    """A client of the engine ``DOCKER_HOST`` names (default: the local socket)."""
    try:
        return docker.from_env()
    except docker.errors.DockerException as err:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise EngineUnavailableError(
            f"the Docker engine does not answer at {where}: start it with tools/setup "
            "(or `systemctl start docker`)"
        ) from err


@dataclass(frozen=True)
class BindMount:
    """A host path bind-mounted into the container. ``source`` is made absolute here, at
    the one place every mount is built: Docker rejects a relative bind source."""

    source: Path | str
    target: str
    read_only: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", Path(self.source).resolve())


#: The unprivileged user every task image runs as; the host gives it the task sockets.
TASK_UID = 10001
TASK_USER = f"{TASK_UID}:{TASK_UID}"
#: Enough for Python, OpenBLAS/OpenCV threads and docker-init on a 4-core Pi, not a fork bomb.
DEFAULT_PIDS_LIMIT = 256
#: The one writable place under a read-only root. tmpfs pages count against the container's
#: memory limit, so this also bounds what a task can hoard there.
TMP_MOUNT = {"/tmp": "rw,nosuid,nodev,noexec,size=64m,mode=1777"}


@dataclass(frozen=True)
class Security:
    """How far a task container is confined. The defaults are least privilege; a task that
    needs more sets the manifest's ``security:`` section, which the runtime copies here.

    ``cap_add``: capabilities given back (all are dropped); ``read_only_root``: the root
    filesystem is read-only (/tmp and the mounts stay writable); ``pids_limit``: most
    processes and threads at once (None: no limit); ``no_new_privileges``: setuid files
    cannot raise privileges.
    """

    cap_add: tuple[str, ...] = ()
    read_only_root: bool = True
    pids_limit: int | None = DEFAULT_PIDS_LIMIT
    no_new_privileges: bool = True

    def loosened(self) -> list[str]:
        """One phrase per setting that differs from the default, for the warning."""
        default = Security()
        said = []
        if self.cap_add:
            said.append(f"capabilities {', '.join(self.cap_add)} added back")
        if self.read_only_root != default.read_only_root:
            said.append("a writable root filesystem")
        if self.pids_limit != default.pids_limit:
            limit = (
                "no PID limit" if self.pids_limit is None else f"a PID limit of {self.pids_limit}"
            )
            said.append(f"{limit} instead of {default.pids_limit}")
        if self.no_new_privileges != default.no_new_privileges:
            said.append("setuid privilege gain allowed (no-new-privileges off)")
        return said


@dataclass(frozen=True)
class ContainerSpec:
    """What to run for one task. ``task`` and ``run_id`` become the ctxrobot labels."""

    name: str
    image: str
    task: str
    run_id: str
    command: list[str] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[BindMount, ...] = ()
    # Extra labels; the ctxrobot.* labels are always set by the backend and win.
    labels: Mapping[str, str] = field(default_factory=dict)
    memory_bytes: int | None = None
    cgroup_parent: str | None = None
    cpuset_cpus: str | None = None
    # None: the image's own user.
    user: str | None = TASK_USER
    working_dir: str | None = None
    # Tasks talk to the host over a bind-mounted Unix socket; they need no network.
    network_mode: str = "none"
    security: Security = Security()
    # A real PID 1 (docker-init) forwards SIGTERM, so stop() does not wait out its timeout
    # on a Python process that ignores signals as PID 1.
    init: bool = True


class DockerApiController:
    """:class:`~ctxrobot.cgroups.CpuController` through the Docker API (the slow fallback).

    Used when the cgroup files are not writable (e.g. rootless Docker, or ctxrobot itself in
    a container without the cgroup tree). Like the fast path it does what it is told: the
    scheduler's core decides what changed, once.
    """

    def __init__(self, container: Container) -> None:
        self.container = container

    def __repr__(self) -> str:
        return f"DockerApiController({self.container.name})"

    def set_weight(self, weight: int) -> None:
        check_weight(weight)
        self.container.update(cpu_shares=weight_to_shares(weight))

    def set_share_cap(self, share: float | None, ncpus: float) -> None:
        quota = -1 if share is None else quota_us(share, ncpus, DEFAULT_PERIOD_US)
        self.container.update(cpu_quota=quota, cpu_period=DEFAULT_PERIOD_US)

    def freeze(self) -> None:
        self.container.reload()
        if self.container.status != "paused":
            self.container.pause()

    def thaw(self) -> None:
        self.container.reload()
        if self.container.status == "paused":
            self.container.unpause()

    @property
    def frozen(self) -> bool:
        self.container.reload()
        return self.container.status == "paused"

    def set_cpuset(self, cpus: str) -> None:
        self.container.update(cpuset_cpus=cpus)

    def usage_ns(self) -> int:
        stats = self.container.stats(stream=False, one_shot=True)
        return int(stats["cpu_stats"]["cpu_usage"]["total_usage"])

    def read_limits(self) -> tuple[int, float | None]:
        self.container.reload()
        host = self.container.attrs["HostConfig"]
        shares = host.get("CpuShares") or 1024
        quota, period = host.get("CpuQuota") or 0, host.get("CpuPeriod") or DEFAULT_PERIOD_US
        return max(1, round(shares * 100 / 1024)), quota / period if quota > 0 else None


class DockerBackend:
    """Docker lifecycle for ctxrobot task containers.

    ``instance`` is the owner pid written into ``ctxrobot.instance`` (default: this process);
    ``cgroup_root`` is where :func:`~ctxrobot.cgroups.discover` looks (tests change it).
    """

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        *,
        instance: int | None = None,
        cgroup_root: Path = Path("/"),
    ) -> None:
        self.client = client if client is not None else connect()
        self.instance = os.getpid() if instance is None else instance
        self.cgroup_root = cgroup_root
        self._warned_fallback = False

    def get(self, name: str) -> Container | None:
        try:
            return self.client.containers.get(name)
        except docker.errors.NotFound:
            return None

    def create_and_start(self, spec: ContainerSpec) -> Container:
        """Create and start ``spec``'s container.

        A leftover container of the same name is removed first when it is ours and its owner
        is gone (a crashed run); anything else with that name is an error, never removed.
        """
        existing = self.get(spec.name)
        if existing is not None:
            if not self._is_stale(existing):
                raise ContainerError(
                    f"container name {spec.name!r} is taken by a container that is not a stale "
                    "ctxrobot one; remove it or choose another name"
                )
            log.info("removing stale container %s before re-creating it", spec.name)
            self._remove(existing)
        container = self._create(spec)
        self._start(spec, container)
        container.reload()
        return container

    def _create(self, spec: ContainerSpec) -> Container:
        """The container, created with ctxrobot's labels and least privileges."""
        labels = {
            **spec.labels,
            LABEL_MANAGED: "1",
            LABEL_TASK: spec.task,
            LABEL_RUN: spec.run_id,
            LABEL_INSTANCE: str(self.instance),
        }
        mounts = [
            Mount(target=m.target, source=str(m.source), type="bind", read_only=m.read_only)
            for m in spec.mounts
        ]
        for loosened in spec.security.loosened():
            log.warning(
                "task %s runs with %s: its manifest's security section says so",
                spec.task,
                loosened,
            )
        security = spec.security
        try:
            container = self.client.containers.create(
                spec.image,
                spec.command,
                name=spec.name,
                environment=dict(spec.env),
                labels=labels,
                mounts=mounts,
                mem_limit=spec.memory_bytes,
                # Memory plus swap equal to memory: no swap, so a task over its limit is
                # stopped instead of thrashing the SD card.
                memswap_limit=spec.memory_bytes,
                cgroup_parent=spec.cgroup_parent,
                cpuset_cpus=spec.cpuset_cpus,
                user=spec.user,
                working_dir=spec.working_dir,
                network_mode=spec.network_mode,
                init=spec.init,
                cap_drop=["ALL"],
                cap_add=list(security.cap_add) or None,
                security_opt=["no-new-privileges:true"] if security.no_new_privileges else None,
                read_only=security.read_only_root,
                tmpfs=TMP_MOUNT,
                pids_limit=security.pids_limit,
                detach=True,
            )
        except docker.errors.ImageNotFound as err:
            raise ImageMissingError(
                f"image {spec.image!r} of task {spec.task!r} is not built: run tools/setup"
            ) from err
        except docker.errors.APIError as err:
            if "mount" in str(err.explanation or ""):
                raise MountError(
                    f"task {spec.task!r}: Docker refused a mount ({err.explanation}); check the "
                    "task's mounts in the manifest (host paths must exist)"
                ) from err
            raise ContainerError(f"cannot create container {spec.name!r}: {err}") from err
        return container

    def _start(self, spec: ContainerSpec, container: Container) -> None:
        """Start a created container; one that cannot start is removed."""
        try:
            container.start()
        except docker.errors.APIError as err:
            container.remove(force=True)
            problem = _mount_problem(str(err.explanation or ""))
            if problem:
                raise MountError(
                    f"task {spec.task!r}: Docker cannot mount {problem}; check the task's mounts "
                    "in the manifest"
                ) from err
            raise ContainerError(f"cannot start container {spec.name!r}: {err}") from err

    def _thaw(self, container: Container) -> None:
        """Undo any freeze so the container can receive signals and stop.

        A frozen process cannot act on SIGTERM or even SIGKILL (v1 freezer), so stopping a
        frozen container would hang until Docker gives up. Docker's own pause shows up as
        status "paused"; a fast-path freeze does not (Docker does not know about it), so the
        cgroup itself is asked through a fresh controller (empty cache: the thaw is written).
        """
        container.reload()
        if container.status == "paused":
            container.unpause()
            container.reload()
        if container.status != "running":
            return
        try:
            controller = self.cgroup_of(container)
            if controller.frozen:
                controller.thaw()
        except (CgroupError, ContainerError) as err:
            # Exited meanwhile (nothing to thaw), or no cgroup files: then nothing but
            # Docker's pause can have frozen it.
            log.debug("cannot check the freezer of %s: %s", container.name, err)

    def thaw(self, name: str) -> bool:
        """Undo any freeze of ``name``, Docker's pause or a write to its freezer; False when
        there is no such container."""
        container = self.get(name)
        if container is None:
            return False
        self._thaw(container)
        return True

    def stop(self, name: str, timeout: float = 10) -> bool:
        """Thaw and stop ``name``; False when there is no such container."""
        container = self.get(name)
        if container is None:
            return False
        self._thaw(container)
        container.stop(timeout=timeout)
        return True

    def remove(self, name: str) -> bool:
        """Thaw, stop and remove ``name``; False when there is no such container."""
        container = self.get(name)
        if container is None:
            return False
        self._remove(container)
        return True

    def _remove(self, container: Container) -> None:
        try:
            self._thaw(container)
            container.remove(force=True)
        except docker.errors.NotFound:
            pass  # gone meanwhile (e.g. removed by a concurrent cleanup): that is the goal
        except docker.errors.APIError as err:
            # 409 "removal already in progress": a guard or an earlier cleanup is on it.
            if err.status_code != 409:
                raise

    def list_managed(self, run_id: str | None = None) -> list[Container]:
        """Our containers (any state), optionally only those of one run."""
        filters = [f"{LABEL_MANAGED}=1"]
        if run_id is not None:
            filters.append(f"{LABEL_RUN}={run_id}")
        # A container removed between the listing and its inspection (another run's
        # cleanup, a guard) is simply not listed.
        return self.client.containers.list(
            all=True, filters={"label": filters}, ignore_removed=True
        )

    def _is_stale(self, container: Container) -> bool:
        """Ours, and the process that created it is gone."""
        labels = container.labels
        if labels.get(LABEL_MANAGED) != "1":
            return False
        owner = labels.get(LABEL_INSTANCE, "")
        return not (owner.isdigit() and psutil.pid_exists(int(owner)))

    def cleanup(self, run_id: str | None = None) -> list[str]:
        """Remove containers; return their names.

        With ``run_id``: every container of that run, whoever owns it (the caller asks for
        it explicitly). Without: only stale ones, i.e. whose owner pid is no longer alive,
        so a concurrent live run is never touched.
        """
        if run_id is not None:
            targets = self.list_managed(run_id)
        else:
            targets = [c for c in self.list_managed() if self._is_stale(c)]
        for container in targets:
            self._remove(container)
        return [c.name for c in targets]

    def cgroup_of(self, container: Container) -> CgroupV1Controller | CgroupV2Controller:
        """The container's own cgroup, read from its init process.

        Refuses a cgroup whose path does not name the container: a pid that was reused
        after the container died would otherwise aim the fast path at the host's root
        cgroup.
        """
        pid = container.attrs["State"]["Pid"]
        if not pid:
            raise ContainerError(f"container {container.name!r} is not running")
        controller = discover(pid, self.cgroup_root)
        if container.id not in str(controller.location):
            raise ContainerError(
                f"pid {pid} of container {container.name!r} is in cgroup "
                f"{controller.location}, not the container's own (it exited meanwhile)"
            )
        return controller

    def controller_for(self, container: Container | str) -> CpuController:
        """The fast path for ``container`` if its cgroup files are writable, else the API."""
        if isinstance(container, str):
            found = self.get(container)
            if found is None:
                raise ContainerError(f"no container named {container!r}")
            container = found
        container.reload()
        pid = container.attrs["State"]["Pid"]
        if not pid:
            raise ContainerError(f"container {container.name!r} is not running")
        try:
            controller = self.cgroup_of(container)
            controller.probe()
        except CgroupError as err:
            if not self._warned_fallback:
                log.warning(
                    "cgroup files not writable at %s; falling back to the Docker API "
                    "(20-70 ms per change) [%s]",
                    err.path or f"/proc/{pid}/cgroup",
                    err,
                )
                self._warned_fallback = True
            return DockerApiController(container)
        return controller
