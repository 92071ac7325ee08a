"""Service-time traces: what each sample costs a task, measured in real runs.

A trace says, per task, how much CPU each sample's processing takes, by the sample's
content key (``ctxrobot.bench.sim.workload``): the same image, scan or audio chunk costs
about the same whenever it comes. It is built from recorded runs, best *isolated* ones
(``ctxrobot run --only TASK --no-drop``): a task alone, processing every input.

**Per-sample CPU.** ``t_end − t_start`` is wall time in the task; it equals CPU time only
on a free core with one thread. The task's cgroup CPU (the run's ``usage`` table, one
reading per 0.5 s) corrects it: in each reading's interval, CPU used ÷ wall time spent on
samples is the interval's *ratio*, and a sample costs Σ over the intervals it overlaps of
overlap × ratio (at most the machine's CPUs per second of wall time). So CPU the task
spent around its samples (receiving a 900 kB frame, answering) is charged to them, a
contended core's waiting is not, and a multi-threaded step shows as a ratio above 1: the
sample's *width*, CPU ÷ wall, is how many CPUs it can use at once.

**Format** (JSON, ``format: ctxrobot-sim-trace/1``): per task its ``source``, its
``dispatch_ms`` (median time from sensing to the task starting a sample that found it
idle: host delivery, not CPU), ``samples``: key → ``[cpu_ms, width, result]`` (median
over every occurrence in every run; ``result`` keeps what the scheduler core reads of a
result: ``shed`` and the number of ``detections``; a width of 1 and an empty result are
left out), ``kinds``: sample kind → the same, the median over the kind (for content the
trace has not seen), and ``check``: the whole-run figures the estimate was checked
against.
"""

from __future__ import annotations

import bisect
import json
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctxrobot.bench.sim.workload import Reading, Workload, load_workload
from ctxrobot.model.errors import UserError

__all__ = [
    "TRACE_FORMAT",
    "SampleCost",
    "TaskTrace",
    "Trace",
    "build_trace",
    "load_trace",
    "trace_from_runs",
]

TRACE_FORMAT = "ctxrobot-sim-trace/1"
#: The runtime's usage sampler period (``ctxrobot.service.runtime.USAGE_PERIOD_S``): the
#: first reading of a task covers one period.
_FIRST_INTERVAL_S = 0.5


@dataclass(frozen=True, slots=True)
class SampleCost:
    """What processing one sample takes: CPU-seconds, on at most ``width`` CPUs at once,
    and what its result tells the scheduler core."""

    cpu_s: float
    width: float = 1.0
    result: Mapping[str, Any] = field(default_factory=dict)

    def task_result(self) -> dict[str, Any]:
        """The result as a task would report it, as far as the core reads it."""
        out: dict[str, Any] = {}
        if "shed" in self.result:
            out["shed"] = self.result["shed"]
        if self.result.get("detections"):
            out["detections"] = [{"from_trace": True}] * int(self.result["detections"])
        return out


@dataclass(frozen=True)
class TaskTrace:
    """One task's costs by sample key, and by sample kind for keys it has not seen."""

    source: str
    dispatch_s: float
    samples: Mapping[str, SampleCost]
    kinds: Mapping[str, SampleCost]
    check: Mapping[str, float] = field(default_factory=dict)

    def cost(self, reading: Reading) -> SampleCost | None:
        """The cost of ``reading``'s sample; None when neither its key nor its kind is known."""
        return self.samples.get(reading.key) or self.kinds.get(reading.kind)


@dataclass(frozen=True)
class Trace:
    tasks: Mapping[str, TaskTrace]
    runs: Sequence[str] = ()

    def task(self, name: str) -> TaskTrace:
        if name not in self.tasks:
            have = ", ".join(self.tasks) or "none"
            raise UserError(
                f"the trace has no task {name!r} (it has: {have}); record one with "
                f"`ctxrobot run --only {name} --no-drop` and build the trace from it too"
            )
        return self.tasks[name]

    # -- the file ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": TRACE_FORMAT,
            "runs": list(self.runs),
            "tasks": {
                name: {
                    "source": t.source,
                    "dispatch_ms": round(t.dispatch_s * 1e3, 3),
                    "check": dict(t.check),
                    "kinds": {k: _encode(c) for k, c in t.kinds.items()},
                    "samples": {k: _encode(c) for k, c in t.samples.items()},
                }
                for name, t in self.tasks.items()
            },
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), separators=(",", ":")) + "\n")


def _encode(cost: SampleCost) -> list[Any]:
    """``[cpu_ms]``, ``[cpu_ms, width]`` or ``[cpu_ms, width, result]``: the shortest."""
    out: list[Any] = [round(cost.cpu_s * 1e3, 3), round(cost.width, 2)]
    if cost.result:
        return [*out, dict(cost.result)]
    return out if out[1] != 1.0 else out[:1]


def _decode(value: Sequence[Any]) -> SampleCost:
    cpu_ms, *rest = value
    width = float(rest[0]) if rest else 1.0
    return SampleCost(float(cpu_ms) / 1e3, width, rest[1] if len(rest) > 1 else {})


def load_trace(path: Path) -> Trace:
    """Read a trace file; a file that is not one raises ``UserError`` saying so."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(
            f"{path}: not a readable trace ({err}); give a trace file or run folders"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != TRACE_FORMAT:
        raise UserError(
            f"{path}: not a {TRACE_FORMAT} file; build one with `ctxrobot sim "
            "--trace RUN_DIR... --save-trace FILE`"
        )
    tasks = {
        name: TaskTrace(
            source=t["source"],
            dispatch_s=float(t["dispatch_ms"]) / 1e3,
            samples={k: _decode(v) for k, v in t["samples"].items()},
            kinds={k: _decode(v) for k, v in t["kinds"].items()},
            check=t.get("check", {}),
        )
        for name, t in doc["tasks"].items()
    }
    return Trace(tasks, doc.get("runs", []))


# -- building a trace from run databases ---------------------------------------------------
@dataclass(frozen=True, slots=True)
class RecordedSample:
    """One processed sample of a recorded run, with the CPU charged to it."""

    sample_id: int
    t_sensor: float
    t_start: float
    t_end: float
    cpu_s: float
    width: float
    flags: str  # what the core reads of its result, as sorted JSON


@dataclass(frozen=True)
class RecordedRun:
    """What a run folder tells about its tasks' costs."""

    path: Path
    manifest: Any
    workload: Workload
    samples: Mapping[str, list[RecordedSample]]
    cgroup_cpu_s: Mapping[str, float]


def sample_cpu(
    spans: Sequence[tuple[float, float]], usage: Sequence[tuple[float, float]], ncpus: float
) -> list[float]:
    """Per sample (``spans``: its ``(t_start, t_end)``, in order, not overlapping), the CPU
    it cost, from ``usage`` (``(t, CPU-seconds used since the previous reading)``): see the
    module doc. Wall time outside every reading's interval counts at ratio 1."""
    starts = [a for a, _ in spans]
    cpu = [0.0] * len(spans)
    covered = [0.0] * len(spans)
    previous: float | None = None
    for t, used in usage:
        begin = t - _FIRST_INTERVAL_S if previous is None else previous
        previous = t
        first = max(0, bisect.bisect_right(starts, begin) - 1)
        last = bisect.bisect_left(starts, t)
        overlaps = [(i, min(spans[i][1], t) - max(spans[i][0], begin)) for i in range(first, last)]
        overlaps = [(i, o) for i, o in overlaps if o > 0]
        busy = sum(o for _, o in overlaps)
        if busy <= 0:
            continue
        ratio = min(used / busy, ncpus)
        for i, o in overlaps:
            cpu[i] += o * ratio
            covered[i] += o
    return [c + max(0.0, (b - a) - w) for c, w, (a, b) in zip(cpu, covered, spans, strict=True)]


def _reduced(result: Mapping[str, Any]) -> dict[str, Any]:
    """What the scheduler core reads of a result (see ``SampleCost.task_result``)."""
    out: dict[str, Any] = {}
    if "shed" in result:
        out["shed"] = result["shed"]
    detections = result.get("detections")
    if isinstance(detections, list) and detections:
        out["detections"] = len(detections)
    return out


def _run_workload(run: Path, row: Mapping[str, Any], cache: dict[Any, Any]) -> tuple[Any, Workload]:
    """The manifest and scenario ``run`` played, as the simulator replays them."""
    from ctxrobot.manifest.schema import ManifestError, load_manifest, with_scenario

    key = (row["manifest_path"], row["scenario_path"])
    if key not in cache:
        try:
            manifest = with_scenario(load_manifest(row["manifest_path"]), row["scenario_path"])
        except (ManifestError, OSError, TypeError) as err:
            raise UserError(
                f"{run}: cannot load the manifest {row['manifest_path']} and scenario "
                f"{row['scenario_path']} it was recorded with ({err}); restore them"
            ) from None
        summary = json.loads(row["summary_json"] or "{}")
        duration = summary.get("scenario_s") or manifest.scenario.duration_s
        cache[key] = manifest, load_workload(manifest.scenario, manifest.data_dir, duration)
    manifest, workload = cache[key]
    played = json.loads(row["summary_json"] or "{}").get("inputs", {})
    for source, count in played.items():
        have = len(workload.sources.get(source, []))
        if count != have:
            raise UserError(
                f"{run}: it played {count} readings of {source}, its scenario "
                f"{row['scenario_path']} now makes {have}: the scenario changed since; "
                "record the run again"
            )
    return manifest, workload


def read_recorded(run: Path, cache: dict[Any, Any]) -> RecordedRun:
    """Every task's processed samples in ``run``, each with the CPU charged to it."""
    from ctxrobot.observe.readers import reading

    with reading(run) as conn:
        row = dict(conn.execute("SELECT * FROM run").fetchone())
        tasks = [r[0] for r in conn.execute("SELECT name FROM tasks ORDER BY rowid")]
        rows = {
            task: conn.execute(
                "SELECT sample_id, t_sensor, t_start, t_end, result_json FROM samples "
                "WHERE task = ? ORDER BY t_start",
                (task,),
            ).fetchall()
            for task in tasks
        }
        usage = {
            task: conn.execute(
                "SELECT t, cpu_share FROM usage WHERE task = ? ORDER BY t", (task,)
            ).fetchall()
            for task in tasks
        }
    manifest, workload = _run_workload(run, row, cache)
    shares_of = float(row["ncpus"])
    cores = float(manifest.robot.cpus)  # at most this many CPUs per second of wall time
    samples: dict[str, list[RecordedSample]] = {}
    cgroup: dict[str, float] = {}
    for task in tasks:
        used = _usage_cpu_s(usage[task], shares_of)
        cgroup[task] = sum(u for _, u in used)
        costs = sample_cpu([(r[2], r[3]) for r in rows[task]], used, cores)
        samples[task] = [
            RecordedSample(
                sid,
                t_sensor,
                t_start,
                t_end,
                cpu,
                min(max(cpu / (t_end - t_start), 1.0), cores) if t_end > t_start else 1.0,
                json.dumps(_reduced(json.loads(result or "{}")), sort_keys=True),
            )
            for (sid, t_sensor, t_start, t_end, result), cpu in zip(rows[task], costs, strict=True)
        ]
    return RecordedRun(run, manifest, workload, samples, cgroup)


@dataclass
class _Observed:
    """Every occurrence of each key seen so far for one task, over runs."""

    source: str
    by_key: dict[str, list[tuple[float, float, str]]] = field(default_factory=dict)
    by_kind: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    dispatch: list[float] = field(default_factory=list)
    check: Counter[str] = field(default_factory=Counter)


def _observe(run: RecordedRun, observed: dict[str, _Observed]) -> None:
    """Add every sample of every task in ``run`` to ``observed``."""
    for task, samples in run.samples.items():
        source = run.manifest.task(task).input
        seen = observed.setdefault(task, _Observed(source))
        readings = run.workload.sources[source]
        idle_since = -float("inf")
        for s in samples:
            reading = readings[s.sample_id]
            seen.by_key.setdefault(reading.key, []).append((s.cpu_s, s.width, s.flags))
            seen.by_kind.setdefault(reading.kind, []).append((s.cpu_s, s.width))
            if idle_since <= s.t_sensor:
                seen.dispatch.append(s.t_start - s.t_sensor)
            idle_since = s.t_end
            seen.check["wall_s"] += s.t_end - s.t_start
            seen.check["attributed_cpu_s"] += s.cpu_s
            seen.check["samples"] += 1
        seen.check["cgroup_cpu_s"] += run.cgroup_cpu_s[task]


def _usage_cpu_s(rows: Iterable[tuple[float, float]], ncpus: float) -> list[tuple[float, float]]:
    """The usage table's machine shares as CPU-seconds per interval (first: one period)."""
    out: list[tuple[float, float]] = []
    previous: float | None = None
    for t, share in rows:
        dt = _FIRST_INTERVAL_S if previous is None else t - previous
        previous = t
        out.append((t, (share or 0.0) * ncpus * dt))
    return out


def _median_cost(values: Sequence[tuple[float, float]], flags: Sequence[str] = ()) -> SampleCost:
    cpu = statistics.median(v[0] for v in values)
    width = statistics.median(v[1] for v in values)
    result = json.loads(Counter(flags).most_common(1)[0][0]) if flags else {}
    return SampleCost(cpu, width, result)


def build_trace(runs: Sequence[RecordedRun]) -> Trace:
    """A trace from recorded runs (every task they hold): see the module doc."""
    observed: dict[str, _Observed] = {}
    for run in runs:
        _observe(run, observed)
    tasks = {}
    for name, seen in observed.items():
        if not seen.by_key:
            where = ", ".join(str(r.path) for r in runs)
            raise UserError(f"task {name} processed no sample in {where}")
        tasks[name] = TaskTrace(
            source=seen.source,
            dispatch_s=statistics.median(seen.dispatch) if seen.dispatch else 0.0,
            samples={
                key: _median_cost([(c, w) for c, w, _ in occ], [f for _, _, f in occ])
                for key, occ in seen.by_key.items()
            },
            kinds={kind: _median_cost(occ) for kind, occ in seen.by_kind.items()},
            check={k: round(v, 4) for k, v in seen.check.items()},
        )
    return Trace(tasks, [str(r.path) for r in runs])


def trace_from_runs(paths: Sequence[Path]) -> Trace:
    """A trace from run folders (each run's manifest and scenario are read once)."""
    cache: dict[Any, Any] = {}
    return build_trace([read_recorded(path, cache) for path in paths])
