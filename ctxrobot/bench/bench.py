"""`ctxrobot bench`: the side-by-side benchmark against the stock Linux scheduler.

What is compared (the *bench policies*):

- ``isolated``: each task alone on the machine (one ``--only TASK`` run per task, stock CFS),
  the physical best case for its latency and the source of the lower bound on total time;
- ``cfs``, ``weights``, ``ctx``: all tasks together under that runtime policy.

Why each run is a ``ctxrobot run --json --no-drop`` **subprocess** in its own run folder:
the runtime's own CPU (``overhead_cpu_pct``) is then that process's rusage alone, not mixed
with the bench's analysis and plotting; a crashed run cannot take the bench down; and every
run leaves a complete ``run.db`` to inspect with ``ctxrobot report``/``trace`` afterwards.
``--no-drop`` makes every task process every input, so "total time" (playback start until
the last input is processed) measures one fixed workload under each policy.

Repeats are interleaved (A B C A B C …, not A A B B C C) so that drift on the machine
(thermal throttling, a neighbour's load) falls on every policy alike; figures are medians
over repeats with min–max ranges.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ctxrobot.manifest.defaults import CONFIG_DIR, DEFAULT_MANIFEST, REPO, memory_arg
from ctxrobot.model.errors import UserError

BENCH_POLICIES = ("isolated", "cfs", "weights", "ctx")
QUICK_SCENARIO = CONFIG_DIR / "scenarios" / "bench-quick.yaml"

#: A run gets this many times its scenario length (and at least RUN_TIMEOUT_MIN_S) to finish;
#: without dropping, a starved envelope legitimately runs long, a hung one must not hang the
#: bench forever.
RUN_TIMEOUT_FACTOR = 10.0
RUN_TIMEOUT_MIN_S = 600.0
#: After SIGTERM a run takes its containers down; it gets this long before SIGKILL.
STOP_GRACE_S = 60.0
#: How long a finished run's containers may take to disappear before the next run starts.
SETTLE_TIMEOUT_S = 60.0

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: Longest path a Unix socket may bind to on Linux (sun_path is 108 bytes with its NUL).
UNIX_PATH_MAX = 107


class BenchError(RuntimeError):
    """A run of the bench failed; the message says which and where its log is."""


# -- planning ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One `ctxrobot run` of the bench."""

    policy: str  # bench policy: isolated, cfs, weights or ctx
    repeat: int  # 0-based
    out_dir: Path
    task: str | None = None  # isolated: the one task this run holds

    @property
    def label(self) -> str:
        return self.policy if self.task is None else f"{self.policy}:{self.task}"

    @property
    def runtime_policy(self) -> str:
        # Alone on the machine a task needs no scheduling: the stock scheduler is the best case.
        return "cfs" if self.policy == "isolated" else self.policy


def plan_runs(
    policies: Sequence[str], tasks: Sequence[str], repeat: int, out: Path
) -> list[RunSpec]:
    """Every run of the bench in execution order: repeats interleaved across policies."""
    runs = []
    for r in range(repeat):
        for policy in policies:
            if policy == "isolated":
                runs += [
                    RunSpec(policy, r, out / f"rep{r + 1}" / f"isolated-{t}", t) for t in tasks
                ]
            else:
                runs.append(RunSpec(policy, r, out / f"rep{r + 1}" / policy))
    return runs


def socket_path(spec: RunSpec, task: str) -> Path:
    """Where `ctxrobot run` puts a task's socket (see `Runtime._start_task`)."""
    return spec.out_dir / "sockets" / task / "task.sock"


def run_command(
    spec: RunSpec,
    config: Path,
    scenario: Path,
    cpus: float | None,
    memory: str | None,
) -> list[str]:
    cmd = [sys.executable, "-m", "ctxrobot", "run", "--config", str(config)]
    cmd += ["--scenario", str(scenario), "--policy", spec.runtime_policy]
    cmd += ["--json", "--no-drop", "--out", str(spec.out_dir)]
    if spec.task is not None:
        cmd += ["--only", spec.task]
    if cpus is not None:
        cmd += ["--cpus", str(cpus)]
    if memory is not None:
        cmd += ["--memory", memory]
    return cmd


def execute(cmd: Sequence[str], out_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Run one `ctxrobot run --json`; its summary, or BenchError with where to look."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "run.log"
    with log_path.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # SIGTERM lets the run take its containers down like any clean stop.
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            raise BenchError(f"run timed out after {timeout_s:.0f} s; log: {log_path}") from None
        except KeyboardInterrupt:
            # The run got the same SIGINT (same process group): let it finish its take-down.
            proc.wait(STOP_GRACE_S)
            raise
    lines = stdout.strip().splitlines()
    summary: dict[str, Any] | None = None
    if lines:
        try:
            summary = json.loads(lines[-1])
        except json.JSONDecodeError:
            summary = None
    log_lines = log_path.read_text(errors="replace").splitlines()
    if proc.returncode == EXIT_USAGE and log_lines:
        # The run's own one-line verdict on the user's input or machine: it holds for every
        # run of the bench, so say it as it is instead of as one run's failure.
        message = log_lines[-1].removeprefix("ctxrobot run: ")
        raise UserError(f"{message} (log: {log_path})")
    if proc.returncode != 0 or summary is None or summary.get("failure"):
        tail = "\n".join(log_lines[-15:])
        raise BenchError(f"run failed (exit {proc.returncode}); log: {log_path}\n{tail}")
    return summary


def wait_for_teardown(run_dir: Path, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """Until no container of the run in ``run_dir`` is left (its guard may still be removing
    them): the next run must not start beside a container that is still going down, which
    would both load the machine and race the next run's own stale-container cleanup."""
    from ctxrobot.actuate.docker import DockerBackend
    from ctxrobot.observe.store import reading

    with reading(run_dir) as conn:
        run_id = conn.execute("SELECT id FROM run").fetchone()[0]
    backend = DockerBackend()
    deadline = time.monotonic() + timeout_s
    while backend.list_managed(run_id):
        if time.monotonic() > deadline:
            raise BenchError(f"containers of run {run_id} still exist {timeout_s:.0f} s after it")
        time.sleep(0.5)


# -- reading one run -----------------------------------------------------------------------
def critical_latencies(db: Path, crit_rules: Mapping[str, set[str]]) -> dict[str, list[float]]:
    """Per task, latencies (ms) of its samples sensed while a rule made it critical.

    Each run's own rule intervals are used: the context is derived from the same replayed
    sensors in every run, so the windows agree across policies up to event timing, and a
    solo run's windows are "the same windows" for the task alone.
    """
    from ctxrobot.observe.store import reading, rule_intervals

    intervals = rule_intervals(db)
    out: dict[str, list[float]] = {}
    with reading(db) as conn:
        t0 = conn.execute("SELECT t0 FROM run").fetchone()[0]
        tasks = [r[0] for r in conn.execute("SELECT name FROM tasks")]
        for task in tasks:
            windows = [w for rule in crit_rules.get(task, ()) for w in intervals.get(rule, [])]
            if not windows:
                continue
            rows = conn.execute(
                "SELECT t_sensor - ?, latency_ms FROM samples WHERE task = ?", (t0, task)
            )
            out[task] = [lat for t, lat in rows if any(a <= t < b for a, b in windows)]
    return out


def task_cpu_seconds(db: Path) -> dict[str, float]:
    """CPU seconds each task's container used, integrated from cgroup accounting.

    The `usage` table holds, every sampler period, the fraction of the machine a task used
    since the previous sample; the first row's interval is one period. What a task used
    after the sampler's last tick (under one period) is not counted.
    """
    from ctxrobot.observe.store import reading
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


def queue_service_ms(db: Path) -> dict[str, dict[str, float | None]]:
    """Per task, p99 of time queued (t_start − t_sensor) and of processing (t_end − t_start):
    where the latency goes, contention or work."""
    from ctxrobot.observe.store import percentiles, reading

    out: dict[str, dict[str, float | None]] = {}
    with reading(db) as conn:
        rows = conn.execute("SELECT task, t_sensor, t_start, t_end FROM samples").fetchall()
    by_task: dict[str, list[tuple[float, float]]] = {}
    for task, ts, t_start, t_end in rows:
        by_task.setdefault(task, []).append(((t_start - ts) * 1e3, (t_end - t_start) * 1e3))
    for task, pairs in by_task.items():
        out[task] = {
            "queue_p99": percentiles([q for q, _ in pairs], (99,))["p99"],
            "service_p99": percentiles([s for _, s in pairs], (99,))["p99"],
        }
    return out


@dataclasses.dataclass
class RunResult:
    spec: RunSpec
    summary: dict[str, Any]  # the `ctxrobot run --json` document
    critical_ms: dict[str, list[float]]
    task_cpu_s: dict[str, float]
    queue_service: dict[str, dict[str, float | None]]


def analyse(spec: RunSpec, summary: dict[str, Any], crit: Mapping[str, set[str]]) -> RunResult:
    db = spec.out_dir / "run.db"
    return RunResult(
        spec, summary, critical_latencies(db, crit), task_cpu_seconds(db), queue_service_ms(db)
    )


def completeness_problems(result: RunResult, task_inputs: Mapping[str, str]) -> list[str]:
    """What a run left unprocessed: every task must have a result for every input it got."""
    s = result.summary
    problems = []
    for task, stats in s["tasks"].items():
        expected = s["inputs"].get(task_inputs[task], 0)
        if stats["samples"] != expected or stats["dropped"]:
            problems.append(
                f"{result.spec.label} (repeat {result.spec.repeat + 1}): task {task} processed "
                f"{stats['samples']} of {expected} inputs, dropped {stats['dropped']}"
            )
    return problems


# -- aggregating ---------------------------------------------------------------------------
def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _range(values: Iterable[float | None]) -> list[float] | None:
    vals = [v for v in values if v is not None]
    return [min(vals), max(vals)] if vals else None


def _p99(values: Sequence[float]) -> float | None:
    from ctxrobot.observe.store import percentiles

    return percentiles(values, (99,))["p99"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


@dataclasses.dataclass
class Trial:
    """One repeat of one bench policy: a single run, or for ``isolated`` one run per task."""

    policy: str
    runs: list[RunResult]

    @property
    def total_time_s(self) -> float:
        # Isolated: the slowest task alone; a shared run: its own playback-to-done time.
        return max(r.summary["total_time_s"] for r in self.runs)

    @property
    def critical_p99_ms(self) -> float | None:
        return _p99([x for r in self.runs for lats in r.critical_ms.values() for x in lats])

    def task_stats(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for r in self.runs:
            for task, st in r.summary["tasks"].items():
                out[task] = {
                    "p50": st["latency_ms"]["p50"],
                    "p99": st["latency_ms"]["p99"],
                    "misses": st["deadline_misses"],
                    "drops": st["dropped"],
                    "samples": st["samples"],
                    "critical_p99": _p99(r.critical_ms.get(task, [])),
                    **r.queue_service.get(task, {}),
                    "cpu_s": r.task_cpu_s.get(task),
                }
        return out

    def mean(self, key: str) -> float | None:
        vals = [r.summary.get(key) for r in self.runs]
        vals = [v for v in vals if v is not None]
        return statistics.fmean(vals) if vals else None

    def actuation(self, q: str) -> float | None:
        vals = [r.summary["actuation_ms"][q] for r in self.runs]
        return _median(vals)


def aggregate(
    results: Sequence[RunResult],
    policies: Sequence[str],
    *,
    scenario_s: float,
    cores: float,
) -> dict[str, Any]:
    """The bench document: medians over repeats per policy, ratios, bound, per-task stats."""
    trials: dict[str, list[Trial]] = {p: [] for p in policies}
    for p in policies:
        for rep in sorted({r.spec.repeat for r in results if r.spec.policy == p}):
            runs = [r for r in results if r.spec.policy == p and r.spec.repeat == rep]
            trials[p].append(Trial(p, runs))

    doc: dict[str, Any] = {
        key: {}
        for key in (
            "total_time_s",
            "total_time_range_s",
            "speedup_vs_cfs",
            "total_time_vs_isolated",
            "total_time_vs_bound",
            "critical_p99_ms",
            "critical_p99_range_ms",
            "critical_p99_vs_isolated",
            "critical_p99_vs_cfs",
            "actuation_ms_p50",
            "actuation_ms_p99",
            "overhead_cpu_pct",
            "task_cpu_s",
            "deadline_misses",
            "dropped",
            "tasks",
        )
    }
    for p, ts in trials.items():
        doc["total_time_s"][p] = _median(t.total_time_s for t in ts)
        doc["total_time_range_s"][p] = _range(t.total_time_s for t in ts)
        doc["critical_p99_ms"][p] = _median(t.critical_p99_ms for t in ts)
        doc["critical_p99_range_ms"][p] = _range(t.critical_p99_ms for t in ts)
        doc["actuation_ms_p50"][p] = _median(t.actuation("p50") for t in ts)
        doc["actuation_ms_p99"][p] = _median(t.actuation("p99") for t in ts)
        doc["overhead_cpu_pct"][p] = _median(t.mean("overhead_cpu_pct") for t in ts)
        doc["task_cpu_s"][p] = _median(
            sum(cpu for r in t.runs for cpu in r.task_cpu_s.values()) for t in ts
        )
        per_task = [t.task_stats() for t in ts]
        names = list(per_task[0]) if per_task else []
        doc["tasks"][p] = {
            n: {k: _median(pt[n][k] for pt in per_task) for k in per_task[0][n]} for n in names
        }
        for key, field in (("deadline_misses", "misses"), ("dropped", "drops")):
            doc[key][p] = _median(sum(s[field] for s in pt.values()) for pt in per_task)
    if "isolated" in trials:
        # Σ over tasks of each task's solo CPU seconds (median over repeats per task).
        per_task_cpu: dict[str, list[float]] = {}
        for t in trials["isolated"]:
            for r in t.runs:
                for task, cpu in r.task_cpu_s.items():
                    per_task_cpu.setdefault(task, []).append(cpu)
        isolated_cpu = {task: statistics.median(v) for task, v in per_task_cpu.items()}
        doc["isolated_cpu_s"] = isolated_cpu
        doc["lower_bound_s"] = max(scenario_s, sum(isolated_cpu.values()) / cores)
    else:
        doc["isolated_cpu_s"] = None
        doc["lower_bound_s"] = None
    for p in policies:
        total, crit = doc["total_time_s"][p], doc["critical_p99_ms"][p]
        doc["speedup_vs_cfs"][p] = _ratio(doc["total_time_s"].get("cfs"), total)
        doc["total_time_vs_isolated"][p] = _ratio(total, doc["total_time_s"].get("isolated"))
        doc["total_time_vs_bound"][p] = _ratio(total, doc["lower_bound_s"])
        doc["critical_p99_vs_isolated"][p] = _ratio(crit, doc["critical_p99_ms"].get("isolated"))
        doc["critical_p99_vs_cfs"][p] = _ratio(crit, doc["critical_p99_ms"].get("cfs"))
    doc["scenario_s"] = scenario_s
    doc["cores"] = cores
    return doc


# -- the machine ---------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            # x86 says "model name"; a Raspberry Pi's ARM kernel says "Model".
            if key.strip() in ("model name", "Model") and value.strip():
                model = value.strip()
                break
    except OSError:
        pass
    try:
        from ctxrobot.actuate.cgroups import ParentCgroup

        cgroup: int | None = ParentCgroup().version
    except OSError:
        cgroup = None
    try:
        import docker

        docker_version: str | None = docker.from_env().version().get("Version")
    except Exception:  # any engine problem: the runs would have failed and said why
        docker_version = None
    return {
        "cpu_model": model,
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "cgroup_version": cgroup,
        "docker_version": docker_version,
        "python": platform.python_version(),
    }


def source_revision() -> str | None:
    """The checked-out commit, with "+dirty" when the tree has changes: which code ran."""
    repo = REPO
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout (an installed package)
    return head + ("+dirty" if dirty else "")


# -- rendering -----------------------------------------------------------------------------
def _f(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def _span(r: list[float] | None, digits: int = 1) -> str:
    return "" if r is None or r[0] == r[1] else f" ({r[0]:.{digits}f}–{r[1]:.{digits}f})"


def render_markdown(doc: Mapping[str, Any]) -> str:
    """The report: one summary row per policy, then per-task latency and where it went."""
    policies = list(doc["total_time_s"])
    env = doc["envelope"]
    lines = [
        f"# ctxrobot bench: {Path(doc['scenario']).name} ({doc['scenario_s']:g} s), "
        f"{doc['repeat']} repeat(s)",
        "",
        f"Machine: {doc['machine']['cpu_model']}, {doc['machine']['cores']} cores, kernel "
        f"{doc['machine']['kernel']}, cgroup v{doc['machine']['cgroup_version']}, Docker "
        f"{doc['machine']['docker_version']}. Envelope: "
        + (
            f"{env['cpus']} CPUs, memory {env['memory'] or 'unlimited'}"
            if env["cpus"] or env["memory"]
            else "none (whole machine)"
        )
        + f"; cores for the bound: {doc['cores']:g}. Code: {doc['revision']}.",
        "",
        "Medians over repeats (min–max in brackets). Total time: playback start until every "
        "task has processed every input (no dropping). Critical p99: latencies of samples "
        "sensed while a rule made their task critical, pooled over tasks.",
        "",
        "| policy | total s | ×cfs speed | ×isolated | ×bound | critical p99 ms | ×isolated "
        "| ×cfs | actuation p50/p99 ms | overhead % core | task CPU s | misses | drops |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in policies:
        lines.append(
            f"| {p} | {_f(doc['total_time_s'][p], 2)}{_span(doc['total_time_range_s'][p], 2)} "
            f"| {_f(doc['speedup_vs_cfs'][p], 3)} | {_f(doc['total_time_vs_isolated'][p], 3)} "
            f"| {_f(doc['total_time_vs_bound'][p], 3)} "
            f"| {_f(doc['critical_p99_ms'][p])}{_span(doc['critical_p99_range_ms'][p])} "
            f"| {_f(doc['critical_p99_vs_isolated'][p], 2)} "
            f"| {_f(doc['critical_p99_vs_cfs'][p], 2)} "
            f"| {_f(doc['actuation_ms_p50'][p], 3)} / {_f(doc['actuation_ms_p99'][p], 3)} "
            f"| {_f(doc['overhead_cpu_pct'][p], 2)} | {_f(doc['task_cpu_s'][p], 2)} "
            f"| {_f(doc['deadline_misses'][p], 0)} | {_f(doc['dropped'][p], 0)} |"
        )
    if doc["lower_bound_s"] is not None:
        cpu = ", ".join(f"{t} {v:.2f}" for t, v in doc["isolated_cpu_s"].items())
        lines += [
            "",
            f"Lower bound on total time: {doc['lower_bound_s']:.2f} s = max(scenario "
            f"{doc['scenario_s']:g} s, isolated task CPU ({cpu}) s / {doc['cores']:g} cores).",
        ]
    lines += [
        "",
        "Per task: latency p50/p99, and the p99 of time queued (t_start − t_sensor) and of "
        "processing (t_end − t_start), ms; CPU s from cgroup accounting.",
        "",
        "| policy | task | p50 | p99 | critical p99 | queue p99 | processing p99 | CPU s "
        "| misses | drops |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in policies:
        for task, st in doc["tasks"][p].items():
            lines.append(
                f"| {p} | {task} | {_f(st['p50'])} | {_f(st['p99'])} | {_f(st['critical_p99'])} "
                f"| {_f(st.get('queue_p99'))} | {_f(st.get('service_p99'))} "
                f"| {_f(st['cpu_s'], 2)} | {_f(st['misses'], 0)} | {_f(st['drops'], 0)} |"
            )
    if doc["problems"]:
        lines += ["", "**Incomplete runs:**", "", *(f"- {p}" for p in doc["problems"])]
    return "\n".join(lines) + "\n"


def write_plots(doc: Mapping[str, Any], out: Path) -> list[Path]:
    """Total time, critical p99 and per-task p99 per policy (median bars, min–max whiskers)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    policies = list(doc["total_time_s"])
    written = []

    def bars(key: str, range_key: str, ylabel: str, title: str, name: str) -> Figure:
        fig = Figure(figsize=(6.4, 4.0), layout="constrained")
        ax = fig.add_subplot()
        med = [doc[key][p] or 0.0 for p in policies]
        lo = [m - (doc[range_key][p] or [m, m])[0] for m, p in zip(med, policies, strict=True)]
        hi = [(doc[range_key][p] or [m, m])[1] - m for m, p in zip(med, policies, strict=True)]
        ax.bar(policies, med, yerr=[lo, hi], capsize=6, color="tab:blue", alpha=0.8)
        for i, m in enumerate(med):
            ax.annotate(f"{m:.1f}", (i, m), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        path = out / name
        written.append(path)
        return fig

    fig = bars(
        "total_time_s",
        "total_time_range_s",
        "seconds",
        "Total execution time (median, min–max)",
        "total_time.png",
    )
    ax = fig.axes[0]
    ax.axhline(doc["scenario_s"], color="grey", ls=":", label="scenario length")
    if doc["lower_bound_s"] is not None:
        ax.axhline(doc["lower_bound_s"], color="tab:red", ls="--", label="lower bound")
    ax.legend(loc="lower right")
    fig.savefig(written[-1], dpi=110)

    fig = bars(
        "critical_p99_ms",
        "critical_p99_range_ms",
        "ms",
        "Critical-task p99 latency (median, min–max)",
        "critical_p99.png",
    )
    fig.savefig(written[-1], dpi=110)

    fig = Figure(figsize=(7.2, 4.0), layout="constrained")
    ax = fig.add_subplot()
    tasks = sorted({t for p in policies for t in doc["tasks"][p]})
    width = 0.8 / max(1, len(policies))
    for i, p in enumerate(policies):
        vals = [(doc["tasks"][p].get(t) or {}).get("p99") or 0.0 for t in tasks]
        xs = [j + (i - (len(policies) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, vals, width=width, label=p)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.set_title("Per-task p99 latency (median over repeats)")
    ax.legend()
    path = out / "task_p99.png"
    fig.savefig(path, dpi=110)
    written.append(path)
    return written


# -- the command ---------------------------------------------------------------------------
def _parse_policies(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in names if p not in BENCH_POLICIES]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"unknown policy {', '.join(bad) or '(none)'}; choose from {','.join(BENCH_POLICIES)}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError("a policy is named twice")
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_bench_parser(subparsers: Any) -> None:
    """Register `ctxrobot bench` on the CLI's subparsers."""

    p = subparsers.add_parser(
        "bench",
        help="benchmark the policies side by side against the stock Linux scheduler",
        description="Run the manifest's tasks alone (isolated) and together under each "
        "policy, repeats interleaved, every run without dropping; report total execution "
        "time, critical-task p99, per-task latency, actuation latency and runtime CPU "
        "overhead as a markdown table (OUT/report.md) and PNG plots.",
    )
    p.add_argument(
        "--config",
        default=str(DEFAULT_MANIFEST),
        metavar="PATH",
        help="robot manifest (default: config/robot.yaml)",
    )
    scen = p.add_mutually_exclusive_group()
    scen.add_argument("--scenario", metavar="PATH", help="scenario (default: the manifest's)")
    scen.add_argument(
        "--quick",
        action="store_true",
        help=f"play the 28 s {QUICK_SCENARIO.name} (all policies, one repeat: ~3.5 min on 2 cores)",
    )
    p.add_argument(
        "--policies",
        type=_parse_policies,
        default=BENCH_POLICIES,
        metavar="LIST",
        help=f"comma-separated, from {','.join(BENCH_POLICIES)} (default: all)",
    )
    p.add_argument("--repeat", type=_positive, default=1, metavar="N", help="repeats (default 1)")
    p.add_argument("--cpus", type=float, metavar="X", help="confine all tasks to X CPUs")
    p.add_argument(
        "--memory", type=memory_arg, metavar="SIZE", help="confine all tasks to SIZE, e.g. 1Gi"
    )
    p.add_argument("--out", metavar="DIR", help="bench folder (default: runs/bench-<time>)")
    p.add_argument("--json", action="store_true", help="last line: the results as one JSON object")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from ctxrobot.manifest.schema import ManifestError, load_manifest, with_scenario
    from ctxrobot.sched.rules import critical_rules
    from ctxrobot.service.runtime import run_folder

    config = Path(args.config).resolve()
    scenario_path = QUICK_SCENARIO if args.quick else args.scenario
    try:
        manifest = load_manifest(config)
        if scenario_path:
            manifest = with_scenario(manifest, scenario_path)
    except ManifestError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    scenario = manifest.scenario
    out = run_folder(args.out, prefix="bench-")
    if out.exists() and any(out.iterdir()):
        print(f"ctxrobot bench: {out} is not empty; give a new --out", file=sys.stderr)
        return EXIT_USAGE

    tasks = [t.name for t in manifest.tasks]
    task_inputs = {t.name: t.input for t in manifest.tasks}
    crit = critical_rules(manifest.rules)
    memory = None if args.memory is None else str(args.memory)
    runs = plan_runs(args.policies, tasks, args.repeat, out)
    # Each task's socket lives in its run folder; a deep OUT would fail the first run.
    longest = max((socket_path(r, t) for r in runs for t in tasks), key=lambda p: len(str(p)))
    if len(str(longest)) > UNIX_PATH_MAX:
        print(
            f"ctxrobot bench: {out} is too deep: task sockets such as {longest} would exceed "
            f"the {UNIX_PATH_MAX}-byte Unix socket path limit; give a shorter --out",
            file=sys.stderr,
        )
        return EXIT_USAGE
    out.mkdir(parents=True, exist_ok=True)
    timeout = max(RUN_TIMEOUT_MIN_S, RUN_TIMEOUT_FACTOR * scenario.duration_s)
    usable = len(os.sched_getaffinity(0))
    cores = min(usable, args.cpus) if args.cpus else usable

    results: list[RunResult] = []
    problems: list[str] = []
    started = time.monotonic()
    for i, spec in enumerate(runs, 1):
        cmd = run_command(spec, config, scenario.path, args.cpus, memory)
        print(
            f"[{i}/{len(runs)}] repeat {spec.repeat + 1} {spec.label} → {spec.out_dir}",
            file=sys.stderr,
            flush=True,
        )
        try:
            summary = execute(cmd, spec.out_dir, timeout)
            wait_for_teardown(spec.out_dir)
        except BenchError as err:
            print(f"ctxrobot bench: {spec.label}: {err}", file=sys.stderr)
            return EXIT_FAILED
        result = analyse(spec, summary, crit)
        problems += completeness_problems(result, task_inputs)
        results.append(result)
        print(
            f"      total {summary['total_time_s']:.2f} s, runtime CPU "
            f"{_f(summary['overhead_cpu_pct'], 2)} % of a core",
            file=sys.stderr,
            flush=True,
        )

    doc = aggregate(results, args.policies, scenario_s=scenario.duration_s, cores=cores)
    doc.update(
        config=str(config),
        scenario=str(scenario.path),
        repeat=args.repeat,
        envelope={"cpus": args.cpus, "memory": memory},
        machine=machine_info(),
        revision=source_revision(),
        bench_wall_s=time.monotonic() - started,
        problems=problems,
        complete=not problems,
        runs=[
            {
                "policy": r.spec.policy,
                "repeat": r.spec.repeat + 1,
                "tasks": list(r.summary["tasks"]),
                "run_dir": str(r.spec.out_dir),
                "total_time_s": r.summary["total_time_s"],
                "inputs": r.summary["inputs"],
                "samples": {t: s["samples"] for t, s in r.summary["tasks"].items()},
                "dropped": {t: s["dropped"] for t, s in r.summary["tasks"].items()},
            }
            for r in results
        ],
    )
    table = render_markdown(doc)
    (out / "report.md").write_text(table)
    plots = write_plots(doc, out)
    (out / "bench.json").write_text(json.dumps(doc, indent=1))
    print(table)
    print(f"report: {out / 'report.md'}; plots: {', '.join(str(p) for p in plots)}")
    if args.json:
        print(json.dumps(doc))
    return EXIT_OK if not problems else EXIT_FAILED
