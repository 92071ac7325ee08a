"""Tasks frozen by someone else: noticed, thawed, reported.

The decision thread is the only legitimate freezer: its core knows what it froze
(`SchedulerState.applied`). A `docker pause`, or any root process writing a container's
freezer file, stops a task just the same, and the task then misses every deadline while the
scheduler counts on it. :class:`FreezeWatch` reads each task's freezer on the periodic
sampler's thread (a cheap file read); a frozen task costs one call to the decision thread,
which reads the freezer again together with what the core wrote, so a freeze or a thaw of
the core's own can never pass for someone else's. Such a task is taken out of the
allocation (state ``paused``), thawed (Docker's pause through Docker, a freezer write
through the file), and handed back (state ``running``); one that cannot be thawed is a
failed task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from ctxrobot.actuate.cgroups import CgroupError, CpuController
from ctxrobot.actuate.docker import ContainerError
from ctxrobot.sched.state import SchedulerState
from ctxrobot.service.engine import ENGINE_ERRORS
from ctxrobot.service.loop import DecisionLoop

__all__ = ["OUTSIDE_FREEZE", "FreezeWatch"]

log = logging.getLogger(__name__)

#: What a task frozen by someone else is told, and the run's summary says.
OUTSIDE_FREEZE = (
    "frozen from outside ctxrobot (docker pause, or a write to its freezer file); only the "
    "scheduler freezes tasks"
)


class FreezeWatch:
    """See the module doc. ``controllers`` is the runtime's live mapping; ``thaw(task)``
    undoes any freeze of the task's container (False: the container is gone)."""

    def __init__(
        self,
        controllers: Mapping[str, CpuController],
        decisions: DecisionLoop,
        thaw: Callable[[str], bool],
        publish_state: Callable[[str, str, str], None],
        *,
        t0: float,
    ) -> None:
        self._controllers = controllers
        self._decisions = decisions
        self._thaw = thaw
        self._publish_state = publish_state
        self._t0 = t0
        #: What happened, for the run's summary: task, fault, t_s (since t0), outcome.
        self.faults: list[dict[str, Any]] = []
        #: Tasks that stay frozen, and why: failed tasks.
        self.failures: dict[str, str] = {}

    def check(self, now: float) -> None:
        """One look at every task's freezer (a periodic job)."""
        for task, controller in list(self._controllers.items()):
            try:
                if not controller.frozen:
                    continue
            except (CgroupError, *ENGINE_ERRORS):
                continue  # the container is being restarted, or the engine is away
            if self._decisions.call(lambda core, t=task, c=controller: _from_outside(core, t, c)):
                self._undo(task, now)

    def _undo(self, task: str, now: float) -> None:
        log.warning("task %s was %s: thawing it", task, OUTSIDE_FREEZE)
        self._publish_state(task, "paused", OUTSIDE_FREEZE)
        # The core has taken the task out before the thaw: no freeze of its own can race it.
        self._decisions.call(lambda _core: None)
        fault = {"task": task, "fault": "frozen from outside", "t_s": round(now - self._t0, 3)}
        try:
            if not self._thaw(task):
                raise ContainerError("its container is gone")
        except (CgroupError, ContainerError, *ENGINE_ERRORS) as err:
            self.failures[task] = f"{OUTSIDE_FREEZE}, and cannot be thawed: {err}"
            self.faults.append({**fault, "outcome": f"cannot be thawed: {err}"})
            log.error("task %s: %s", task, self.failures[task])
            return
        self.faults.append({**fault, "outcome": "thawed"})
        self._publish_state(task, "running", f"thawed after being {OUTSIDE_FREEZE}")


def _from_outside(core: SchedulerState, task: str, controller: CpuController) -> bool:
    """On the decision thread: the freezer read together with what the core wrote."""
    applied = core.applied.get(task)
    if task not in core.running or (applied is not None and applied.frozen):
        return False
    try:
        return controller.frozen
    except (CgroupError, *ENGINE_ERRORS):
        return False
