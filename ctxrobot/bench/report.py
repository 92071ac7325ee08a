"""The bench's markdown report (``OUT/report.md``): the targets at the headline load, then
one section per load with its summary, quality and per-task tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

QUALITY_COLUMNS = (
    ("slam_trans_error_m", "SLAM trans m", 3),
    ("slam_rot_error_deg", "SLAM rot °", 2),
    ("stop_recall", "Stop recall", 3),
    ("stop_precision", "Stop precision", 3),
    ("wer", "WER", 3),
)


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def _span(r: list[float] | None, digits: int = 1) -> str:
    return "" if r is None or r[0] == r[1] else f" ({r[0]:.{digits}f}–{r[1]:.{digits}f})"


def _share(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:+.{digits}f} %"


def _header(doc: Mapping[str, Any]) -> list[str]:
    m = doc["machine"]
    load = doc["loadavg"]
    lines = [
        f"# ctxrobot bench: {Path(doc['scenario']).name} ({doc['scenario_s']:g} s), "
        f"{doc['repeat']} repeat(s)",
        "",
        f"Machine: {m['hostname']}, {m['cpu_model']}, {m['cores']} cores, kernel {m['kernel']}, "
        f"cgroup v{m['cgroup_version']}, Docker {m['docker_version']}. Load average (1/5/15 "
        f"min) {'/'.join(map(str, load['start']))} at the start, "
        f"{'/'.join(map(str, load['end']))} at the end. Code: {doc['revision']}. "
        f"Bench wall time {doc['bench_wall_s'] / 60:.1f} min.",
        "",
    ]
    busiest = max((r["loadavg_at_start"][0] for r in doc["runs"]), default=0.0)
    if busiest > m["usable_cores"]:
        lines += [
            f"**The machine was busy**: the 1-minute load average reached {busiest:g} at the "
            f"start of a run, on {m['usable_cores']} cores. Other work shared the CPU with "
            "the envelope, so these numbers say as much about the neighbours as about the "
            "policies.",
            "",
        ]
    if doc["quick"]:
        lines += [
            "Quick bench: one load, one repeat, no `weights` unless asked for, the demand "
            "from one run of all tasks together.",
            "",
        ]
    demand = doc["demand"]
    if demand is not None:
        cpu = ", ".join(f"{t} {v:.2f}" for t, v in demand["task_cpu_s"].items())
        lines += [
            f"Demand: the robot's tasks need **{demand['cpus']:.3f} CPUs** on average "
            f"({cpu} CPU-s over {doc['scenario_s']:g} s, {demand['how']}). An envelope for "
            "load L gets demand / L CPUs.",
            "",
        ]
    lines += [
        f"Envelope: a CFS quota on one parent cgroup of all task containers, granted per "
        f"**{doc['envelope_period_ms']:g} ms** period: a spent quota stalls the tasks for "
        "the rest of that period, a few ms, as a slower CPU would slow them, rather than "
        "for most of the default 100 ms.",
        "",
        "Medians over repeats (min–max in brackets). Every run without dropping: total time "
        "is playback start until every task has finished its input stream, each policy "
        "shedding only what its rules allow. Latencies count processed samples only (shed "
        "ones are counted under *shed*). Critical p99: samples sensed while a rule made "
        "their task critical, pooled over tasks. A load's isolated runs go side by side "
        "when their envelopes together leave half a core free (each has its own quota).",
        "",
    ]
    return lines


def _targets(doc: Mapping[str, Any]) -> list[str]:
    if not doc.get("targets"):
        return []
    lines = [
        f"## Targets at L = {doc['load']:g}" if doc["load"] is not None else "## Targets",
        "",
        "| target | bound | measured | met |",
        "|---|---|---|---|",
    ]
    for t in doc["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(
            f"| {t['target']} | {t['bound']} {t['threshold']:g} | {fmt(t['value'], 3)} | {met} |"
        )
    return [*lines, ""]


def _envelope_title(env: Mapping[str, Any]) -> str:
    if env["envelope_cpus"] is None:
        return "## Whole machine (no envelope)"
    period = f"{env['envelope_period_ms']:g} ms period"
    if env["load"] is None:
        return f"## Envelope {env['envelope_cpus']:.3f} CPUs ({period})"
    return f"## L = {env['load']:g}: envelope {env['envelope_cpus']:.3f} CPUs ({period})"


def _summary_table(env: Mapping[str, Any], policies: Sequence[str]) -> list[str]:
    lines = [
        "| policy | total s | ×cfs speed | ×bound | task CPU s | critical p99 ms | ×isolated "
        "| ×cfs | critical misses | actuation p50/p99 ms | overhead % core | shed | drops |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in policies:
        shed = sum(v or 0 for v in env["shed"][p].values())
        lines.append(
            f"| {p} | {fmt(env['total_time_s'][p], 2)}{_span(env['total_time_range_s'][p], 2)} "
            f"| {fmt(env['speedup_vs_cfs'][p], 3)} | {fmt(env['total_time_vs_bound'][p], 3)} "
            f"| {fmt(env['cpu_s'][p], 2)} "
            f"| {fmt(env['critical_p99_ms'][p])}{_span(env['critical_p99_range_ms'][p])} "
            f"| {fmt(env['critical_p99_vs_isolated'][p], 2)} "
            f"| {fmt(env['critical_p99_vs_cfs'][p], 2)} "
            f"| {_share(env['critical_miss_rate'][p])} "
            f"| {fmt(env['actuation_ms_p50'][p], 3)} / {fmt(env['actuation_ms_p99'][p], 3)} "
            f"| {fmt(env['overhead_cpu_pct'][p], 2)} | {shed:.0f} "
            f"| {fmt(env['dropped'][p], 0)} |"
        )
    if env["lower_bound_s"] is not None:
        cpu = ", ".join(f"{t} {v:.2f}" for t, v in env["isolated_cpu_s"].items())
        lines += [
            "",
            f"Bound on total time: {env['lower_bound_s']:.2f} s = max(scenario "
            f"{env['scenario_s']:g} s, task CPU alone ({cpu}) s / {env['cores']:g} CPUs).",
        ]
    return [*lines, ""]


def _quality_table(env: Mapping[str, Any], policies: Sequence[str]) -> list[str]:
    lines = [
        "Quality, and its relative change against `isolated` (errors and WER: lower is "
        "better; recall and precision: higher is better):",
        "",
        "| policy | "
        + " | ".join(name for _, name, _ in QUALITY_COLUMNS)
        + " | worst loss | scored |",
        "|---|" + "---|" * (len(QUALITY_COLUMNS) + 2),
    ]
    for p in policies:
        q, change = env["quality"][p], env["quality_vs_isolated"][p]
        cells = [
            fmt(q.get(key), digits) + ("" if p == "isolated" else f" ({_pct(change.get(key))})")
            for key, _, digits in QUALITY_COLUMNS
        ]
        worst = "–" if p == "isolated" else _pct(env["quality_loss_vs_isolated"][p])
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {worst} | {_scored(env, p)} |")
    return [
        *lines,
        "",
        "*Scored*: what each scorer could score (SLAM relations, frames and Stop frames the "
        "sign detector looked at, utterances). A task is scored on the work it processed: "
        "frames a policy shed are not in the Stop recall.",
        "",
    ]


def _scored(env: Mapping[str, Any], policy: str) -> str:
    by_task = env.get("quality_scored", {}).get(policy, {})
    return "; ".join(
        f"{task} "
        + ", ".join(f"{v:.0f} {k.replace('_', ' ')}" for k, v in counts.items() if v is not None)
        for task, counts in by_task.items()
    )


def _task_table(env: Mapping[str, Any], policies: Sequence[str]) -> list[str]:
    lines = [
        "Per task: latency of processed samples (ms), the p99 of time queued (t_start − "
        "t_sensor) and of processing (t_end − t_start); CPU from cgroup accounting; shed by "
        "the task / by the context's rules.",
        "",
        "| policy | task | p50 | p99 | critical p99 | ×isolated | queue p99 | processing p99 "
        "| CPU s | processed | shed task/context | misses | drops |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in policies:
        for task, st in env["tasks"][p].items():
            lines.append(
                f"| {p} | {task} | {fmt(st['p50'])} | {fmt(st['p99'])} "
                f"| {fmt(st['critical_p99'])} | {fmt(st.get('critical_p99_vs_isolated'), 2)} "
                f"| {fmt(st['queue_p99'])} | {fmt(st['service_p99'])} | {fmt(st['cpu_s'], 2)} "
                f"| {fmt(st['samples'], 0)} "
                f"| {fmt(st['shed_by_task'], 0)}/{fmt(st['shed_by_context'], 0)} "
                f"| {fmt(st['misses'], 0)} | {fmt(st['drops'], 0)} |"
            )
    return [*lines, ""]


def render_markdown(doc: Mapping[str, Any]) -> str:
    """The report: header, targets at the headline load, one section per envelope."""
    lines = _header(doc) + _targets(doc)
    for env in doc["sweep"]:
        policies = list(env["total_time_s"])
        lines += [_envelope_title(env), ""]
        lines += _summary_table(env, policies)
        lines += _quality_table(env, policies)
        lines += _task_table(env, policies)
    if doc["problems"]:
        lines += ["**Problems:**", "", *(f"- {p}" for p in doc["problems"]), ""]
    return "\n".join(lines)
