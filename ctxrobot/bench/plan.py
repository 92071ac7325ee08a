"""What `ctxrobot bench` runs, in which order, and with which command line.

A bench is a list of *steps*; the runs of one step go side by side, the steps one after
the other. Almost every step is one run. The exception is a load's ``isolated`` runs (one
task alone each): when their envelopes together leave half a core of the machine free (for
the runtimes and the system), they share a step, because each is confined to its own
envelope (a CFS quota on its own parent cgroup) and the machine has room for all of them
at once, so running them one by one would only make the bench longer.

Repeats are interleaved (A B C A B C …, not A A B B C C) across policies and loads, so
that drift on the machine (thermal throttling, a neighbour's load) falls on every policy
alike.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

BENCH_POLICIES = ("isolated", "cfs", "weights", "ctx")
#: `--quick` leaves out `weights` (the published prototype's method) to stay under 5 min.
QUICK_POLICIES = ("isolated", "cfs", "ctx")
DEFAULT_LOADS = (0.5, 1.0, 1.5, 2.0, 3.0)
#: The load the targets are stated at, and the one `--quick` measures.
HEADLINE_LOAD = 2.0
#: The bench's own name for the whole-machine runs that measure the robot's demand.
DEMAND = "demand"
#: CPUs a step of side-by-side runs leaves free for their runtimes and the rest of the system.
SIDE_BY_SIDE_SPARE_CPUS = 0.5


@dataclasses.dataclass(frozen=True)
class Envelope:
    """The CPUs all task containers of a run are confined to (None: the whole machine).

    ``load`` is what the envelope was sized for: the robot's isolated CPU demand divided by
    ``cpus`` (None when the envelope was given as ``--cpus``, or for the whole machine).
    """

    cpus: float | None
    load: float | None = None

    @property
    def label(self) -> str:
        """A folder name: ``L2``, ``cpus0.25`` or ``whole``."""
        if self.load is not None:
            return f"L{self.load:g}"
        return "whole" if self.cpus is None else f"cpus{self.cpus:g}"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One `ctxrobot run` of the bench."""

    policy: str  # bench policy (isolated, cfs, weights, ctx) or DEMAND
    repeat: int  # 0-based
    out_dir: Path
    envelope: Envelope
    tasks: tuple[str, ...] | None = None  # only these tasks (None: all of the manifest's)

    @property
    def label(self) -> str:
        if self.tasks is None:
            return self.policy
        return f"{self.policy}:{','.join(self.tasks)}"

    @property
    def runtime_policy(self) -> str:
        # Alone on the machine or its envelope a task needs no scheduling, and the demand
        # runs measure the work itself: the stock scheduler is the reference for both.
        return "cfs" if self.policy in ("isolated", DEMAND) else self.policy


def demand_runs(tasks: Sequence[str], out: Path, *, together: bool) -> list[list[RunSpec]]:
    """The runs that measure the robot's CPU demand on the whole machine: each task alone,
    one after the other, or (``together``, for `--quick`) all tasks in one run."""
    whole = Envelope(None)
    if together:
        return [[RunSpec(DEMAND, 0, out / DEMAND / "all", whole)]]
    return [[RunSpec(DEMAND, 0, out / DEMAND / t, whole, (t,))] for t in tasks]


def isolated_side_by_side(envelope: Envelope, n_tasks: int, usable_cores: int) -> bool:
    """Whether one load's isolated runs may share a step (see the module docstring)."""
    if envelope.cpus is None:
        return False
    return n_tasks * envelope.cpus <= usable_cores - SIDE_BY_SIDE_SPARE_CPUS


def plan_runs(
    policies: Sequence[str],
    tasks: Sequence[str],
    repeat: int,
    out: Path,
    envelopes: Sequence[Envelope],
    usable_cores: int,
) -> list[list[RunSpec]]:
    """Every step of the bench after the demand runs, in execution order."""
    steps: list[list[RunSpec]] = []
    for r in range(repeat):
        for env in envelopes:
            base = out / env.label / f"rep{r + 1}"
            for policy in policies:
                if policy != "isolated":
                    steps.append([RunSpec(policy, r, base / policy, env)])
                    continue
                solo = [RunSpec(policy, r, base / f"isolated-{t}", env, (t,)) for t in tasks]
                if isolated_side_by_side(env, len(tasks), usable_cores):
                    steps.append(solo)
                else:
                    steps += [[spec] for spec in solo]
    return steps


def run_command(spec: RunSpec, config: Path, scenario: Path, memory: str | None) -> list[str]:
    """The `ctxrobot run` command line of one run: no dropping, the summary as JSON."""
    cmd = [sys.executable, "-m", "ctxrobot", "run", "--config", str(config)]
    cmd += ["--scenario", str(scenario), "--policy", spec.runtime_policy]
    cmd += ["--json", "--no-drop", "--out", str(spec.out_dir)]
    if spec.tasks is not None:
        cmd += ["--only", ",".join(spec.tasks)]
    if spec.envelope.cpus is not None:
        cmd += ["--cpus", str(spec.envelope.cpus)]
    if memory is not None:
        cmd += ["--memory", memory]
    return cmd
