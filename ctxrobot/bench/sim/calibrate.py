"""A trace from recorded runs, with what a stall costs each task measured in an envelope.

Per-sample costs come from runs on the whole machine (best isolated: ``--only TASK``).
They are not the whole story in a tight envelope: a task throttled every 10 ms runs in
bursts of a few milliseconds, and after each stall it finds its caches cold — other work
ran in its place. The speech decoder, which walks a large acoustic model, needs a third
more CPU for the same decode in a 0.42-CPU envelope than alone on a free core (docs/sim.md).

So runs of a task alone *in an envelope* (``ctxrobot run --only TASK --no-drop --cpus X``,
the bench's ``isolated`` at a load) calibrate ``resume_s``, the CPU one stall costs it:
simulate that very run with the per-sample costs, count the stalls the task came back
from, and charge the CPU the real run used beyond the costs to them,
``resume_s = (CPU charged to the run's samples − traced CPU of those samples) / stalls``
(a fixed point: the stalls counted with that cost), the median over such runs, never
below 0.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctxrobot.bench.sim.engine import Envelope, Simulation
from ctxrobot.bench.sim.trace import RecordedRun, Trace, build_trace, read_recorded
from ctxrobot.model.errors import UserError

__all__ = ["calibrate", "stall_cost", "trace_from_runs"]

#: Simulations of a run at most, to find a stall's cost (it settles in two or three).
_FIXED_POINT_STEPS = 6


def _simulate(run: RecordedRun, task: str, trace: Trace, resume_s: float) -> Simulation:
    costs = Trace({task: dataclasses.replace(trace.task(task), resume_s=resume_s)}, trace.runs)
    envelope = Envelope(int(run.manifest.robot.cpus), run.machine_cpus)
    sim = Simulation(
        run.manifest, run.policy, [task], run.workload, costs, envelope, no_drop=run.no_drop
    )
    sim.run()
    return sim


def stall_cost(run: RecordedRun, task: str, trace: Trace) -> float | None:
    """What one stall cost ``task`` in ``run`` (None: it never stalled in the simulation).

    A costlier stall makes jobs longer and so more of them stall: the cost is found as the
    fixed point of ``extra CPU / stalls(cost)``, a few simulations of the run."""
    plain = _simulate(run, task, trace, 0.0)
    if not plain.record.complete:
        return None
    done = {s.sample_id for s in plain.record.samples if s.task == task}
    extra = sum(s.cpu_s for s in run.samples[task] if s.sample_id in done)
    extra -= plain.record.cpu_s[task]
    cost = 0.0
    stalls = plain.cpus.resumes[task]
    for _ in range(_FIXED_POINT_STEPS):
        if stalls == 0:
            return None
        better = max(0.0, extra / stalls)
        if abs(better - cost) <= 0.01 * better:
            return better
        cost = better
        stalls = _simulate(run, task, trace, cost).cpus.resumes[task]
    return cost


def calibrate(trace: Trace, runs: Sequence[RecordedRun]) -> Trace:
    """``trace`` with each task's ``resume_s`` measured from ``runs`` in an envelope."""
    without = Trace(
        {n: dataclasses.replace(t, resume_s=0.0) for n, t in trace.tasks.items()}, trace.runs
    )
    costs: dict[str, list[float]] = {}
    for run in runs:
        for task in run.samples:
            if task in trace.tasks and (cost := stall_cost(run, task, without)) is not None:
                costs.setdefault(task, []).append(cost)
    tasks = {
        name: dataclasses.replace(
            t,
            resume_s=statistics.median(costs[name]) if name in costs else 0.0,
            check={**t.check, "resume_runs": len(costs.get(name, []))},
        )
        for name, t in trace.tasks.items()
    }
    return Trace(tasks, [*trace.runs, *(str(r.path) for r in runs)])


def trace_from_runs(paths: Sequence[Path]) -> Trace:
    """A trace from run folders: per-sample costs from those on the whole machine, the
    stall cost from those in an envelope."""
    cache: dict[Any, Any] = {}
    runs = [read_recorded(path, cache) for path in paths]
    free = [r for r in runs if not r.in_envelope]
    if not free:
        raise UserError(
            "every run given ran in an envelope (--cpus): per-sample costs need runs on the "
            "whole machine; add `ctxrobot run --only TASK --no-drop` runs"
        )
    trace = build_trace(free)
    enveloped = [r for r in runs if r.in_envelope]
    return calibrate(trace, enveloped) if enveloped else trace
