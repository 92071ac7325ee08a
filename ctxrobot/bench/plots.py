"""The bench's PNG plots: total time and critical p99 per policy at every load (median bars,
min–max whiskers), and the quality change against `isolated` at the headline load."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ctxrobot.bench.report import QUALITY_COLUMNS

#: One colour per policy in every plot.
POLICY_COLORS = {
    "isolated": "tab:gray",
    "cfs": "tab:orange",
    "weights": "tab:purple",
    "ctx": "tab:blue",
}


def _group_label(env: Mapping[str, Any]) -> str:
    if env["load"] is not None:
        return f"L={env['load']:g}\n{env['envelope_cpus']:.2f} CPUs"
    return "whole machine" if env["envelope_cpus"] is None else f"{env['envelope_cpus']:.2f} CPUs"


def _grouped_bars(
    ax: Any, sweep: Sequence[Mapping[str, Any]], key: str, range_key: str | None
) -> None:
    """One group of bars per envelope, one bar per policy."""
    policies = list(dict.fromkeys(p for env in sweep for p in env[key]))
    width = 0.8 / max(1, len(policies))
    for i, p in enumerate(policies):
        xs = [j + (i - (len(policies) - 1) / 2) * width for j in range(len(sweep))]
        med = [env[key].get(p) or 0.0 for env in sweep]
        err = None
        if range_key is not None:
            spans = [env[range_key].get(p) or [m, m] for env, m in zip(sweep, med, strict=True)]
            err = [
                [m - s[0] for m, s in zip(med, spans, strict=True)],
                [s[1] - m for m, s in zip(med, spans, strict=True)],
            ]
        ax.bar(xs, med, width=width, yerr=err, capsize=3, label=p, color=POLICY_COLORS.get(p))
    ax.set_xticks(range(len(sweep)), [_group_label(env) for env in sweep])
    ax.legend(fontsize=8)


def write_plots(doc: Mapping[str, Any], out: Path) -> list[Path]:
    """``total_time.png``, ``critical_p99.png`` and ``quality.png`` in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    sweep = doc["sweep"]
    written = []
    for key, range_key, ylabel, title, name, log in (
        (
            "total_time_s",
            "total_time_range_s",
            "seconds",
            "Total execution time",
            "total_time",
            False,
        ),
        (
            "critical_p99_ms",
            "critical_p99_range_ms",
            "ms",
            "Critical-sample p99",
            "critical_p99",
            True,
        ),
    ):
        fig = Figure(figsize=(7.2, 4.0), layout="constrained")
        ax = fig.add_subplot()
        _grouped_bars(ax, sweep, key, range_key)
        if key == "total_time_s":
            ax.axhline(doc["scenario_s"], color="grey", ls=":", lw=1)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} (median, min–max over repeats)")
        written.append(out / f"{name}.png")
        fig.savefig(written[-1], dpi=110)

    headline = doc["quality_vs_isolated"]
    fig = Figure(figsize=(7.2, 4.0), layout="constrained")
    ax = fig.add_subplot()
    policies = [p for p in headline if p != "isolated"]
    width = 0.8 / max(1, len(policies))
    for i, p in enumerate(policies):
        xs = [j + (i - (len(policies) - 1) / 2) * width for j in range(len(QUALITY_COLUMNS))]
        vals = [100 * (headline[p].get(key) or 0.0) for key, _, _ in QUALITY_COLUMNS]
        ax.bar(xs, vals, width=width, label=p, color=POLICY_COLORS.get(p))
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(QUALITY_COLUMNS)), [name for _, name, _ in QUALITY_COLUMNS])
    ax.set_ylabel("% change against isolated")
    load = "" if doc["load"] is None else f" at L={doc['load']:g}"
    ax.set_title(f"Quality change against isolated{load}")
    ax.legend(fontsize=8)
    written.append(out / "quality.png")
    fig.savefig(written[-1], dpi=110)
    return written
