"""Write allocation changes to the tasks' CPU controllers (the cgroup fast path).

The core decides which tasks changed and hands each as ``(before, after)``; this module
writes the fields that differ, in an order that never lets a task run under the weight or
cap of the allocation it is leaving: freeze first when freezing, thaw last when thawing.
It keeps no copy of what it wrote: the core is the one record of what is applied.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from ctxrobot.actuate.cgroups import CgroupError, CpuController
from ctxrobot.model.allocation import Machine, TaskAllocation

__all__ = ["ActuationReport", "Actuator", "Change"]

log = logging.getLogger(__name__)

#: One task's change: what it had (None: nothing written since its container started), what
#: it gets.
Change = tuple[TaskAllocation | None, TaskAllocation]


@dataclass(frozen=True)
class ActuationReport:
    """Which tasks got at least one write, and the time spent in controller calls."""

    changed_tasks: tuple[str, ...]
    write_ns: int


class Actuator:
    """Applies changes to per-task :class:`~ctxrobot.actuate.cgroups.CpuController` objects;
    ``machine`` is what ``share_cap`` fractions refer to."""

    def __init__(self, controllers: Mapping[str, CpuController], machine: Machine) -> None:
        self.machine = machine
        self._controllers: dict[str, CpuController] = dict(controllers)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self._controllers)

    def attach(self, task: str, controller: CpuController) -> None:
        """Add or replace ``task``'s controller (e.g. after a container restart)."""
        self._controllers[task] = controller

    def detach(self, task: str) -> None:
        """Forget ``task`` (its container is gone); unknown tasks are ignored."""
        self._controllers.pop(task, None)

    def apply(self, changes: Mapping[str, Change]) -> ActuationReport:
        """Write ``changes``. A task without a controller (its container is being
        restarted) is skipped: it gets its whole allocation when it runs again."""
        written: list[str] = []
        start = time.perf_counter_ns()
        for task, (before, after) in changes.items():
            controller = self._controllers.get(task)
            if controller is None:
                log.debug("no controller for task %s (restarting?); not written", task)
                continue
            self._apply_one(controller, before, after)
            written.append(task)
        return ActuationReport(tuple(written), time.perf_counter_ns() - start)

    def _apply_one(
        self, controller: CpuController, before: TaskAllocation | None, wanted: TaskAllocation
    ) -> None:
        if wanted.frozen and (before is None or not before.frozen):
            controller.freeze()
        if before is None or before.weight != wanted.weight:
            controller.set_weight(wanted.weight)
        if before is None or before.share_cap != wanted.share_cap:
            controller.set_share_cap(wanted.share_cap, self.machine.cpus)
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
        return failed
