"""Simulating the policies side by side, and what the bench would report of each.

The figures are the bench's (``ctxrobot.bench.rundata``), computed from the simulated runs:
per task the latency p50/p99 (t_end − t_sensor) of the samples it processed (not those its
result marks as shed), deadline misses, drops, samples shed by the context (rate, stale)
and by the task, CPU-seconds used; the **critical p99**: latencies of a task's samples
sensed while a rule made that task critical (windows from the run's own rule changes, a
window still open at the end closed there), pooled over tasks. ``isolated`` is each task
alone in the same envelope under the stock scheduler, one simulated run per task.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ctxrobot.bench.sim.engine import Envelope, SimRecord, Simulation
from ctxrobot.bench.sim.trace import Trace
from ctxrobot.bench.sim.workload import Workload
from ctxrobot.manifest.schema import Manifest
from ctxrobot.model.events import SHED_REASONS
from ctxrobot.observe.readers import percentiles
from ctxrobot.sched.rules import critical_rules

__all__ = ["demand_cpus", "render", "simulate", "summarize"]


def demand_cpus(manifest: Manifest, workload: Workload, trace: Trace) -> float:
    """The robot's isolated CPU demand: every sample of the scenario processed, in CPUs
    averaged over the scenario (what ``--load`` divides)."""
    total = 0.0
    for spec in manifest.tasks:
        task = trace.task(spec.name)
        for reading in workload.sources.get(spec.input, []):
            cost = task.cost(reading)
            total += 0.0 if cost is None else cost.cpu_s
    return total / workload.duration_s


def rule_windows(record: SimRecord) -> dict[str, list[tuple[float, float]]]:
    """Per rule, the [start, end) intervals it was active (as ``readers.rule_intervals``)."""
    out: dict[str, list[tuple[float, float]]] = {}
    since: dict[str, float] = {}
    for t, rule, active in record.rules:
        out.setdefault(rule, [])
        if active and rule not in since:
            since[rule] = t
        elif not active and rule in since:
            out[rule].append((since.pop(rule), t))
    for rule, start in since.items():
        out[rule].append((start, max(start, record.end_s)))
    return out


def _p(values: Sequence[float], q: int) -> float | None:
    return percentiles(values, (q,))[f"p{q}"]


def summarize(records: Iterable[SimRecord], manifest: Manifest) -> dict[str, Any]:
    """The bench's figures for one policy from its simulated run(s) (several: isolated)."""
    crit = critical_rules(manifest.rules)
    deadlines = {t.name: t.deadline_ms for t in manifest.tasks}
    tasks: dict[str, Any] = {}
    pooled: list[float] = []
    records = list(records)
    for record in records:
        windows = rule_windows(record)
        for task in record.tasks:
            mine = [w for rule in crit.get(task, ()) for w in windows.get(rule, [])]
            done = [s for s in record.samples if s.task == task]
            # As the bench: a sample the task itself shed has no latency worth the name.
            timed = [(s.t_sensor, 1e3 * (s.t_end - s.t_sensor)) for s in done if not s.shed]
            lat = [x for _, x in timed]
            critical = [x for t, x in timed if any(a <= t < b for a, b in mine)]
            pooled += critical
            reasons = [why for name, _, _, why in record.drops if name == task]
            tasks[task] = {
                "samples": len(done),
                "p50": _p(lat, 50),
                "p99": _p(lat, 99),
                "critical_p99": _p(critical, 99),
                "critical_samples": len(critical),
                "misses": sum(1 for x in lat if x > deadlines[task]),
                "drops": sum(1 for why in reasons if why not in SHED_REASONS),
                "shed": sum(1 for why in reasons if why in SHED_REASONS),
                "shed_by_task": len(done) - len(timed),
                "cpu_s": record.cpu_s[task],
                "costed_by_kind": record.costed_by_kind.get(task, 0),
            }
    return {
        "critical_p99_ms": _p(pooled, 99),
        "total_time_s": max(r.end_s for r in records),
        "decisions": sum(r.decisions for r in records),
        "complete": all(r.complete for r in records),
        "tasks": tasks,
    }


def simulate(
    manifest: Manifest,
    workload: Workload,
    trace: Trace,
    envelope: Envelope,
    policies: Sequence[str],
    *,
    no_drop: bool = True,
) -> dict[str, Any]:
    """Each policy's figures (``summarize``), plus the wall time each simulation took."""
    names = [t.name for t in manifest.tasks]
    out: dict[str, Any] = {}
    for policy in policies:
        started = time.perf_counter()
        if policy == "isolated":
            runs = [
                Simulation(manifest, "cfs", [n], workload, trace, envelope, no_drop=no_drop).run()
                for n in names
            ]
        else:
            sim = Simulation(manifest, policy, names, workload, trace, envelope, no_drop=no_drop)
            runs = [sim.run()]
        out[policy] = summarize(runs, manifest) | {"sim_s": time.perf_counter() - started}
    cfs = out.get("cfs", {}).get("critical_p99_ms")
    for doc in out.values():
        crit = doc["critical_p99_ms"]
        doc["critical_p99_vs_cfs"] = None if not cfs or crit is None else crit / cfs
    return out


def _f(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render(doc: Mapping[str, Any]) -> str:
    """The simulated figures as markdown tables: one row per policy, then per task."""
    env = doc["envelope"]
    lines = [
        f"# ctxrobot sim: {doc['scenario']} ({doc['scenario_s']:g} s), trace {doc['trace']}",
        "",
        f"Envelope {_f(env['cpus'], 3)} CPUs (granted {env['effective_cpus']:.3f}: "
        f"{env['quota_ms']} ms per {env['period_ms']:g} ms) on {env['ncpus']} CPUs; isolated "
        f"demand {doc['demand_cpus']:.3f} CPUs, load {_f(doc['load'], 2)}. "
        + ("No dropping (every queue blocks)." if doc["no_drop"] else "Queues as the manifest.")
        + " Virtual time; latencies in ms.",
        "",
    ]
    first = next(iter(doc["policies"].values()), {"tasks": {}})
    unseen = {t: s["costed_by_kind"] for t, s in first["tasks"].items() if s["costed_by_kind"]}
    if unseen:
        counts = ", ".join(f"{t} {n}" for t, n in unseen.items())
        lines += [
            f"Samples whose content the trace has not seen, costed at their kind's median: "
            f"{counts}; record runs of this scenario for their own costs.",
            "",
        ]
    lines += [
        "| policy | total s | critical p99 | ×cfs | decisions | sim s |",
        "|---|---|---|---|---|---|",
    ]
    for policy, r in doc["policies"].items():
        lines.append(
            f"| {policy} | {_f(r['total_time_s'], 2)} | {_f(r['critical_p99_ms'])} "
            f"| {_f(r['critical_p99_vs_cfs'], 2)} | {r['decisions']} | {_f(r['sim_s'], 2)} |"
            + ("" if r["complete"] else " (incomplete: a task never finished)")
        )
    lines += [
        "",
        "| policy | task | samples | p50 | p99 | critical p99 | misses | drops | shed | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for policy, r in doc["policies"].items():
        for task, s in r["tasks"].items():
            lines.append(
                f"| {policy} | {task} | {s['samples']} | {_f(s['p50'])} | {_f(s['p99'])} "
                f"| {_f(s['critical_p99'])} | {s['misses']} | {s['drops']} | {s['shed']} "
                f"| {s['cpu_s']:.2f} |"
            )
    return "\n".join(lines) + "\n"
