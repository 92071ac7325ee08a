"""What `ctxrobot ps` shows: our containers, found by label, with their CPU allocation.

The allocation is read back from the container's cgroup (what the kernel enforces now),
not from any record of ours, so it is right even for a container a dead runtime left.
"""

from __future__ import annotations

import os
from typing import Any

from ctxrobot.actuate.cgroups import CgroupError
from ctxrobot.actuate.docker import LABEL_RUN, LABEL_TASK, ContainerError, DockerBackend


def container_rows() -> list[dict[str, Any]]:
    """One row per ctxrobot container: task, name, run, state, weight, cap, frozen."""
    backend = DockerBackend()
    ncpus = os.cpu_count() or 1
    rows = []
    for container in backend.list_managed():
        row: dict[str, Any] = {
            "task": container.labels.get(LABEL_TASK, "?"),
            "name": container.name,
            "run": container.labels.get(LABEL_RUN, "?"),
            "state": container.status,
            "weight": None,
            "share_cap": None,
            "frozen": None,
        }
        if container.status in ("running", "paused"):
            try:
                # Read-only: no probe write, no Docker-API fallback for a listing.
                controller = backend.cgroup_of(container)
                weight, cap_cores = controller.read_limits()
                row["weight"] = weight
                row["share_cap"] = None if cap_cores is None else cap_cores / ncpus
                row["frozen"] = controller.frozen
            except (CgroupError, ContainerError, OSError):
                pass  # it stopped meanwhile: the row shows its state only
        rows.append(row)
    return sorted(rows, key=lambda r: (r["run"], r["task"]))
