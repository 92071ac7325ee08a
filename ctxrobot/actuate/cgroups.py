"""The CPU fast path: write a container's cgroup files directly.

Re-sharing the CPU through ``docker update`` costs tens of milliseconds (a CLI or HTTP round
trip, the daemon, then runc). The kernel only needs a short ``write(2)`` to a cgroup file, so
the controllers here open the file, write the value and close it: no subprocess, no daemon.
Controllers write what they are told: deciding what changed is the scheduler core's job
(``ctxrobot.model.allocation.changed``), done once, not again per file.

Vocabulary (see ARCHITECTURE.md, "Allocation vocabulary"):

- ``weight``: 1..10000 in cgroup v2 units, default 100; v1 ``cpu.shares = weight*1024//100``.
- ``share``: fraction of the whole machine (0 < share <= 1); quota per period is
  ``share * ncpus * period``.
- ``frozen``: v1 ``freezer.state``, v2 ``cgroup.freeze``.

Discovery starts from a container's init pid: ``/proc/<pid>/cgroup`` names the cgroup path
in each hierarchy and ``/proc/self/mountinfo`` says where each hierarchy is mounted. This
covers the cgroupfs and systemd drivers alike, since both only change the path. Every
filesystem access goes through a ``root`` prefix so that tests can build a fake tree
(``<root>/proc/...``, ``<root>/sys/fs/cgroup/...``) in a temp dir.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from ctxrobot.model.errors import CgroupPermissionError

log = logging.getLogger(__name__)

WEIGHT_MIN, WEIGHT_MAX, WEIGHT_DEFAULT = 1, 10000, 100
V1_SHARES_MIN, V1_SHARES_MAX = 2, 262144
# The kernel refuses CFS quotas below 1 ms per period (EINVAL).
MIN_QUOTA_US = 1000
DEFAULT_PERIOD_US = 100_000
#: The period of an envelope's quota (`--cpus`): see ParentCgroup.set_cpus.
ENVELOPE_PERIOD_US = 10_000
# The v1 hierarchies a container controller needs; ``cpu`` and ``cpuacct`` may be one
# hierarchy ("cpu,cpuacct") or two separate mounts, as on some hosts.
V1_SUBSYSTEMS = ("cpu", "cpuacct", "cpuset", "freezer")


class CgroupError(RuntimeError):
    """A cgroup could not be found, read or written.

    ``errno`` and ``path`` are kept when known, so callers can tell "not allowed" (fall back
    to the Docker API) from "quota too high for the parent" (EINVAL) and say where.
    """

    def __init__(self, message: str, errno_: int | None = None, path: Path | None = None) -> None:
        super().__init__(message)
        self.errno = errno_
        self.path = path


@runtime_checkable
class CpuController(Protocol):
    """CPU control of one container, whatever carries it (cgroup files or the Docker API)."""

    def set_weight(self, weight: int) -> None:
        """Relative CPU weight, 1..10000 in cgroup v2 units (100 = default)."""
        ...

    def set_share_cap(self, share: float | None, ncpus: float) -> None:
        """Cap at ``share`` of a machine with ``ncpus`` CPUs (fractional for an envelope such
        as ``--cpus 1.5``); None removes the cap."""
        ...

    def freeze(self) -> None:
        """Stop every process of the container without killing it."""
        ...

    def thaw(self) -> None:
        """Undo :meth:`freeze`."""
        ...

    @property
    def frozen(self) -> bool:
        """Whether the container is frozen (or freezing) right now."""
        ...

    def set_cpuset(self, cpus: str) -> None:
        """Restrict the container to the CPUs listed (kernel list syntax: ``"0"``, ``"0-1"``)."""
        ...

    def usage_ns(self) -> int:
        """Total CPU time consumed by the container so far, in nanoseconds."""
        ...

    def read_limits(self) -> tuple[int, float | None]:
        """(weight in v2 units, CPU cap in cores or None), as the kernel has them now."""
        ...


def weight_to_shares(weight: int) -> int:
    """v2 weight → v1 ``cpu.shares`` (100 → 1024), clamped to what the kernel accepts."""
    check_weight(weight)
    return min(max(weight * 1024 // 100, V1_SHARES_MIN), V1_SHARES_MAX)


def check_weight(weight: int) -> None:
    if not WEIGHT_MIN <= weight <= WEIGHT_MAX:
        raise ValueError(f"weight must be in {WEIGHT_MIN}..{WEIGHT_MAX}, got {weight}")


def quota_us(share: float, ncpus: float, period_us: int) -> int:
    """CFS quota (µs per period) for ``share`` of a machine with ``ncpus`` CPUs."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    if ncpus <= 0:
        raise ValueError(f"ncpus must be > 0, got {ncpus}")
    return max(MIN_QUOTA_US, round(share * ncpus * period_us))


def write_file(path: Path, value: str) -> None:
    """One ``write(2)`` of ``value`` to an existing cgroup file.

    No ``O_CREAT``: a missing file means a wrong path or a vanished cgroup, never a file to
    create. A single write matters because the kernel parses each write as one command.
    """
    try:
        # O_TRUNC is a no-op on cgroupfs (shells' ">" uses it too) but keeps a fake tree's
        # file equal to the last value, as the kernel's would read back.
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as err:
        raise CgroupError(
            f"cannot write {value!r} to {path}: {err.strerror}", err.errno, path
        ) from err


def read_file(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as err:
        raise CgroupError(f"cannot read {path}: {err.strerror}", err.errno, path) from err


class CgroupV1Controller:
    """Container CPU control on cgroup v1: one directory per hierarchy."""

    def __init__(self, dirs: Mapping[str, Path]) -> None:
        missing = [s for s in V1_SUBSYSTEMS if s not in dirs]
        if missing:
            raise CgroupError(f"cgroup v1 hierarchies not found: {', '.join(missing)}")
        self.dirs = dict(dirs)
        self._period_us: int | None = None

    @property
    def location(self) -> Path:
        """The cgroup's directory in the cpu hierarchy (names the container it belongs to)."""
        return self.dirs["cpu"]

    def __repr__(self) -> str:
        return f"CgroupV1Controller({self.dirs['cpu']})"

    def _path(self, subsystem: str, name: str) -> Path:
        return self.dirs[subsystem] / name

    def probe(self) -> None:
        """Raise :class:`CgroupError` unless we can write this cgroup's files.

        Writes the current ``cpu.shares`` back: the only honest writability test (a read-only
        bind mount or a missing capability shows up only on write), and it changes nothing.
        """
        path = self._path("cpu", "cpu.shares")
        write_file(path, read_file(path))

    def set_weight(self, weight: int) -> None:
        write_file(self._path("cpu", "cpu.shares"), str(weight_to_shares(weight)))

    def set_share_cap(self, share: float | None, ncpus: float) -> None:
        path = self._path("cpu", "cpu.cfs_quota_us")
        if share is None:
            write_file(path, "-1")
            return
        if self._period_us is None:
            self._period_us = int(read_file(self._path("cpu", "cpu.cfs_period_us")))
        value = str(quota_us(share, ncpus, self._period_us))
        try:
            write_file(path, value)
        except CgroupError as err:
            if err.errno != errno.EINVAL:
                raise
            # v1 refuses a child quota above its parent's (v2 silently takes the minimum).
            # "-1" lets the parent's limit apply, which is exactly v2's min(child, parent).
            log.debug("quota %s above the parent's limit at %s; using the parent's", value, path)
            write_file(path, "-1")

    def freeze(self) -> None:
        write_file(self._path("freezer", "freezer.state"), "FROZEN")

    def thaw(self) -> None:
        write_file(self._path("freezer", "freezer.state"), "THAWED")

    @property
    def frozen(self) -> bool:
        # FREEZING: asked to freeze, some task not stopped yet; it is frozen as far as the
        # scheduler's intent goes (and still needs a thaw before the container can stop).
        return read_file(self._path("freezer", "freezer.state")) != "THAWED"

    def set_cpuset(self, cpus: str) -> None:
        write_file(self._path("cpuset", "cpuset.cpus"), cpus)

    def usage_ns(self) -> int:
        return int(read_file(self._path("cpuacct", "cpuacct.usage")))

    def read_limits(self) -> tuple[int, float | None]:
        shares = int(read_file(self._path("cpu", "cpu.shares")))
        quota = int(read_file(self._path("cpu", "cpu.cfs_quota_us")))
        period = int(read_file(self._path("cpu", "cpu.cfs_period_us")))
        return max(1, round(shares * 100 / 1024)), None if quota < 0 else quota / period


class CgroupV2Controller:
    """Container CPU control on the cgroup v2 unified hierarchy: one directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._period_us: int | None = None

    def __repr__(self) -> str:
        return f"CgroupV2Controller({self.path})"

    @property
    def location(self) -> Path:
        """The cgroup's directory (names the container it belongs to)."""
        return self.path

    def probe(self) -> None:
        """Raise :class:`CgroupError` unless we can write this cgroup's files (see v1)."""
        path = self.path / "cpu.weight"
        write_file(path, read_file(path))

    def set_weight(self, weight: int) -> None:
        check_weight(weight)
        write_file(self.path / "cpu.weight", str(weight))

    def _period(self) -> int:
        if self._period_us is None:
            # cpu.max is "<quota|max> <period>".
            self._period_us = int(read_file(self.path / "cpu.max").split()[1])
        return self._period_us

    def set_share_cap(self, share: float | None, ncpus: float) -> None:
        period = self._period()
        quota = "max" if share is None else str(quota_us(share, ncpus, period))
        write_file(self.path / "cpu.max", f"{quota} {period}")

    def freeze(self) -> None:
        write_file(self.path / "cgroup.freeze", "1")

    def thaw(self) -> None:
        write_file(self.path / "cgroup.freeze", "0")

    @property
    def frozen(self) -> bool:
        return read_file(self.path / "cgroup.freeze") == "1"

    def set_cpuset(self, cpus: str) -> None:
        write_file(self.path / "cpuset.cpus", cpus)

    def usage_ns(self) -> int:
        for line in read_file(self.path / "cpu.stat").splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) * 1000
        raise CgroupError(f"no usage_usec in {self.path / 'cpu.stat'}")

    def read_limits(self) -> tuple[int, float | None]:
        weight = int(read_file(self.path / "cpu.weight"))
        quota, period = read_file(self.path / "cpu.max").split()
        return weight, None if quota == "max" else int(quota) / int(period)


# --- discovery ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One cgroup line of mountinfo."""

    root: str  # the hierarchy path mounted (not "/" inside a cgroup namespace or bind mount)
    mountpoint: str
    fstype: str  # "cgroup" (v1) or "cgroup2"
    subsystems: frozenset[str]  # v1 controllers / "name=..." of the hierarchy; empty for v2


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo`` octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts listed in a ``/proc/<pid>/mountinfo`` text."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        fstype = fields[sep + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        subsystems = frozenset(fields[sep + 3].split(",")) if fstype == "cgroup" else frozenset()
        mounts.append(Mount(_unescape(fields[3]), _unescape(fields[4]), fstype, subsystems))
    return mounts


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """``/proc/<pid>/cgroup`` → (v1 subsystem → path, v2 path or None)."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        hierarchy_id, controllers, path = line.split(":", 2)
        if hierarchy_id == "0" and controllers == "":
            v2 = path
            continue
        for subsystem in controllers.split(","):
            v1[subsystem] = path
    return v1, v2


def _resolve(root: Path, mounts: list[Mount], cgroup_path: str) -> Path | None:
    """Where ``cgroup_path`` of a hierarchy is reachable through one of its ``mounts``."""
    for mount in mounts:
        prefix = mount.root.rstrip("/")
        if cgroup_path == mount.root or cgroup_path.startswith(prefix + "/"):
            rel = cgroup_path[len(prefix) :].lstrip("/")
            return root / mount.mountpoint.lstrip("/") / rel
    return None


def discover(pid: int, root: Path = Path("/")) -> CgroupV1Controller | CgroupV2Controller:
    """The controller for the cgroup(s) that process ``pid`` lives in.

    v1 wins when the process is in a v1 ``cpu`` hierarchy: on hybrid hosts (like this one)
    the unified hierarchy is mounted too but carries no CPU controller.
    """
    proc_cgroup = root / "proc" / str(pid) / "cgroup"
    v1_paths, v2_path = parse_proc_cgroup(read_file(proc_cgroup))
    mounts = parse_mountinfo(read_file(root / "proc" / "self" / "mountinfo"))
    if "cpu" in v1_paths:
        dirs = {}
        for subsystem in V1_SUBSYSTEMS:
            if subsystem not in v1_paths:
                continue
            candidates = [m for m in mounts if m.fstype == "cgroup" and subsystem in m.subsystems]
            found = _resolve(root, candidates, v1_paths[subsystem])
            if found is not None:
                dirs[subsystem] = found
        return CgroupV1Controller(dirs)
    if v2_path is not None:
        found = _resolve(root, [m for m in mounts if m.fstype == "cgroup2"], v2_path)
        if found is None:
            raise CgroupError(f"cgroup2 path {v2_path} of pid {pid} is not under any mount")
        return CgroupV2Controller(found)
    raise CgroupError(f"no cpu cgroup for pid {pid} in {proc_cgroup}")


# --- parent cgroup (the robot's CPU/memory envelope) ----------------------------------------

# v1 hierarchies the parent is created in up front: those we limit or read, plus cpuset,
# whose cpus/mems must be filled in before any task can join a child.
_PARENT_V1 = ("cpu", "cpuacct", "cpuset", "memory", "freezer")
# v2 controllers delegated to the children (containers) through cgroup.subtree_control.
_PARENT_V2_CONTROLLERS = ("cpu", "cpuset", "memory", "pids")


class ParentCgroup:
    """A parent cgroup (default ``ctxrobot``) that all our containers live under.

    Docker's ``cgroup_parent`` puts containers below it; limits set here emulate a smaller
    robot (e.g. a Pi's CPU count and memory) around all tasks at once, the way ``--cpus``
    and ``--memory`` would for one container. The cgroupfs driver is assumed: there
    ``cgroup_parent`` is a plain path (:attr:`docker_parent`); with the systemd driver Docker
    wants a ``*.slice`` name and creates it itself.
    """

    def __init__(self, name: str = "ctxrobot", *, root: Path = Path("/")) -> None:
        if not name or "/" in name.strip("/") or name in (".", ".."):
            raise ValueError(f"parent cgroup name must be one path component, got {name!r}")
        self.name = name.strip("/")
        self.root = root
        self._mounts = parse_mountinfo(read_file(root / "proc" / "self" / "mountinfo"))
        self.version = (
            1 if any(m.fstype == "cgroup" and "cpu" in m.subsystems for m in self._mounts) else 2
        )

    @property
    def docker_parent(self) -> str:
        """The value for Docker's ``cgroup_parent`` (cgroupfs driver)."""
        return "/" + self.name

    def _hierarchy_root(self, mount: Mount) -> Path:
        return self.root / mount.mountpoint.lstrip("/")

    def _v1_mount(self, subsystem: str) -> Mount:
        for mount in self._mounts:
            if mount.fstype == "cgroup" and subsystem in mount.subsystems and mount.root == "/":
                return mount
        raise CgroupError(f"cgroup v1 hierarchy {subsystem!r} is not mounted")

    def _v2_root(self) -> Path:
        for mount in self._mounts:
            if mount.fstype == "cgroup2" and mount.root == "/":
                return self._hierarchy_root(mount)
        raise CgroupError("cgroup2 is not mounted")

    def path(self, subsystem: str = "cpu") -> Path:
        """The parent's directory in ``subsystem``'s hierarchy (v2: the one directory)."""
        if self.version == 2:
            return self._v2_root() / self.name
        return self._hierarchy_root(self._v1_mount(subsystem)) / self.name

    @property
    def exists(self) -> bool:
        return self.path("cpu").is_dir()

    def create(self) -> None:
        """Create the parent (idempotent) so limits can be set before any container starts."""
        try:
            if self.version == 2:
                self._create_v2()
            else:
                self._create_v1()
        except PermissionError as err:
            raise CgroupPermissionError(
                f"no permission to create the envelope cgroup {err.filename or self.name}: "
                "run as root (or with write access to the cgroup tree), or drop --cpus/--memory"
            ) from err
        except OSError as err:
            raise CgroupError(f"cannot create cgroup {self.name}: {err}", err.errno) from err

    def _create_v1(self) -> None:
        for subsystem in _PARENT_V1:
            self.path(subsystem).mkdir(exist_ok=True)
        # A new v1 cpuset has empty cpus/mems and refuses tasks until they are set; copy the
        # hierarchy root's so children inherit a usable set.
        cpuset = self.path("cpuset")
        for name in ("cpuset.cpus", "cpuset.mems"):
            if not read_file(cpuset / name):
                write_file(cpuset / name, read_file(cpuset.parent / name))

    def _create_v2(self) -> None:
        top = self._v2_root()
        available = set(read_file(top / "cgroup.controllers").split())
        wanted = [c for c in _PARENT_V2_CONTROLLERS if c in available]
        # Controllers reach a child only if every ancestor delegates them.
        enable = " ".join(f"+{c}" for c in wanted)
        write_file(top / "cgroup.subtree_control", enable)
        path = top / self.name
        path.mkdir(exist_ok=True)
        write_file(path / "cgroup.subtree_control", enable)

    def set_cpus(self, cpus: float | None, period_us: int = ENVELOPE_PERIOD_US) -> None:
        """Limit all children together to ``cpus`` CPUs worth of time (None: no limit),
        granted per ``period_us``.

        Once a period's quota is spent everything inside stalls until the next period; a
        slower CPU never stalls. A short period keeps the stalls short, so the envelope
        behaves like a slower machine rather than a stuttering fast one.
        v1 refuses (EINVAL) to go below a child's own quota; lift those caps first.
        """
        if cpus is not None and cpus <= 0:
            raise ValueError(f"cpus must be > 0, got {cpus}")
        quota = None if cpus is None else max(MIN_QUOTA_US, round(cpus * period_us))
        if self.version == 2:
            write_file(self.path() / "cpu.max", f"{quota or 'max'} {period_us}")
            return
        cpu = self.path("cpu")
        # Lift the quota before changing the period: the kernel checks each write against
        # the other value and the children's limits.
        write_file(cpu / "cpu.cfs_quota_us", "-1")
        write_file(cpu / "cpu.cfs_period_us", str(period_us))
        write_file(cpu / "cpu.cfs_quota_us", "-1" if quota is None else str(quota))

    def set_weight(self, weight: int) -> None:
        """Weight of all our containers together against everything else on the host.

        A robot's real-time tasks should win the CPU over host housekeeping; the weights
        between the tasks themselves are set per container by the actuator.
        """
        if self.version == 2:
            check_weight(weight)
            write_file(self.path() / "cpu.weight", str(weight))
        else:
            write_file(self.path("cpu") / "cpu.shares", str(weight_to_shares(weight)))

    def set_memory(self, limit_bytes: int | None) -> None:
        """Limit all children together to ``limit_bytes`` of memory (None: no limit)."""
        if limit_bytes is not None and limit_bytes <= 0:
            raise ValueError(f"limit_bytes must be > 0, got {limit_bytes}")
        if self.version == 2:
            write_file(
                self.path() / "memory.max", "max" if limit_bytes is None else str(limit_bytes)
            )
        else:
            write_file(
                self.path("memory") / "memory.limit_in_bytes",
                "-1" if limit_bytes is None else str(limit_bytes),
            )

    def usage_ns(self) -> int:
        """CPU time used by all children together, in nanoseconds."""
        if self.version == 2:
            return CgroupV2Controller(self.path()).usage_ns()
        return int(read_file(self.path("cpuacct") / "cpuacct.usage"))

    def _all_dirs(self) -> Iterator[Path]:
        """The parent's directory in every hierarchy where it exists (runc creates it in all)."""
        if self.version == 2:
            candidates = [self.path()]
        else:
            candidates = [
                self._hierarchy_root(m) / self.name
                for m in self._mounts
                if m.fstype == "cgroup" and m.root == "/"
            ]
        seen: set[Path] = set()
        for path in candidates:
            if path not in seen and path.is_dir():
                seen.add(path)
                yield path

    def remove(self) -> None:
        """Remove the parent and any empty child cgroups left below it (idempotent).

        Fails with :class:`CgroupError` (EBUSY) while a process still lives in it. Only
        directories are removed: a cgroup's files vanish with its directory.
        """
        for top in self._all_dirs():
            # Deepest first: rmdir only works on a cgroup without child cgroups.
            for dirpath, _dirnames, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(dirpath)
                except OSError as err:
                    raise CgroupError(
                        f"cannot remove cgroup {dirpath}: {err.strerror}", err.errno
                    ) from err
