"""The allocation vocabulary shared by the policies, the core, the cgroup fast path and the
observers (ARCHITECTURE.md, "Allocation vocabulary").

A policy answers with an :data:`Allocation`: per task a :class:`TaskAllocation`. Shares are
fractions of *the machine the policy shares out* — the robot's CPUs, or the envelope the
tasks are confined to (`--cpus`); that one number is :class:`Machine`. Turning shares into
kernel values (quota per period, weights as v1 shares) lives in ``ctxrobot.actuate.cgroups``;
deciding them lives in ``ctxrobot.sched``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Allocation", "Machine", "TaskAllocation", "changed"]


@dataclass(frozen=True, slots=True)
class TaskAllocation:
    """One task's share of the CPU.

    ``weight``: 1…10000, cgroup v2 units (v1 ``cpu.shares`` = weight × 1024 / 100).
    ``share_cap``: at most this fraction of the machine (a CFS quota); None: no cap.
    ``frozen``: the task is stopped (freezer). Two more are not cgroup matters but decide
    which samples the task's channel sends: ``rate_hz``, the task's processing rate (None: no
    limit), and ``stale_after_s``, the age past which a sample is shed instead of sent (None:
    every sample is processed, however late).
    """

    weight: int = 100
    share_cap: float | None = None
    frozen: bool = False
    rate_hz: float | None = None
    stale_after_s: float | None = None

    def dispatch_fields(self) -> tuple[float | None, float | None]:
        """What the task's channel is told."""
        return self.rate_hz, self.stale_after_s

    def cgroup_fields(self) -> tuple[int, float | None, bool]:
        """What the kernel is told; a change elsewhere (the rate) writes no cgroup file."""
        return self.weight, self.share_cap, self.frozen


Allocation = Mapping[str, TaskAllocation]


@dataclass(frozen=True, slots=True)
class Machine:
    """The CPUs shares refer to: ``min(robot CPUs, --cpus envelope)``."""

    cpus: float

    def __post_init__(self) -> None:
        if not self.cpus > 0:
            raise ValueError(f"a machine needs a positive CPU count, got {self.cpus}")

    def share_of(self, cpu_ns: int, wall_s: float) -> float:
        """CPU time used over ``wall_s`` as a fraction of this machine."""
        return cpu_ns / (wall_s * 1e9 * self.cpus) if wall_s > 0 else 0.0


def changed(before: Allocation, after: Allocation) -> dict[str, TaskAllocation]:
    """The tasks of ``after`` whose allocation differs from ``before``: the one place that
    decides what is worth writing (a task absent from ``before`` always is)."""
    return {task: alloc for task, alloc in after.items() if before.get(task) != alloc}
