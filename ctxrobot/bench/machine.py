"""What the bench's numbers were measured on: the machine, how busy it was, which code ran."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from ctxrobot.manifest.defaults import REPO


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages: on a shared machine, how much the numbers mean."""
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            # x86 says "model name"; a Raspberry Pi's ARM kernel says "Model".
            if key.strip() in ("model name", "Model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return model


def machine_info() -> dict[str, Any]:
    """The machine the numbers were measured on."""
    try:
        from ctxrobot.actuate.cgroups import ParentCgroup

        cgroup: int | None = ParentCgroup().version
    except OSError:
        cgroup = None
    try:
        import docker

        docker_version: str | None = docker.from_env().version().get("Version")
    except Exception:  # any engine problem: the runs would have failed and said why
        docker_version = None
    return {
        "hostname": platform.node(),
        "cpu_model": _cpu_model(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "cgroup_version": cgroup,
        "docker_version": docker_version,
        "python": platform.python_version(),
    }


def source_revision() -> str | None:
    """The checked-out commit, with "+dirty" when the tree has changes: which code ran."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout (an installed package)
    return head + ("+dirty" if dirty else "")
