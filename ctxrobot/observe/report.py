"""`ctxrobot report RUN_DIR`: PNG plots of one run, for reading a run after the fact.

Figures are built with `matplotlib.figure.Figure` directly, not pyplot: no global figure
state, no GUI backend to pick on a headless robot (saving renders with Agg).

Three figures answer the three questions a run raises:
- `latency.png`: did each task meet its deadline, and *when* did it not? Latency per
  sample over time, with the context (rules active, voice / motion / sign signals on)
  drawn as a timeline on top and shaded behind each task.
- `cpu.png`: who got the CPU? Allocated shares stacked over time, measured use as lines.
- `actuation.png`: how fast did re-allocation land? Histogram of actuation latency on a
  log axis (it spans µs to ms).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ctxrobot.observe.paths import OutputPathError, os_problem, output_dir
from ctxrobot.observe.readers import RunData, db_path_of, read_run
from ctxrobot.observe.values import allocated_shares

# Signals worth a band: what the default rules react to. Matched as substrings.
BAND_SIGNALS = ("voice", "motion", "sign")
# String values that mean "off" for a signal such as motion="stopped".
_OFF_VALUES = {"", "off", "none", "false", "0", "stopped", "still", "idle", "silent", "no"}

Interval = tuple[float, float]


def _is_on(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in _OFF_VALUES
    if isinstance(value, bool | int | float):
        return bool(value)
    return value is not None


def _intervals(changes: Iterable[tuple[float, bool]], end: float) -> list[Interval]:
    """[start, end) intervals from a time-ordered on/off series; open ones close at `end`."""
    out: list[Interval] = []
    since: float | None = None
    for t, on in changes:
        if on and since is None:
            since = t
        elif not on and since is not None:
            out.append((since, t))
            since = None
    if since is not None:
        out.append((since, max(since, end)))
    return out


def context_bands(run: RunData) -> dict[str, list[Interval]]:
    """Label → intervals (s since t0): one per rule, one per voice/motion/sign signal."""
    t0, end = run.t0, run.end
    bands: dict[str, list[Interval]] = {}
    rules: dict[str, list[tuple[float, bool]]] = {}
    for r in run.rules:
        rules.setdefault(r["rule"], []).append((r["t"] - t0, bool(r["active"])))
    for rule, changes in rules.items():
        bands[f"rule {rule}"] = _intervals(changes, end)
    signals: dict[str, list[tuple[float, bool]]] = {}
    for c in run.context:
        for name, value in (c["signals"] or {}).items():
            if any(key in name.lower() for key in BAND_SIGNALS):
                signals.setdefault(name, []).append((c["t"] - t0, _is_on(value)))
    for name, changes in sorted(signals.items()):
        bands[name] = _intervals(changes, end)
    return bands


def _band_colors(labels: Iterable[str]) -> dict[str, Any]:
    cmap = matplotlib.colormaps["tab10"]
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes)


def plot_latency(run: RunData) -> Figure:
    t0 = run.t0
    names = run.task_names
    bands = context_bands(run)
    colors = _band_colors(bands)
    fig = Figure(figsize=(12, 1.2 + 2.4 * len(names)))
    axes = fig.subplots(
        len(names) + 1,
        1,
        sharex=True,
        gridspec_kw={"height_ratios": [max(1, len(bands)) * 0.35] + [2.0] * len(names)},
        squeeze=False,
    )
    timeline, task_axes = axes[0, 0], axes[1:, 0]
    for row, (label, spans) in enumerate(bands.items()):
        timeline.broken_barh([(a, b - a) for a, b in spans], (row - 0.4, 0.8), color=colors[label])
    timeline.set_yticks(range(len(bands)), list(bands), fontsize=8)
    timeline.set_ylim(max(len(bands), 1) - 0.5, -0.5)
    timeline.set_title(f"run {run.run['id']} · policy {run.run['policy']} · context and latency")
    if not bands:
        _no_data(timeline, "context")
    deadlines = {t["name"]: t["deadline_ms"] for t in run.tasks}
    for ax, name in zip(task_axes, names, strict=True):
        for label, spans in bands.items():
            if label.startswith("rule "):
                for a, b in spans:
                    ax.axvspan(a, b, color=colors[label], alpha=0.12, lw=0)
        rows = [s for s in run.samples if s["task"] == name]
        t = np.array([s["t_sensor"] - t0 for s in rows])
        lat = np.array([s["latency_ms"] for s in rows])
        miss = np.array([bool(s["deadline_miss"]) for s in rows], dtype=bool)
        if rows:
            ax.plot(t, lat, lw=0.6, color="0.35")
            ax.scatter(t[~miss], lat[~miss], s=4, color="tab:blue", label="sample")
            ax.scatter(t[miss], lat[miss], s=8, color="tab:red", label="deadline miss")
            ax.set_yscale("log")
        else:
            _no_data(ax, "samples")
        drops = [d["t"] - t0 for d in run.drops if d["task"] == name]
        if drops:
            ax.plot(
                drops,
                np.full(len(drops), 0.02),
                "|",
                color="tab:orange",
                transform=ax.get_xaxis_transform(),
                label="dropped",
            )
        if deadlines.get(name) is not None:
            ax.axhline(deadlines[name], color="tab:red", ls="--", lw=0.8, label="deadline")
        ax.set_ylabel(f"{name}\nlatency ms")
        ax.grid(alpha=0.3, which="both", lw=0.4)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=7, ncols=4)
    task_axes[-1].set_xlabel("time since start (s)")
    task_axes[-1].set_xlim(run.start, max(run.end, run.start + 1e-3))
    fig.tight_layout()
    return fig


def _step_series(
    rows: Iterable[tuple[float, str, float]], names: list[str]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-task values forward-filled onto the union of all sample times (0 before the first)."""
    rows = sorted(rows)
    times = np.array(sorted({t for t, _, _ in rows}))
    values = {n: np.zeros(len(times)) for n in names}
    index = {t: i for i, t in enumerate(times)}
    for t, task, v in rows:
        values.setdefault(task, np.zeros(len(times)))[index[t] :] = v
    return times, values


def allocated_from_allocations(
    allocations: Iterable[Mapping[str, Any]],
) -> list[tuple[float, str, float]]:
    """(t, task, share) rows from allocation events, for runs without usage rows."""
    return [
        (a["t"], task, share)
        for a in allocations
        for task, share in allocated_shares(a["allocation"] or {}).items()
    ]


def plot_cpu(run: RunData) -> Figure:
    t0 = run.t0
    names = run.task_names
    fig = Figure(figsize=(12, 4))
    ax = fig.subplots()
    # Usage rows carry the share allocated when they were read; a run without any (no
    # allocation applied yet, or the stock scheduler) falls back to the allocations.
    allocated = [
        (u["t"] - t0, u["task"], u["allocated_share"])
        for u in run.usage
        if u["allocated_share"] is not None
    ] or [(t - t0, task, s) for t, task, s in allocated_from_allocations(run.allocations)]
    used = [(u["t"] - t0, u["task"], u["cpu_share"] or 0.0) for u in run.usage]
    if not allocated:
        _no_data(ax, "allocations")
    else:
        end = run.end  # covers every allocation and usage row
        times, alloc = _step_series(allocated, names)
        # Extend the last step to the run's end so the final allocation is visible.
        x = np.append(times, end)
        ys = [np.append(alloc[n], alloc[n][-1]) for n in names]
        # One colour per task for both its allocated band and its measured-use line.
        colors = list(_band_colors(names).values())
        ax.stackplot(
            x,
            ys,
            labels=[f"{n} allocated" for n in names],
            colors=colors,
            step="post",
            alpha=0.45,
        )
        if used:
            utimes, use = _step_series(used, names)
            for n, color in zip(names, colors, strict=True):
                ax.step(
                    np.append(utimes, end),
                    np.append(use[n], use[n][-1]),
                    where="post",
                    lw=1.6,
                    color=color,
                    label=f"{n} used",
                )
        ax.set_xlim(run.start, end)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of machine")
    ax.set_xlabel("time since start (s)")
    ax.set_title("CPU: allocated (stacked) and measured use")
    ax.grid(alpha=0.3, lw=0.4)
    if allocated:
        ax.legend(loc="upper left", fontsize=7, ncols=2, bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def plot_actuation(run: RunData) -> Figure:
    values = np.array([a["actuation_ms"] for a in run.allocations if a["actuation_ms"] is not None])
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    positive = values[values > 0]
    if len(positive) == 0:
        _no_data(ax, "allocations")
    else:
        lo, hi = positive.min(), positive.max()
        bins = np.geomspace(lo * 0.9, hi * 1.1 if hi > lo else lo * 1.5, 40)
        ax.hist(positive, bins=bins, color="tab:green", alpha=0.8)
        ax.set_xscale("log")
        p50, p99 = np.percentile(values, [50, 99])
        ax.axvline(p50, color="k", ls="--", lw=1, label=f"p50 {p50:.3f} ms")
        ax.axvline(p99, color="tab:red", ls="--", lw=1, label=f"p99 {p99:.3f} ms")
        ax.legend(fontsize=8)
    ax.set_xlabel("actuation latency (ms, log)")
    ax.set_ylabel("allocations")
    ax.set_title(f"actuation latency · {len(values)} allocations")
    ax.grid(alpha=0.3, lw=0.4, which="both")
    fig.tight_layout()
    return fig


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs for the run in `run_dir` (a run folder or its run.db) into `out_dir`
    (default: `report/` in the run folder)."""
    run = read_run(run_dir)
    default = db_path_of(run_dir).parent / "report"
    out = output_dir(Path(out_dir) if out_dir is not None else default, "plots")
    written = []
    for name, plot in (("latency", plot_latency), ("cpu", plot_cpu), ("actuation", plot_actuation)):
        path = out / f"{name}.png"
        try:
            plot(run).savefig(path, dpi=110)
        except OSError as err:
            raise OutputPathError(
                f"cannot write {path}: {os_problem(err)}: give --out a folder with space"
            ) from None
        written.append(path)
    return written
