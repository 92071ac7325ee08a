"""`ctxrobot bench`: the policies side by side against the stock Linux scheduler, on a robot
overloaded the way a real one is, with task quality in the loop.

What is compared (the *bench policies*), every run a ``ctxrobot run --no-drop`` subprocess:

- ``isolated``: each task alone in the envelope (one ``--only TASK`` run per task, stock
  CFS): the physical best case for its latency and its quality;
- ``cfs``, ``weights``, ``ctx``: all tasks together in the envelope under that runtime
  policy; ``cfs`` is the baseline a user would run (same containers and queues, no runtime
  intervention).

How a bench goes (`--load`): first the robot's isolated CPU demand is measured on the whole
machine (`ctxrobot.bench.demand`); each load L then gets an envelope of demand / L CPUs, and
the policies run in it, repeats interleaved (`ctxrobot.bench.plan`). Every run is read back
from its database (`rundata`), its tasks' output scored against ground truth (`quality`),
and the runs become medians per policy and load (`aggregate`), a markdown report with the
targets checked (`report`, `targets`) and plots (`plots`). `--cpus X` skips the demand
and runs in an envelope of X CPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctxrobot.bench.aggregate import envelope_document
from ctxrobot.bench.demand import Demand, demand_of, envelopes_for
from ctxrobot.bench.machine import load_average, machine_info, source_revision
from ctxrobot.bench.plan import (
    BENCH_POLICIES,
    DEFAULT_LOADS,
    HEADLINE_LOAD,
    QUICK_POLICIES,
    Envelope,
    RunSpec,
    demand_runs,
    plan_runs,
    run_command,
)
from ctxrobot.bench.plots import write_plots
from ctxrobot.bench.quality import Scorer, score_run, scorers
from ctxrobot.bench.report import fmt, render_markdown
from ctxrobot.bench.rundata import RunResult, completeness_problems, read_run
from ctxrobot.bench.runner import BenchError, execute_step, run_timeout_s
from ctxrobot.bench.targets import check_targets
from ctxrobot.manifest.defaults import CONFIG_DIR, DEFAULT_MANIFEST, memory_arg
from ctxrobot.model.errors import UserError

QUICK_SCENARIO = CONFIG_DIR / "scenarios" / "bench-quick.yaml"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# -- the command line ----------------------------------------------------------------------
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


def _parse_loads(text: str) -> list[float]:
    try:
        loads = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"loads are numbers such as 2 or 0.5,1,2; got {text!r}"
        ) from None
    if not loads or any(not (0 < x < 100) for x in loads):
        raise argparse.ArgumentTypeError(f"every load must be > 0 and < 100, got {text!r}")
    return loads


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_bench_parser(subparsers: Any) -> None:
    """Register `ctxrobot bench` on the CLI's subparsers."""
    loads = ",".join(f"{x:g}" for x in DEFAULT_LOADS)
    p = subparsers.add_parser(
        "bench",
        help="benchmark the policies side by side against the stock Linux scheduler",
        description="Measure the robot's CPU demand, then for each load L run the manifest's "
        "tasks alone (isolated) and together under each policy in an envelope of demand / L "
        "CPUs, repeats interleaved, every run without dropping. Report total execution time, "
        "CPU used, critical-sample p99 and misses, work shed, task quality against ground "
        "truth, actuation latency and runtime overhead as OUT/report.md, OUT/bench.json and "
        "PNG plots.",
    )
    p.add_argument(
        "--config",
        default=str(DEFAULT_MANIFEST),
        metavar="PATH",
        help="robot manifest (default: config/robot.yaml)",
    )
    p.add_argument(
        "--scenario",
        metavar="PATH",
        help=f"scenario (default: the manifest's; --quick: {QUICK_SCENARIO.name})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"the 28 s {QUICK_SCENARIO.name} (or --scenario) at load {HEADLINE_LOAD:g}, one "
        f"repeat, policies {','.join(QUICK_POLICIES)}, demand from one run, isolated runs side "
        "by side (3.5 min on 2 cores)",
    )
    env = p.add_mutually_exclusive_group()
    env.add_argument(
        "--load",
        type=_parse_loads,
        action="append",
        metavar="L",
        help=f"overload factor(s): envelope = demand / L; repeatable or a list (default {loads})",
    )
    env.add_argument(
        "--cpus", type=_positive_float, metavar="X", help="an explicit envelope of X CPUs instead"
    )
    p.add_argument(
        "--policies",
        type=_parse_policies,
        metavar="LIST",
        help=f"comma-separated, from {','.join(BENCH_POLICIES)} (default: all; --quick: "
        f"{','.join(QUICK_POLICIES)})",
    )
    p.add_argument("--repeat", type=_positive, metavar="N", help="repeats (default 3; --quick: 1)")
    p.add_argument(
        "--memory", type=memory_arg, metavar="SIZE", help="confine all tasks to SIZE, e.g. 1Gi"
    )
    p.add_argument("--out", metavar="DIR", help="bench folder (default: runs/bench-<time>)")
    p.add_argument("--json", action="store_true", help="last line: the results as one JSON object")
    p.set_defaults(func=cmd_bench)


# -- one bench -----------------------------------------------------------------------------
@dataclasses.dataclass
class Bench:
    """Everything one `ctxrobot bench` invocation needs, and what it has measured so far."""

    config: Path
    manifest: Any
    out: Path
    policies: tuple[str, ...]
    repeat: int
    memory: str | None
    quick: bool
    scorers: dict[str, Scorer]
    results: list[RunResult] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    run_loads: list[list[float]] = dataclasses.field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        return [t.name for t in self.manifest.tasks]

    @property
    def scenario_s(self) -> float:
        return float(self.manifest.scenario.duration_s)

    def run_step(self, step: Sequence[RunSpec], index: int, total: int) -> list[RunResult]:
        """Run one step (its runs side by side); read, score and check every run of it."""
        from ctxrobot.sched.rules import critical_rules

        for spec in step:
            print(
                f"[{index}/{total}] repeat {spec.repeat + 1} {spec.envelope.label} {spec.label}"
                f" → {spec.out_dir}",
                file=sys.stderr,
                flush=True,
            )
        scenario = self.manifest.scenario.path
        commands = [(run_command(s, self.config, scenario, self.memory), s.out_dir) for s in step]
        loadavg = load_average()
        summaries = execute_step(commands, run_timeout_s(self.scenario_s))
        crit = critical_rules(self.manifest.rules)
        inputs = {t.name: t.input for t in self.manifest.tasks}
        out = []
        for spec, summary in zip(step, summaries, strict=True):
            result = read_run(spec, summary, crit)
            score_run(result, self.scorers)
            self.problems += completeness_problems(result, inputs)
            self.problems += [
                f"{spec.label} (repeat {spec.repeat + 1}, {spec.envelope.label}): {task} "
                f"not scored: {q['error']}"
                for task, q in result.quality.items()
                if q is not None and "error" in q
            ]
            self.run_loads.append(loadavg)
            print(
                f"      total {summary['total_time_s']:.2f} s, task CPU "
                f"{sum(tr.cpu_s for tr in result.tasks.values()):.2f} s, runtime CPU "
                f"{fmt(summary['overhead_cpu_pct'], 2)} % of a core",
                file=sys.stderr,
                flush=True,
            )
            out.append(result)
        return out

    def run_steps(self, steps: Sequence[Sequence[RunSpec]], name: str) -> list[RunResult]:
        print(f"ctxrobot bench: {name}: {sum(map(len, steps))} run(s)", file=sys.stderr)
        out = []
        for i, step in enumerate(steps, 1):
            out += self.run_step(step, i, len(steps))
        self.results += out
        return out


def _open_bench(args: argparse.Namespace) -> Bench:
    """The bench the arguments describe; a problem with them is a UserError or ManifestError."""
    from ctxrobot.manifest.schema import load_manifest, with_scenario
    from ctxrobot.service.runtime import run_folder

    config = Path(args.config).resolve()
    scenario_path = args.scenario or (QUICK_SCENARIO if args.quick else None)
    manifest = load_manifest(config)
    if scenario_path:
        manifest = with_scenario(manifest, scenario_path)
    out = run_folder(args.out, prefix="bench-")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty; give a new --out")
    return Bench(
        config=config,
        manifest=manifest,
        out=out,
        policies=args.policies or (QUICK_POLICIES if args.quick else BENCH_POLICIES),
        repeat=args.repeat or (1 if args.quick else 3),
        memory=None if args.memory is None else str(args.memory),
        quick=args.quick,
        scorers=scorers(manifest),
    )


def _loads(bench: Bench, args: argparse.Namespace) -> list[float] | None:
    """The loads to measure (None: `--cpus` gives the envelope instead)."""
    if args.cpus is not None:
        return None
    loads = [x for group in args.load for x in group] if args.load else None
    return loads or ([HEADLINE_LOAD] if bench.quick else list(DEFAULT_LOADS))


def _envelopes(
    bench: Bench, loads: list[float] | None, cpus: float | None
) -> tuple[list[Envelope], Demand | None]:
    """The envelopes to run in: `--cpus`, or the measured demand / each load."""
    from ctxrobot.actuate.cgroups import ENVELOPE_PERIOD_US, MIN_QUOTA_US

    if loads is None:
        return [Envelope(cpus)], None
    steps = demand_runs(bench.tasks, bench.out, together=bench.quick)
    demand = demand_of(bench.run_steps(steps, "demand"), bench.scenario_s, together=bench.quick)
    print(f"ctxrobot bench: demand {demand.cpus:.3f} CPUs", file=sys.stderr)
    envelopes = envelopes_for(
        demand,
        loads,
        min_cpus=MIN_QUOTA_US / ENVELOPE_PERIOD_US,
        max_cpus=len(os.sched_getaffinity(0)),
    )
    return envelopes, demand


def cmd_bench(args: argparse.Namespace) -> int:
    bench = _open_bench(args)
    started, load_start = time.monotonic(), load_average()
    usable = len(os.sched_getaffinity(0))
    loads = _loads(bench, args)
    bench.out.mkdir(parents=True, exist_ok=True)
    try:
        envelopes, demand = _envelopes(bench, loads, args.cpus)
        steps = plan_runs(bench.policies, bench.tasks, bench.repeat, bench.out, envelopes, usable)
        bench.run_steps(steps, "policies")
    except BenchError as err:
        print(f"ctxrobot bench: {err}", file=sys.stderr)
        return EXIT_FAILED
    doc = document(bench, envelopes, demand, usable)
    doc["loadavg"] = {"start": load_start, "end": load_average()}
    doc["bench_wall_s"] = time.monotonic() - started
    report = render_markdown(doc)
    (bench.out / "report.md").write_text(report)
    plots = write_plots(doc, bench.out)
    (bench.out / "bench.json").write_text(json.dumps(doc, indent=1))
    print(report)
    print(f"report: {bench.out / 'report.md'}; plots: {', '.join(str(p) for p in plots)}")
    if args.json:
        print(json.dumps(doc))
    return EXIT_OK if not bench.problems else EXIT_FAILED


def document(
    bench: Bench, envelopes: Sequence[Envelope], demand: Demand | None, usable: int
) -> dict[str, Any]:
    """The bench document: the headline envelope's figures at the top level (the load the
    targets are stated at, else the last one), every envelope's in ``sweep``."""
    from ctxrobot.actuate.cgroups import ENVELOPE_PERIOD_US

    period_ms = ENVELOPE_PERIOD_US / 1000
    sweep = [
        envelope_document(
            [r for r in bench.results if r.spec.envelope == env],
            bench.policies,
            env,
            scenario_s=bench.scenario_s,
            cores=min(usable, env.cpus or usable),
            period_ms=period_ms,
        )
        for env in envelopes
    ]
    headline = next((d for d in sweep if d["load"] == HEADLINE_LOAD), sweep[-1])
    return {
        **headline,
        "targets": check_targets(headline),
        "sweep": sweep,
        "demand": None if demand is None else demand.as_json(),
        "envelope_period_ms": period_ms,
        "config": str(bench.config),
        "scenario": str(bench.manifest.scenario.path),
        "repeat": bench.repeat,
        "quick": bench.quick,
        "envelope": {"cpus": headline["envelope_cpus"], "memory": bench.memory},
        "machine": machine_info(),
        "revision": source_revision(),
        "problems": bench.problems,
        "complete": not bench.problems,
        "runs": [
            _run_entry(r, load) for r, load in zip(bench.results, bench.run_loads, strict=True)
        ],
    }


def _run_entry(r: RunResult, loadavg: list[float]) -> dict[str, Any]:
    """One run, as listed in the document: where it is and what it did."""
    return {
        "policy": r.spec.policy,
        "repeat": r.spec.repeat + 1,
        "load": r.spec.envelope.load,
        "envelope_cpus": r.spec.envelope.cpus,
        "tasks": list(r.tasks),
        "run_dir": str(r.spec.out_dir),
        "total_time_s": r.summary["total_time_s"],
        "inputs": r.summary["inputs"],
        "samples": {t: tr.processed for t, tr in r.tasks.items()},
        "shed": {t: tr.shed for t, tr in r.tasks.items()},
        "dropped": {t: tr.dropped for t, tr in r.tasks.items()},
        "cpu_s": {t: tr.cpu_s for t, tr in r.tasks.items()},
        "quality": r.quality,
        "loadavg_at_start": loadavg,
    }
