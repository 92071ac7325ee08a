"""Reading one finished run of the bench from its ``run.db``.

Every sample a task was given ends as exactly one of:

- **processed**: a result without a ``"shed"`` key; only these count for latency and
  deadline misses;
- **shed by the task** (a result with a ``"shed"`` key: SLAM skipping a scan while the robot
  stands still, speech not decoding unvoiced audio) or **shed by the context** (a ``drops``
  row with a reason in :data:`SHED_REASONS`: the rate gate, a stale sample): work the rules
  allow to skip, paid for in quality, never counted as a drop;
- **dropped** (any other ``drops`` row, e.g. ``queue_full``): work the task wanted and could
  not get to. The bench runs with ``--no-drop``, so there should be none.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctxrobot.bench.plan import RunSpec
from ctxrobot.model.events import SHED_REASONS


@dataclasses.dataclass
class TaskRun:
    """What one task did in one run."""

    latencies_ms: list[float] = dataclasses.field(default_factory=list)  # processed samples
    critical_ms: list[float] = dataclasses.field(default_factory=list)  # ... in critical windows
    misses: int = 0  # processed samples past their deadline
    critical_misses: int = 0
    queue_ms: list[float] = dataclasses.field(default_factory=list)  # t_start − t_sensor
    service_ms: list[float] = dataclasses.field(default_factory=list)  # t_end − t_start
    shed_by_task: int = 0
    shed_by_context: int = 0
    dropped: int = 0
    cpu_s: float = 0.0
    #: Every result dict in sample-id order, shed ones included: what the scorers read.
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: The sample id of each of ``results``.
    result_ids: list[int] = dataclasses.field(default_factory=list)

    @property
    def processed(self) -> int:
        return len(self.latencies_ms)

    @property
    def shed(self) -> int:
        return self.shed_by_task + self.shed_by_context


@dataclasses.dataclass
class RunResult:
    spec: RunSpec
    summary: dict[str, Any]  # the `ctxrobot run --json` document
    tasks: dict[str, TaskRun]
    #: Per task, the scorer's document (None: no ground truth for it; see bench.quality).
    quality: dict[str, dict[str, Any] | None] = dataclasses.field(default_factory=dict)


def _in_any(t: float, windows: list[tuple[float, float]]) -> bool:
    return any(a <= t < b for a, b in windows)


def read_run(spec: RunSpec, summary: dict[str, Any], crit: Mapping[str, set[str]]) -> RunResult:
    """Everything the bench needs from one run's database.

    ``crit``: task → the rules that make it critical. Each run's own rule intervals are
    used: the context is derived from the same replayed sensors in every run, so the
    windows agree across policies up to event timing, and a solo run's windows are "the
    same windows" for the task alone.
    """
    from ctxrobot.observe.readers import reading, rule_intervals

    db = spec.out_dir / "run.db"
    intervals = rule_intervals(db)
    with reading(db) as conn:
        t0 = conn.execute("SELECT t0 FROM run").fetchone()[0]
        tasks = {r[0]: TaskRun() for r in conn.execute("SELECT name FROM tasks ORDER BY rowid")}
        rows = conn.execute(
            "SELECT task, sample_id, t_sensor, t_start, t_end, latency_ms, deadline_miss, "
            "result_json FROM samples ORDER BY task, sample_id"
        ).fetchall()
        drops = conn.execute("SELECT task, reason FROM drops").fetchall()
    windows = {
        task: [w for rule in crit.get(task, ()) for w in intervals.get(rule, [])] for task in tasks
    }
    for task, sample_id, t_sensor, t_start, t_end, latency, miss, result_json in rows:
        run = tasks.setdefault(task, TaskRun())
        result = json.loads(result_json) if result_json else {}
        run.results.append(result)
        run.result_ids.append(int(sample_id))
        if "shed" in result:
            run.shed_by_task += 1
            continue
        run.latencies_ms.append(latency)
        run.queue_ms.append((t_start - t_sensor) * 1e3)
        run.service_ms.append((t_end - t_start) * 1e3)
        run.misses += bool(miss)
        if _in_any(t_sensor - t0, windows.get(task, [])):
            run.critical_ms.append(latency)
            run.critical_misses += bool(miss)
    for task, reason in drops:
        run = tasks.setdefault(task, TaskRun())
        if reason in SHED_REASONS:
            run.shed_by_context += 1
        else:
            run.dropped += 1
    for task, cpu in task_cpu_seconds(db).items():
        tasks.setdefault(task, TaskRun()).cpu_s = cpu
    return RunResult(spec, summary, tasks)


def task_cpu_seconds(db: Path) -> dict[str, float]:
    """CPU seconds each task's container used, integrated from cgroup accounting.

    The `usage` table holds, every sampler period, the fraction of the machine a task used
    since the previous sample; the first row's interval is one period. What a task used
    after the sampler's last tick (under one period) is not counted.
    """
    from ctxrobot.observe.readers import reading
    from ctxrobot.service.runtime import USAGE_PERIOD_S

    with reading(db) as conn:
        ncpus = conn.execute("SELECT ncpus FROM run").fetchone()[0]
        rows = conn.execute("SELECT task, t, cpu_share FROM usage ORDER BY task, t").fetchall()
    out: dict[str, float] = {}
    last: dict[str, float] = {}
    for task, t, share in rows:
        dt = t - last[task] if task in last else USAGE_PERIOD_S
        last[task] = t
        out[task] = out.get(task, 0.0) + (share or 0.0) * dt * ncpus
    return out


def completeness_problems(result: RunResult, task_inputs: Mapping[str, str]) -> list[str]:
    """What a run left undone: every input of every task must be processed or shed."""
    s = result.summary
    where = f"{result.spec.label} (repeat {result.spec.repeat + 1}, {result.spec.envelope.label})"
    problems = []
    for task, tr in result.tasks.items():
        expected = s["inputs"].get(task_inputs[task], 0)
        accounted = tr.processed + tr.shed
        if accounted != expected or tr.dropped:
            problems.append(
                f"{where}: task {task} processed {tr.processed} and shed {tr.shed} of "
                f"{expected} inputs, dropped {tr.dropped}"
            )
    return problems
