"""Cgroup fast-path logic on fake cgroup trees (v1 and v2), plus discovery parsing.

The fake tree mimics the kernel's layout under a temp dir: ``proc/<pid>/cgroup``,
``proc/self/mountinfo`` and ``sys/fs/cgroup/...`` with the control files pre-created (the
controllers never create files, as with the real cgroupfs). v2 is only testable this way
here: the host runs cgroup v1. One test at the end uses the real v1 tree (needs root).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ctxrobot.actuate import cgroups
from ctxrobot.actuate.actuator import Actuator
from ctxrobot.actuate.cgroups import (
    CgroupError,
    CgroupV1Controller,
    CgroupV2Controller,
    CpuController,
    ParentCgroup,
    discover,
    parse_mountinfo,
    parse_proc_cgroup,
    quota_us,
    weight_to_shares,
)
from ctxrobot.model.allocation import Machine, TaskAllocation

PID = 4242
CID = "0123abcd"

# Separate cpu and cpuacct mounts, as on this host.
MOUNTINFO_V1 = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PROC_CGROUP_V1 = f"""\
9:name=systemd:/ctxrobot/{CID}
6:freezer:/ctxrobot/{CID}
4:memory:/ctxrobot/{CID}
3:cpuset:/ctxrobot/{CID}
2:cpuacct:/ctxrobot/{CID}
1:cpu:/ctxrobot/{CID}
0::/
"""

# Pure v2 with the systemd driver; the mount point contains a space to exercise unescaping.
MOUNTINFO_V2 = """\
29 23 0:26 / /sys/fs/cgroup\\040v2 rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw
"""
V2_PATH = f"/system.slice/docker-{CID}.scope"
PROC_CGROUP_V2 = f"0::{V2_PATH}\n"


def _files(directory: Path, contents: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in contents.items():
        (directory / name).write_text(text)


def _proc(root: Path, mountinfo: str, proc_cgroup: str) -> None:
    _files(root / "proc" / "self", {"mountinfo": mountinfo})
    _files(root / "proc" / str(PID), {"cgroup": proc_cgroup})


V1_FILES = {
    "cpu": {"cpu.shares": "1024\n", "cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n"},
    "cpuacct": {"cpuacct.usage": "123456789\n"},
    "cpuset": {"cpuset.cpus": "0-1\n", "cpuset.mems": "0\n"},
    "freezer": {"freezer.state": "THAWED\n"},
    "memory": {"memory.limit_in_bytes": "9223372036854771712\n"},
}


@pytest.fixture
def v1_root(tmp_path: Path) -> Path:
    _proc(tmp_path, MOUNTINFO_V1, PROC_CGROUP_V1)
    for subsystem, files in V1_FILES.items():
        hierarchy = tmp_path / "sys/fs/cgroup" / subsystem
        _files(hierarchy, files)
        _files(hierarchy / "ctxrobot", files)
        _files(hierarchy / "ctxrobot" / CID, files)
    return tmp_path


V2_FILES = {
    "cpu.weight": "100\n",
    "cpu.max": "max 100000\n",
    "cgroup.freeze": "0\n",
    "cpuset.cpus": "\n",
    "cpu.stat": "usage_usec 5000\nuser_usec 4000\nsystem_usec 1000\n",
    "memory.max": "max\n",
    "cgroup.controllers": "cpuset cpu io memory pids\n",
    "cgroup.subtree_control": "\n",
}


@pytest.fixture
def v2_root(tmp_path: Path) -> Path:
    _proc(tmp_path, MOUNTINFO_V2, PROC_CGROUP_V2)
    top = tmp_path / "sys/fs/cgroup v2"
    _files(top, V2_FILES)
    _files(top / V2_PATH.lstrip("/"), V2_FILES)
    _files(top / "ctxrobot", V2_FILES)
    return tmp_path


def _v1(root: Path, subsystem: str, name: str) -> str:
    return (root / "sys/fs/cgroup" / subsystem / "ctxrobot" / CID / name).read_text().strip()


def _v2(root: Path, name: str) -> str:
    return (root / "sys/fs/cgroup v2" / V2_PATH.lstrip("/") / name).read_text().strip()


# --- conversions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight", "shares"), [(100, 1024), (1, 10), (300, 3072), (10000, 102400), (50, 512)]
)
def test_weight_to_shares(weight: int, shares: int) -> None:
    assert weight_to_shares(weight) == shares


@pytest.mark.parametrize("weight", [0, -5, 10001])
def test_weight_out_of_range_is_rejected(weight: int) -> None:
    with pytest.raises(ValueError, match="weight"):
        weight_to_shares(weight)


def test_quota_is_share_of_the_whole_machine() -> None:
    assert quota_us(0.5, 2, 100_000) == 100_000  # half of 2 CPUs = one CPU
    assert quota_us(0.25, 4, 100_000) == 100_000
    assert quota_us(1.0, 2, 50_000) == 100_000
    assert quota_us(0.001, 1, 100_000) == 1000  # the kernel's minimum, not 100 µs


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5])
def test_quota_share_out_of_range_is_rejected(share: float) -> None:
    with pytest.raises(ValueError, match="share"):
        quota_us(share, 2, 100_000)


# --- parsing --------------------------------------------------------------------------------


def test_parse_mountinfo_keeps_only_cgroup_mounts_and_their_subsystems() -> None:
    mounts = parse_mountinfo(MOUNTINFO_V1)
    assert [m.mountpoint for m in mounts][:2] == ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpuacct"]
    assert "sysfs" not in {m.fstype for m in mounts}
    cpu = mounts[0]
    assert cpu.subsystems == frozenset({"rw", "cpu"})
    assert mounts[-1].fstype == "cgroup2"
    assert mounts[-1].subsystems == frozenset()


def test_parse_mountinfo_unescapes_octal() -> None:
    (mount,) = parse_mountinfo(MOUNTINFO_V2)
    assert mount.mountpoint == "/sys/fs/cgroup v2"


def test_parse_mountinfo_with_optional_fields_and_combined_cpu_cpuacct() -> None:
    text = (
        "30 24 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:12 master:3 - cgroup cgroup "
        "rw,cpu,cpuacct\n"
    )
    (mount,) = parse_mountinfo(text)
    assert mount.mountpoint == "/sys/fs/cgroup/cpu,cpuacct"
    assert {"cpu", "cpuacct"} <= mount.subsystems


def test_parse_proc_cgroup_v1_and_v2() -> None:
    v1, v2 = parse_proc_cgroup(PROC_CGROUP_V1)
    assert v1["cpu"] == f"/ctxrobot/{CID}"
    assert v1["name=systemd"] == f"/ctxrobot/{CID}"
    assert v2 == "/"
    v1, v2 = parse_proc_cgroup("4:cpu,cpuacct:/docker/abc\n")
    assert v1 == {"cpu": "/docker/abc", "cpuacct": "/docker/abc"}
    assert v2 is None


# --- discovery ------------------------------------------------------------------------------


def test_discover_v1_with_separate_cpu_and_cpuacct(v1_root: Path) -> None:
    controller = discover(PID, v1_root)
    assert isinstance(controller, CgroupV1Controller)
    assert isinstance(controller, CpuController)
    base = v1_root / "sys/fs/cgroup"
    assert controller.dirs["cpu"] == base / "cpu" / "ctxrobot" / CID
    assert controller.dirs["cpuacct"] == base / "cpuacct" / "ctxrobot" / CID
    assert controller.dirs["freezer"] == base / "freezer" / "ctxrobot" / CID


def test_discover_v1_combined_hierarchy_systemd_driver(tmp_path: Path) -> None:
    path = f"/system.slice/docker-{CID}.scope"
    mountinfo = (
        "30 24 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "31 24 0:28 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset\n"
        "32 24 0:29 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer\n"
    )
    proc = f"4:cpu,cpuacct:{path}\n3:cpuset:{path}\n2:freezer:{path}\n"
    _proc(tmp_path, mountinfo, proc)
    controller = discover(PID, tmp_path)
    assert isinstance(controller, CgroupV1Controller)
    combined = tmp_path / "sys/fs/cgroup/cpu,cpuacct" / path.lstrip("/")
    assert controller.dirs["cpu"] == controller.dirs["cpuacct"] == combined


def test_discover_maps_paths_through_a_mount_root(tmp_path: Path) -> None:
    """Inside a cgroup namespace or bind mount, the mount's root is not the hierarchy root."""
    mountinfo = "29 23 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    _proc(tmp_path, mountinfo, "0::/kubepods/pod1/ctr\n")
    controller = discover(PID, tmp_path)
    assert isinstance(controller, CgroupV2Controller)
    assert controller.path == tmp_path / "sys/fs/cgroup/ctr"


def test_discover_v2(v2_root: Path) -> None:
    controller = discover(PID, v2_root)
    assert isinstance(controller, CgroupV2Controller)
    assert controller.path == v2_root / "sys/fs/cgroup v2" / V2_PATH.lstrip("/")


def test_discover_errors_are_cgroup_errors(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="cannot read"):
        discover(PID, tmp_path)  # no such pid in the fake /proc
    _proc(tmp_path, MOUNTINFO_V1, "1:cpu:/ctxrobot/x\n")
    with pytest.raises(CgroupError, match="cpuacct, cpuset, freezer"):
        discover(PID, tmp_path)  # only the cpu hierarchy holds the process
    _proc(tmp_path, "", "0::/outside\n")
    with pytest.raises(CgroupError, match="not under any mount"):
        discover(PID, tmp_path)


# --- v1 controller --------------------------------------------------------------------------


def test_v1_writes_the_kernel_files(v1_root: Path) -> None:
    controller = discover(PID, v1_root)
    controller.set_weight(300)
    assert _v1(v1_root, "cpu", "cpu.shares") == "3072"
    controller.set_share_cap(0.25, 2)
    assert _v1(v1_root, "cpu", "cpu.cfs_quota_us") == "50000"
    controller.set_share_cap(None, 2)
    assert _v1(v1_root, "cpu", "cpu.cfs_quota_us") == "-1"
    assert not controller.frozen
    controller.freeze()
    assert _v1(v1_root, "freezer", "freezer.state") == "FROZEN"
    assert controller.frozen
    controller.thaw()
    assert _v1(v1_root, "freezer", "freezer.state") == "THAWED"
    controller.set_cpuset("1")
    assert _v1(v1_root, "cpuset", "cpuset.cpus") == "1"
    assert controller.usage_ns() == 123456789


def test_v1_quota_uses_the_cgroups_own_period(v1_root: Path) -> None:
    (v1_root / "sys/fs/cgroup/cpu/ctxrobot" / CID / "cpu.cfs_period_us").write_text("20000\n")
    controller = discover(PID, v1_root)
    controller.set_share_cap(0.5, 2)
    assert _v1(v1_root, "cpu", "cpu.cfs_quota_us") == "20000"


def test_v1_freezing_counts_as_frozen(v1_root: Path) -> None:
    (v1_root / "sys/fs/cgroup/freezer/ctxrobot" / CID / "freezer.state").write_text("FREEZING\n")
    assert discover(PID, v1_root).frozen


def test_a_controller_writes_what_it_is_told(v1_root: Path) -> None:
    """No cache of its own: deciding what changed is the core's job, done once."""
    controller = discover(PID, v1_root)
    controller.set_weight(200)
    shares = v1_root / "sys/fs/cgroup/cpu/ctxrobot" / CID / "cpu.shares"
    shares.write_text("marker\n")  # someone else wrote it
    controller.set_weight(200)
    assert shares.read_text() == "2048"


def test_a_failed_write_says_which_file(v1_root: Path) -> None:
    controller = discover(PID, v1_root)
    shares = v1_root / "sys/fs/cgroup/cpu/ctxrobot" / CID / "cpu.shares"
    shares.unlink()
    with pytest.raises(CgroupError, match=r"cpu\.shares") as info:
        controller.set_weight(200)
    assert info.value.errno == errno.ENOENT
    assert info.value.path == shares
    shares.write_text("1024\n")
    controller.set_weight(200)
    assert shares.read_text() == "2048"


def test_v1_quota_above_the_parents_falls_back_to_unlimited(
    v1_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """v1 answers EINVAL to a child quota above the parent's; the parent's limit then applies."""
    real_write = cgroups.write_file

    def kernel_like(path: Path, value: str) -> None:
        if path.name == "cpu.cfs_quota_us" and value not in ("-1",) and int(value) > 100_000:
            raise CgroupError("Invalid argument", errno.EINVAL, path)
        real_write(path, value)

    monkeypatch.setattr(cgroups, "write_file", kernel_like)
    controller = discover(PID, v1_root)
    controller.set_share_cap(1.0, 2)
    assert _v1(v1_root, "cpu", "cpu.cfs_quota_us") == "-1"
    controller.set_share_cap(0.25, 2)
    assert _v1(v1_root, "cpu", "cpu.cfs_quota_us") == "50000"


def test_v1_probe(v1_root: Path) -> None:
    controller = discover(PID, v1_root)
    controller.probe()
    assert _v1(v1_root, "cpu", "cpu.shares") == "1024"
    (v1_root / "sys/fs/cgroup/cpu/ctxrobot" / CID / "cpu.shares").unlink()
    with pytest.raises(CgroupError):
        controller.probe()


# --- v2 controller --------------------------------------------------------------------------


def test_v2_writes_the_kernel_files(v2_root: Path) -> None:
    controller = discover(PID, v2_root)
    controller.set_weight(300)
    assert _v2(v2_root, "cpu.weight") == "300"
    controller.set_share_cap(0.25, 4)
    assert _v2(v2_root, "cpu.max") == "100000 100000"
    controller.set_share_cap(None, 4)
    assert _v2(v2_root, "cpu.max") == "max 100000"
    controller.freeze()
    assert _v2(v2_root, "cgroup.freeze") == "1"
    assert controller.frozen
    controller.thaw()
    assert _v2(v2_root, "cgroup.freeze") == "0"
    assert not controller.frozen
    controller.set_cpuset("0")
    assert _v2(v2_root, "cpuset.cpus") == "0"
    assert controller.usage_ns() == 5_000_000
    controller.probe()


def test_v2_keeps_the_cgroups_period(v2_root: Path) -> None:
    (v2_root / "sys/fs/cgroup v2" / V2_PATH.lstrip("/") / "cpu.max").write_text("max 10000\n")
    controller = discover(PID, v2_root)
    controller.set_share_cap(0.5, 2)
    assert _v2(v2_root, "cpu.max") == "10000 10000"


def test_v2_weight_range_is_checked(v2_root: Path) -> None:
    with pytest.raises(ValueError, match="weight"):
        discover(PID, v2_root).set_weight(0)


# --- parent cgroup --------------------------------------------------------------------------


def test_parent_v1_limits(v1_root: Path) -> None:
    cpuset = v1_root / "sys/fs/cgroup/cpuset/ctxrobot"
    (cpuset / "cpuset.cpus").write_text("\n")  # as the kernel leaves a new v1 cpuset
    (cpuset / "cpuset.mems").write_text("\n")
    parent = ParentCgroup("ctxrobot", root=v1_root)
    assert parent.version == 1
    assert parent.docker_parent == "/ctxrobot"
    parent.create()
    assert (cpuset / "cpuset.cpus").read_text() == "0-1"
    assert (cpuset / "cpuset.mems").read_text() == "0"
    parent.set_weight(1000)
    assert (v1_root / "sys/fs/cgroup/cpu/ctxrobot/cpu.shares").read_text() == "10240"
    parent.set_cpus(1.5)
    base = v1_root / "sys/fs/cgroup"
    assert (base / "cpu/ctxrobot/cpu.cfs_quota_us").read_text() == "15000"
    assert (base / "cpu/ctxrobot/cpu.cfs_period_us").read_text() == "10000", "a 10 ms period"
    parent.set_cpus(None)
    assert (base / "cpu/ctxrobot/cpu.cfs_quota_us").read_text() == "-1"
    parent.set_memory(512 << 20)
    assert (base / "memory/ctxrobot/memory.limit_in_bytes").read_text() == str(512 << 20)
    parent.set_memory(None)
    assert (base / "memory/ctxrobot/memory.limit_in_bytes").read_text() == "-1"
    assert parent.usage_ns() == 123456789


def test_parent_v2_delegates_controllers_and_limits(v2_root: Path) -> None:
    parent = ParentCgroup("ctxrobot", root=v2_root)
    assert parent.version == 2
    parent.create()
    top = v2_root / "sys/fs/cgroup v2"
    assert (top / "cgroup.subtree_control").read_text() == "+cpu +cpuset +memory +pids"
    assert (top / "ctxrobot/cgroup.subtree_control").read_text() == "+cpu +cpuset +memory +pids"
    parent.set_weight(1000)
    assert (top / "ctxrobot/cpu.weight").read_text() == "1000"
    parent.set_cpus(2)
    assert (top / "ctxrobot/cpu.max").read_text() == "20000 10000", "2 CPUs per 10 ms"
    parent.set_memory(1 << 30)
    assert (top / "ctxrobot/memory.max").read_text() == str(1 << 30)
    parent.set_memory(None)
    assert (top / "ctxrobot/memory.max").read_text() == "max"
    assert parent.usage_ns() == 5_000_000


@pytest.mark.parametrize("name", ["", "a/b", ".."])
def test_parent_name_must_be_one_component(v1_root: Path, name: str) -> None:
    with pytest.raises(ValueError, match="one path component"):
        ParentCgroup(name, root=v1_root)


def test_parent_limits_are_validated(v1_root: Path) -> None:
    parent = ParentCgroup("ctxrobot", root=v1_root)
    with pytest.raises(ValueError, match="cpus"):
        parent.set_cpus(0)
    with pytest.raises(ValueError, match="limit_bytes"):
        parent.set_memory(-1)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating real cgroups needs root")
def test_parent_on_the_real_tree_create_limit_remove() -> None:
    """Real kernel semantics the fake tree cannot show: mkdir populates, rmdir removes."""
    parent = ParentCgroup(f"ctxrobot-test-{os.getpid()}")
    try:
        parent.create()
        assert parent.exists
        parent.set_cpus(0.5)
        parent.set_memory(256 << 20)
        if parent.version == 1:
            assert (parent.path("cpu") / "cpu.cfs_quota_us").read_text().strip() == str(
                round(0.5 * int((parent.path("cpu") / "cpu.cfs_period_us").read_text()))
            )
            assert (parent.path("cpuset") / "cpuset.cpus").read_text().strip()
            assert (parent.path("memory") / "memory.limit_in_bytes").read_text().strip() == str(
                256 << 20
            )
        # A child left behind by a crash (Docker normally removes its own).
        (parent.path("cpu") / "leftover").mkdir()
        assert parent.usage_ns() == 0
    finally:
        parent.remove()
    assert not parent.exists
    parent.remove()  # idempotent


# --- actuator on a fake tree ----------------------------------------------------------------


def test_actuator_writes_the_fields_that_differ(v1_root: Path) -> None:
    controller = discover(PID, v1_root)
    actuator = Actuator({"slam": controller}, Machine(2))
    first = TaskAllocation(weight=300, share_cap=0.5)
    report = actuator.apply({"slam": (None, first)})
    assert report.changed_tasks == ("slam",)
    assert report.write_ns > 0
    assert _v1(v1_root, "cpu", "cpu.shares") == "3072"
    assert _v1(v1_root, "cpu", "cpu.cfs_quota_us") == "100000"
    actuator.apply({"slam": (first, TaskAllocation(weight=300, share_cap=0.5, frozen=True))})
    assert _v1(v1_root, "freezer", "freezer.state") == "FROZEN"
    assert actuator.thaw_all() == []
    assert _v1(v1_root, "freezer", "freezer.state") == "THAWED"


class RecordingController:
    """Records the calls an actuator makes, to check their order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.frozen = False

    def set_weight(self, weight: int) -> None:
        self.calls.append(("weight", weight))

    def set_share_cap(self, share: float | None, ncpus: int) -> None:
        self.calls.append(("cap", (share, ncpus)))

    def freeze(self) -> None:
        self.calls.append(("freeze", None))

    def thaw(self) -> None:
        self.calls.append(("thaw", None))

    def set_cpuset(self, cpus: str) -> None:
        self.calls.append(("cpuset", cpus))

    def usage_ns(self) -> int:
        return 0


def test_actuator_freezes_first_and_thaws_last() -> None:
    """A task never runs under the allocation it leaves or has not fully entered."""
    recorder = RecordingController()
    actuator = Actuator({"signs": recorder}, Machine(4))
    frozen = TaskAllocation(weight=50, share_cap=0.1, frozen=True)
    actuator.apply({"signs": (None, frozen)})
    assert recorder.calls == [("freeze", None), ("weight", 50), ("cap", (0.1, 4))]
    recorder.calls.clear()
    thawed = TaskAllocation(weight=400, share_cap=None)
    actuator.apply({"signs": (frozen, thawed)})
    assert recorder.calls == [("weight", 400), ("cap", (None, 4)), ("thaw", None)]
    recorder.calls.clear()
    actuator.apply({"signs": (thawed, TaskAllocation(weight=400, share_cap=0.5))})
    assert recorder.calls == [("cap", (0.5, 4))]


def test_a_task_without_a_controller_is_skipped_not_half_written() -> None:
    """A task whose container is being restarted has no controller for a moment."""
    recorder = RecordingController()
    actuator = Actuator({"slam": recorder}, Machine(2))
    report = actuator.apply(
        {"speech": (None, TaskAllocation()), "slam": (None, TaskAllocation(weight=200))}
    )
    assert report.changed_tasks == ("slam",)
    assert recorder.calls == [("weight", 200), ("cap", (None, 2)), ("thaw", None)]
    actuator.detach("slam")
    assert actuator.tasks == ()
