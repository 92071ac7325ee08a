"""``ctxrobot sim``: the policies in a simulated envelope, in seconds of virtual time.

``ctxrobot sim --trace RUN_DIR... --save-trace FILE`` builds a service-time trace from
recorded runs (best isolated ones: ``ctxrobot run --only TASK --no-drop``);
``ctxrobot sim --trace FILE|RUN_DIR... --load L`` (or ``--cpus X``) simulates the manifest's
scenario under each policy with the real scheduler core in the loop. See docs/sim.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ctxrobot.bench.sim import SIM_POLICIES
from ctxrobot.manifest.defaults import DEFAULT_MANIFEST
from ctxrobot.model.errors import UserError

__all__ = ["add_sim_parser", "cmd_sim"]

EXIT_OK, EXIT_FAILED = 0, 1


def _policies(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in names if p not in SIM_POLICIES]
    if not names or bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"give distinct policies from {','.join(SIM_POLICIES)}; got {text!r}"
        )
    return names


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_sim_parser(subparsers: Any) -> None:
    """Register ``ctxrobot sim`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "sim",
        help="simulate the policies in a CPU envelope, with the real scheduler core, in seconds",
        description="Play the manifest's scenario in virtual time: tasks as queues whose "
        "samples cost what a trace of real runs says, a model of the CPUs and cgroups "
        "(envelope quota, weights, caps, freezing), and the real scheduler core deciding. "
        "Reports what `ctxrobot bench` would, per policy.",
    )
    p.add_argument(
        "--config",
        default=str(DEFAULT_MANIFEST),
        metavar="PATH",
        help="robot manifest (default: config/robot.yaml)",
    )
    p.add_argument("--scenario", metavar="PATH", help="scenario (default: the manifest's)")
    p.add_argument("--only", metavar="TASKS", help="simulate only these tasks (comma-separated)")
    p.add_argument(
        "--trace",
        nargs="+",
        required=True,
        metavar="PATH",
        help="a trace file, or run folders to build one from (isolated runs)",
    )
    p.add_argument("--save-trace", metavar="FILE", help="write the trace built from run folders")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--load", type=_positive, metavar="L", help="envelope = the robot's isolated CPU demand / L"
    )
    size.add_argument("--cpus", type=_positive, metavar="X", help="envelope of X CPUs")
    p.add_argument(
        "--ncpus",
        type=int,
        metavar="N",
        help="the machine's CPUs (default: the manifest's robot.cpus)",
    )
    p.add_argument(
        "--period-ms",
        type=_positive,
        metavar="MS",
        help="the envelope quota's period (default: the runtime's, 10 ms)",
    )
    p.add_argument(
        "--policies",
        type=_policies,
        default=SIM_POLICIES,
        metavar="LIST",
        help=f"comma-separated, from {','.join(SIM_POLICIES)} (default: all)",
    )
    p.add_argument(
        "--drop",
        action="store_true",
        help="queues drop as the manifest says (default: no dropping, as the bench)",
    )
    p.add_argument("--json", action="store_true", help="last line: the results as one JSON object")
    p.set_defaults(func=cmd_sim)


def _trace(paths: list[str]) -> Any:
    from ctxrobot.bench.sim.trace import load_trace, trace_from_runs
    from ctxrobot.observe.schema import DB_NAME

    given = [Path(p) for p in paths]
    for path in given:
        if not path.exists():
            raise UserError(f"{path}: no such file or folder; give a trace file or run folders")
    if len(given) == 1 and given[0].is_file() and given[0].name != DB_NAME:
        return load_trace(given[0])
    return trace_from_runs([p.parent if p.name == DB_NAME else p for p in given])


def cmd_sim(args: argparse.Namespace) -> int:
    from ctxrobot.actuate.cgroups import ENVELOPE_PERIOD_US
    from ctxrobot.bench.sim.engine import Envelope
    from ctxrobot.bench.sim.results import demand_cpus, render, simulate
    from ctxrobot.bench.sim.workload import load_workload
    from ctxrobot.manifest.schema import ManifestError, load_manifest, with_scenario

    try:
        manifest = load_manifest(Path(args.config))
        if args.scenario:
            manifest = with_scenario(manifest, args.scenario)
    except ManifestError as err:
        raise UserError(str(err)) from None
    if args.only:
        manifest = _only(manifest, args.only.split(","))
    trace = _trace(args.trace)
    if args.save_trace:
        trace.save(Path(args.save_trace))
        print(f"trace: {args.save_trace} ({', '.join(trace.tasks)})", file=sys.stderr)
        for name, task in trace.tasks.items():
            if task.check:
                print(f"  {name}: {_check_line(task.check)}", file=sys.stderr)
    if args.load is None and args.cpus is None:
        if args.save_trace:
            return EXIT_OK
        raise UserError("give --load L or --cpus X to simulate (or --save-trace FILE)")
    workload = load_workload(manifest.scenario, manifest.data_dir)
    demand = demand_cpus(manifest, workload, trace)
    cpus = args.cpus if args.cpus is not None else demand / args.load
    period_s = (args.period_ms / 1e3) if args.period_ms else ENVELOPE_PERIOD_US / 1e6
    envelope = Envelope(args.ncpus or int(manifest.robot.cpus), cpus, period_s)
    results = simulate(manifest, workload, trace, envelope, args.policies, no_drop=not args.drop)
    quota_s = envelope.quota_s or 0.0
    doc = {
        "config": str(manifest.path),
        "scenario": str(manifest.scenario.path),
        "scenario_s": workload.duration_s,
        "trace": " ".join(args.trace),
        "envelope": {
            "cpus": cpus,
            "effective_cpus": envelope.effective_cpus,
            "quota_ms": round(quota_s * 1e3, 3),
            "period_ms": envelope.period_s * 1e3,
            "ncpus": envelope.ncpus,
        },
        "demand_cpus": demand,
        "load": args.load if args.load is not None else demand / cpus,
        "no_drop": not args.drop,
        "policies": results,
    }
    print(render(doc))
    if args.json:
        print(json.dumps(doc))
    return EXIT_OK if all(r["complete"] for r in results.values()) else EXIT_FAILED


def _only(manifest: Any, names: list[str]) -> Any:
    """The manifest with only the tasks ``names`` (as ``ctxrobot run --only``)."""
    known = [t.name for t in manifest.tasks]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise UserError(
            f"--only names unknown task(s) {', '.join(unknown)}; tasks: {', '.join(known)}"
        )
    return dataclasses.replace(manifest, tasks=[t for t in manifest.tasks if t.name in names])


def _check_line(check: dict[str, float]) -> str:
    """How the trace's CPU estimate compares with the recorded wall and cgroup figures."""
    wall, cpu, cgroup = check["wall_s"], check["attributed_cpu_s"], check["cgroup_cpu_s"]
    return (
        f"{int(check['samples'])} samples, wall in task {wall:.2f} s, CPU charged to "
        f"samples {cpu:.2f} s (cgroup total {cgroup:.2f} s, {100 * cpu / cgroup:.0f} % of it)"
        if cgroup > 0
        else f"{int(check['samples'])} samples, wall in task {wall:.2f} s, no cgroup readings"
    )
