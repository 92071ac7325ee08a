"""The robot's isolated CPU demand, and the envelopes that overload it by a given factor.

The demand is what the tasks need on average while their sensors run at their real rates:
the CPU-seconds each task's container used (cgroup accounting) on the whole machine,
summed over tasks and divided by the scenario's length. An envelope for load L then gets
demand / L CPUs, so that the robot asks for L times what it has, the way a real robot is
overloaded when its sensors outpace its CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ctxrobot.bench.plan import Envelope
from ctxrobot.bench.rundata import RunResult
from ctxrobot.model.errors import UserError


@dataclasses.dataclass(frozen=True)
class Demand:
    """The robot's CPU demand, measured on the whole machine."""

    task_cpu_s: dict[str, float]
    scenario_s: float
    how: str  # how it was measured, for the report

    @property
    def cpus(self) -> float:
        return sum(self.task_cpu_s.values()) / self.scenario_s

    def as_json(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "task_cpu_s": self.task_cpu_s, "how": self.how}


def demand_of(results: Sequence[RunResult], scenario_s: float, *, together: bool) -> Demand:
    how = (
        "all tasks in one run on the whole machine, stock scheduler"
        if together
        else "each task alone on the whole machine, stock scheduler"
    )
    cpu = {name: tr.cpu_s for r in results for name, tr in r.tasks.items()}
    return Demand(cpu, scenario_s, how)


def envelopes_for(
    demand: Demand, loads: Sequence[float], *, min_cpus: float, max_cpus: float
) -> list[Envelope]:
    """One envelope per load; a load the machine cannot emulate is a user error.

    ``min_cpus``: the smallest envelope the kernel grants (a quota of at least 1 ms per
    period); ``max_cpus``: the CPUs the bench may use (an envelope larger than the machine
    would not confine anything).
    """
    out = []
    for load in loads:
        cpus = round(demand.cpus / load, 3)
        if cpus < min_cpus:
            raise UserError(
                f"--load {load:g} needs an envelope of {cpus:.3f} CPUs (demand "
                f"{demand.cpus:.3f} CPUs / {load:g}), below the kernel's smallest quota "
                f"({min_cpus:g} CPUs per period); give a load of at most "
                f"{demand.cpus / min_cpus:.2f}"
            )
        if cpus > max_cpus:
            raise UserError(
                f"--load {load:g} needs an envelope of {cpus:.3f} CPUs (demand "
                f"{demand.cpus:.3f} CPUs / {load:g}), more than the {max_cpus:g} usable "
                f"cores; give a load of at least {demand.cpus / max_cpus:.2f}"
            )
        out.append(Envelope(cpus, load))
    return out
