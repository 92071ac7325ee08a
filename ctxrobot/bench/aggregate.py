"""From runs to the bench document: medians over repeats, per policy, per envelope.

A *trial* is one repeat of one bench policy under one envelope: a single run, or for
``isolated`` one run per task. Figures are medians over a policy's trials with min–max
ranges; ratios compare medians.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ctxrobot.bench.plan import Envelope
from ctxrobot.bench.quality import (
    QUALITY_METRICS,
    metrics_of,
    relative_change,
    scored_of,
    worst_loss,
)
from ctxrobot.bench.rundata import RunResult, TaskRun


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def value_range(values: Iterable[float | None]) -> list[float] | None:
    vals = [v for v in values if v is not None]
    return [min(vals), max(vals)] if vals else None


def p99(values: Sequence[float]) -> float | None:
    from ctxrobot.observe.readers import percentiles

    return percentiles(values, (99,))["p99"]


def p50(values: Sequence[float]) -> float | None:
    from ctxrobot.observe.readers import percentiles

    return percentiles(values, (50,))["p50"]


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _rate(count: int, total: int) -> float | None:
    return count / total if total else None


@dataclasses.dataclass
class Trial:
    """One repeat of one bench policy under one envelope."""

    policy: str
    runs: list[RunResult]

    @property
    def tasks(self) -> dict[str, TaskRun]:
        return {name: tr for r in self.runs for name, tr in r.tasks.items()}

    @property
    def total_time_s(self) -> float:
        # Isolated: the slowest task alone; a shared run: its own playback-to-done time.
        return max(r.summary["total_time_s"] for r in self.runs)

    @property
    def critical_p99_ms(self) -> float | None:
        return p99([x for tr in self.tasks.values() for x in tr.critical_ms])

    @property
    def critical_miss_rate(self) -> float | None:
        trs = self.tasks.values()
        return _rate(sum(tr.critical_misses for tr in trs), sum(len(tr.critical_ms) for tr in trs))

    @property
    def cpu_s(self) -> float:
        return sum(tr.cpu_s for tr in self.tasks.values())

    @property
    def overhead_cpu_pct(self) -> float | None:
        vals = [r.summary.get("overhead_cpu_pct") for r in self.runs]
        present = [v for v in vals if v is not None]
        return statistics.fmean(present) if present else None

    def actuation(self, q: str) -> float | None:
        return median(r.summary["actuation_ms"][q] for r in self.runs)

    @property
    def quality(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for r in self.runs:
            out |= metrics_of(r)
        return out

    @property
    def scored(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for r in self.runs:
            out |= scored_of(r)
        return out

    def task_stats(self) -> dict[str, dict[str, float | None]]:
        out: dict[str, dict[str, float | None]] = {}
        for name, tr in self.tasks.items():
            out[name] = {
                "p50": p50(tr.latencies_ms),
                "p99": p99(tr.latencies_ms),
                "critical_p99": p99(tr.critical_ms),
                "critical_miss_rate": _rate(tr.critical_misses, len(tr.critical_ms)),
                "queue_p99": p99(tr.queue_ms),
                "service_p99": p99(tr.service_ms),
                "misses": tr.misses,
                "drops": tr.dropped,
                "shed": tr.shed,
                "shed_by_task": tr.shed_by_task,
                "shed_by_context": tr.shed_by_context,
                "samples": tr.processed,
                "cpu_s": tr.cpu_s,
            }
        return out


def trials_of(results: Sequence[RunResult], policies: Sequence[str]) -> dict[str, list[Trial]]:
    """The results of one envelope, grouped into trials per policy (in repeat order)."""
    trials: dict[str, list[Trial]] = {p: [] for p in policies}
    for p in policies:
        for rep in sorted({r.spec.repeat for r in results if r.spec.policy == p}):
            runs = [r for r in results if r.spec.policy == p and r.spec.repeat == rep]
            trials[p].append(Trial(p, runs))
    return trials


def _medians(
    trials: Mapping[str, list[Trial]], fn: Callable[[Trial], float | None]
) -> tuple[dict[str, float | None], dict[str, list[float] | None]]:
    """Per policy: the median of ``fn`` over its trials, and the min–max range."""
    meds = {p: median(fn(t) for t in ts) for p, ts in trials.items()}
    ranges = {p: value_range(fn(t) for t in ts) for p, ts in trials.items()}
    return meds, ranges


def _task_medians(ts: Sequence[Trial]) -> dict[str, dict[str, float | None]]:
    """Per task, each statistic's median over the trials."""
    values: dict[str, dict[str, list[float | None]]] = {}
    for t in ts:
        for name, stats in t.task_stats().items():
            per_key = values.setdefault(name, {k: [] for k in stats})
            for k, v in stats.items():
                per_key[k].append(v)
    return {n: {k: median(v) for k, v in st.items()} for n, st in values.items()}


def _scored_medians(ts: Sequence[Trial]) -> dict[str, dict[str, float | None]]:
    """Per task, the median over trials of each count its scorer reported."""
    values: dict[str, dict[str, list[float | None]]] = {}
    for t in ts:
        for task, counts in t.scored.items():
            for k, v in counts.items():
                values.setdefault(task, {}).setdefault(k, []).append(v)
    return {task: {k: median(v) for k, v in c.items()} for task, c in values.items()}


def _lower_bound(
    trials: Mapping[str, list[Trial]], scenario_s: float, cores: float
) -> tuple[dict[str, float] | None, float | None]:
    """Each task's CPU alone (median over repeats) and the bound on total time they give:
    no policy can end before the scenario has played, nor before the envelope has had
    time for all the work."""
    if not trials.get("isolated"):
        return None, None
    per_task: dict[str, list[float]] = {}
    for t in trials["isolated"]:
        for task, tr in t.tasks.items():
            per_task.setdefault(task, []).append(tr.cpu_s)
    isolated_cpu = {task: statistics.median(v) for task, v in per_task.items()}
    return isolated_cpu, max(scenario_s, sum(isolated_cpu.values()) / cores)


def envelope_document(
    results: Sequence[RunResult],
    policies: Sequence[str],
    envelope: Envelope,
    *,
    scenario_s: float,
    cores: float,
    period_ms: float,
) -> dict[str, Any]:
    """The bench document of one envelope (one load): every figure per policy."""
    trials = trials_of(results, policies)
    doc: dict[str, Any] = {"load": envelope.load, "envelope_cpus": envelope.cpus}
    doc["envelope_period_ms"] = period_ms if envelope.cpus is not None else None
    doc["total_time_s"], doc["total_time_range_s"] = _medians(trials, lambda t: t.total_time_s)
    doc["critical_p99_ms"], doc["critical_p99_range_ms"] = _medians(
        trials, lambda t: t.critical_p99_ms
    )
    doc["critical_miss_rate"], _ = _medians(trials, lambda t: t.critical_miss_rate)
    doc["actuation_ms_p50"], _ = _medians(trials, lambda t: t.actuation("p50"))
    doc["actuation_ms_p99"], _ = _medians(trials, lambda t: t.actuation("p99"))
    doc["overhead_cpu_pct"], _ = _medians(trials, lambda t: t.overhead_cpu_pct)
    doc["cpu_s"], doc["cpu_range_s"] = _medians(trials, lambda t: t.cpu_s)
    doc["task_cpu_s"] = dict(doc["cpu_s"])  # the name earlier benches used
    doc["tasks"] = {p: _task_medians(ts) for p, ts in trials.items()}
    for key, field in (("deadline_misses", "misses"), ("dropped", "drops")):
        doc[key] = {
            p: median(sum(s[field] or 0 for s in t.task_stats().values()) for t in ts)
            for p, ts in trials.items()
        }
    doc["shed"] = {p: {n: st["shed"] for n, st in doc["tasks"][p].items()} for p in policies}
    doc["quality"] = {
        p: {m: median(t.quality.get(m) for t in ts) for m in QUALITY_METRICS}
        for p, ts in trials.items()
    }
    doc["quality_scored"] = {p: _scored_medians(ts) for p, ts in trials.items()}
    doc["isolated_cpu_s"], doc["lower_bound_s"] = _lower_bound(trials, scenario_s, cores)
    _add_ratios(doc, policies)
    doc["scenario_s"] = scenario_s
    doc["cores"] = cores
    return doc


def _add_ratios(doc: dict[str, Any], policies: Sequence[str]) -> None:
    """Every comparison against ``cfs`` and ``isolated`` (None where one is missing)."""
    for key in (
        "speedup_vs_cfs",
        "total_time_vs_isolated",
        "total_time_vs_bound",
        "critical_p99_vs_isolated",
        "critical_p99_vs_cfs",
        "quality_vs_isolated",
        "quality_loss_vs_isolated",
    ):
        doc[key] = {}
    iso_quality = doc["quality"].get("isolated", {})
    for p in policies:
        total, crit = doc["total_time_s"][p], doc["critical_p99_ms"][p]
        doc["speedup_vs_cfs"][p] = ratio(doc["total_time_s"].get("cfs"), total)
        doc["total_time_vs_isolated"][p] = ratio(total, doc["total_time_s"].get("isolated"))
        doc["total_time_vs_bound"][p] = ratio(total, doc["lower_bound_s"])
        doc["critical_p99_vs_isolated"][p] = ratio(crit, doc["critical_p99_ms"].get("isolated"))
        doc["critical_p99_vs_cfs"][p] = ratio(crit, doc["critical_p99_ms"].get("cfs"))
        changes = {
            m: relative_change(doc["quality"][p].get(m), iso_quality.get(m))
            for m in QUALITY_METRICS
        }
        doc["quality_vs_isolated"][p] = changes
        doc["quality_loss_vs_isolated"][p] = worst_loss(changes)
        iso_tasks = doc["tasks"].get("isolated", {})
        for task, st in doc["tasks"][p].items():
            st["critical_p99_vs_isolated"] = ratio(
                st["critical_p99"], (iso_tasks.get(task) or {}).get("critical_p99")
            )
