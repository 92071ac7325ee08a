"""Apply an :data:`Allocation` to the tasks' CPU controllers, touching only what changed.

The policy produces a whole allocation on every context change; most of it is usually the
same as before. The actuator compares each task's cgroup-relevant fields with what it last
applied and calls the controller only for those that differ, so a context change costs a
few file writes (tens of microseconds) and an unchanged allocation costs nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ctxrobot.actuate.cgroups import CgroupError, CpuController

__all__ = ["ActuationReport", "Actuator", "Allocation", "TaskAllocation"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskAllocation:
    """One task's share of the CPU (see ARCHITECTURE.md, "Allocation vocabulary").

    ``rate_hz`` is the task's processing rate, sent over its channel, not a cgroup matter:
    the actuator ignores it.
    """

    weight: int = 100
    share_cap: float | None = None
    frozen: bool = False
    rate_hz: float | None = None


Allocation = Mapping[str, TaskAllocation]


@dataclass(frozen=True)
class ActuationReport:
    """Which tasks got at least one write, and the time spent in controller calls."""

    changed_tasks: tuple[str, ...]
    write_ns: int


class Actuator:
    """Applies allocations to per-task :class:`~ctxrobot.cgroups.CpuController` objects.

    ``ncpus`` is the number of CPUs that ``share_cap`` fractions refer to ("the whole
    machine", i.e. the robot's envelope).
    """

    def __init__(self, controllers: Mapping[str, CpuController], ncpus: float) -> None:
        if ncpus <= 0:
            raise ValueError(f"ncpus must be > 0, got {ncpus}")
        self.ncpus = ncpus
        self._controllers: dict[str, CpuController] = dict(controllers)
        self._applied: dict[str, TaskAllocation] = {}

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self._controllers)

    def attach(self, task: str, controller: CpuController) -> None:
        """Add or replace ``task``'s controller (e.g. after a container restart).

        The next :meth:`apply` writes all of the task's fields: a new container starts from
        Docker's defaults, not from what was applied to the old one.
        """
        self._controllers[task] = controller
        self._applied.pop(task, None)

    def detach(self, task: str) -> None:
        """Forget ``task`` (its container is gone); unknown tasks are ignored."""
        self._controllers.pop(task, None)
        self._applied.pop(task, None)

    def applied(self, task: str) -> TaskAllocation | None:
        """What was last applied to ``task`` (None before the first apply)."""
        return self._applied.get(task)

    def apply(self, allocation: Allocation) -> ActuationReport:
        """Apply ``allocation``; tasks it does not mention are left as they are.

        Raises KeyError before writing anything if it names a task without a controller,
        so an allocation is never half-applied because of a typo.
        """
        unknown = sorted(set(allocation) - set(self._controllers))
        if unknown:
            raise KeyError(f"no controller for task(s): {', '.join(unknown)}")
        changed: list[str] = []
        spent = 0
        for task, wanted in allocation.items():
            before = self._applied.get(task)
            if before is not None and _cgroup_fields(before) == _cgroup_fields(wanted):
                # Only rate_hz (or nothing) changed: no cgroup write.
                self._applied[task] = wanted
                continue
            start = time.perf_counter_ns()
            try:
                self._apply_one(self._controllers[task], before, wanted)
            finally:
                spent += time.perf_counter_ns() - start
            self._applied[task] = wanted
            changed.append(task)
        return ActuationReport(tuple(changed), spent)

    def _apply_one(
        self, controller: CpuController, before: TaskAllocation | None, wanted: TaskAllocation
    ) -> None:
        # Freeze first when freezing, thaw last when thawing: a task never runs, even for a
        # moment, under the weight/cap of the allocation it is leaving or entering.
        if wanted.frozen and (before is None or not before.frozen):
            controller.freeze()
        if before is None or before.weight != wanted.weight:
            controller.set_weight(wanted.weight)
        if before is None or before.share_cap != wanted.share_cap:
            controller.set_share_cap(wanted.share_cap, self.ncpus)
        if not wanted.frozen and (before is None or before.frozen):
            controller.thaw()

    def thaw_all(self) -> list[str]:
        """Thaw every task, for shutdown and crash paths; returns the tasks that failed.

        Best effort by design: one vanished container must not leave the others frozen
        (a frozen container cannot even be stopped), so errors are logged, not raised.
        """
        failed = []
        for task, controller in self._controllers.items():
            try:
                controller.thaw()
            except (CgroupError, OSError) as err:
                log.warning("cannot thaw task %s: %s", task, err)
                failed.append(task)
                continue
            if task in self._applied:
                self._applied[task] = replace(self._applied[task], frozen=False)
        return failed


def _cgroup_fields(allocation: TaskAllocation) -> tuple[int, float | None, bool]:
    return allocation.weight, allocation.share_cap, allocation.frozen
