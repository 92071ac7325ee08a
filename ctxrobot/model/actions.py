"""What the scheduler's core asks the edge to do. Actions are data: the core returns them
from ``SchedulerState.handle`` and the decision thread hands each to its executor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ctxrobot.model.allocation import TaskAllocation

__all__ = ["Action", "ApplyAllocation", "Publish", "SetRate"]


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
class SetRate:
    """Tell a task its processing rate (None: no limit)."""

    task: str
    rate_hz: float | None


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish ``event`` on the bus topic ``topic`` (context and rule changes)."""

    topic: str
    event: object


Action = ApplyAllocation | SetRate | Publish
