"""What the scheduler's core asks the edge to do. Actions are data: the core returns them
from ``SchedulerState.handle`` and the decision thread hands each to its executor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ctxrobot.model.allocation import TaskAllocation

__all__ = ["Action", "ApplyAllocation", "Publish", "SetDispatch"]


@dataclass(frozen=True, slots=True)
class ApplyAllocation:
    """Write these tasks' cgroup values. ``before`` holds what each had (None: nothing
    written since its container started), so only fields that differ are written, frozen
    tasks are frozen before their caps change and thawed after. ``allocation`` is the
    policy's whole answer, for the record; ``trigger_t`` is when its cause was sensed."""

    changes: Mapping[str, tuple[TaskAllocation | None, TaskAllocation]]
    allocation: Mapping[str, TaskAllocation]
    trigger_t: float
    reason: str
    policy: str


@dataclass(frozen=True, slots=True)
class SetDispatch:
    """Tell a task's channel which samples to send: at most ``rate_hz`` a second (None: no
    limit), none older than ``stale_after_s`` (None: however late)."""

    task: str
    rate_hz: float | None
    stale_after_s: float | None


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish ``event`` on the bus topic ``topic`` (context and rule changes)."""

    topic: str
    event: object


Action = ApplyAllocation | SetDispatch | Publish
