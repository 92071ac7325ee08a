"""Run the SLAM task over a laser log and score it: ``python -m slam.evaluate DATASET_DIR``.

The log is fed through :class:`slam.task.SlamTask` as ``scan`` samples, exactly as the runtime
feeds it, as fast as the CPU allows. Accuracy is the Freiburg relation metric (Kümmerle et
al. 2009) on the final trajectory, with a 95 % bootstrap interval over the relations; speed is
``realtime_factor`` = process CPU seconds of the task / log duration (< 1 means it keeps up
with the sensor on one core).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctxtask.datasets.laser import (
    LaserDataset,
    load_laser_dataset,
    relation_errors,
    scan_sample,
)
from ctxtask.stats import bootstrap_ci
from slam.mapper import SlamConfig
from slam.task import SlamTask


@dataclass(frozen=True)
class Evaluation:
    poses: np.ndarray  # (N, 3) final pose of every processed scan
    summary: dict[str, Any]  # the task's terminate() summary
    metrics: dict[str, Any]  # the --json line


def evaluate(
    dataset: LaserDataset,
    max_scans: int | None = None,
    map_out: Path | None = None,
    slam_overrides: dict[str, Any] | None = None,
) -> Evaluation:
    n = len(dataset.stamps) if max_scans is None else min(max_scans, len(dataset.stamps))
    task = SlamTask()
    config: dict[str, Any] = {"slam": slam_overrides or {}}
    if map_out is not None:
        config["map_out"] = str(map_out)
    task.setup(config)
    task.initialise()
    samples = (scan_sample(dataset, k) for k in range(n))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    worst_update_s = 0.0
    for sample in samples:
        t0 = time.process_time()
        task.update(sample)
        worst_update_s = max(worst_update_s, time.process_time() - t0)
    summary = task.terminate()
    cpu_s = time.process_time() - cpu0
    wall_s = time.perf_counter() - wall0
    poses = task.slam.trajectory()
    task.shutdown()

    stamps = dataset.stamps[:n]
    duration = float(stamps[-1] - stamps[0]) if n > 1 else 0.0
    accuracy = _accuracy(dataset, stamps, poses)
    metrics = {
        **accuracy,
        "realtime_factor": cpu_s / duration if duration > 0 else None,
        "scans": n,
        "cpu_s": round(cpu_s, 3),
        "wall_s": round(wall_s, 3),
        "worst_update_cpu_s": round(worst_update_s, 4),
        "loop_closures": summary["loop_closures"],
        "rejected_closures": summary["rejected_closures"],
        "still_scans": summary["still_scans"],
    }
    return Evaluation(poses, summary, metrics)


#: Relation spans the error is broken down by, s: under 30 s the front end alone decides the
#: error (is it better than the robot's odometry?), over 300 s the loop closures do.
SPAN_EDGES_S = (0.0, 3.0, 30.0, 100.0, 300.0)


def _accuracy(dataset: LaserDataset, stamps: np.ndarray, poses: np.ndarray) -> dict[str, Any]:
    """Mean Freiburg errors over the relations inside the scans, with 95 % bootstrap intervals,
    and the same by relation span beside the raw odometry's."""
    none: dict[str, Any] = {
        "trans_error_m": None,
        "rot_error_deg": None,
        "trans_error_ci95_m": None,
        "rot_error_ci95_deg": None,
        "relations": 0,
        "by_span": [],
    }
    if dataset.relations is None or len(stamps) < 2:
        return none
    rel = dataset.relations
    inside = (rel[:, :2] >= stamps[0]).all(axis=1) & (rel[:, :2] <= stamps[-1]).all(axis=1)
    if not inside.any():
        return none
    rel = rel[inside]
    trans, rot = relation_errors(stamps, poses, rel)
    odometry = relation_errors(stamps, dataset.odom_at_scans[: len(stamps)], rel)
    index = list(range(len(trans)))
    return {
        "trans_error_m": float(trans.mean()),
        "rot_error_deg": float(rot.mean()),
        "trans_error_ci95_m": list(bootstrap_ci(index, lambda pick: trans[pick].mean())),
        "rot_error_ci95_deg": list(bootstrap_ci(index, lambda pick: rot[pick].mean())),
        "relations": len(trans),
        "by_span": _by_span(rel, (trans, rot), odometry),
    }


def _by_span(
    relations: np.ndarray,
    errors: tuple[np.ndarray, np.ndarray],
    odometry_errors: tuple[np.ndarray, np.ndarray],
) -> list[dict[str, Any]]:
    """Per span bin that holds relations: their mean errors, their share of the overall mean
    translation error, and the raw odometry's mean errors on the same relations (None for a log
    without odometry)."""
    trans, rot = errors
    odo_trans, odo_rot = odometry_errors
    bins = np.digitize(np.abs(relations[:, 1] - relations[:, 0]), SPAN_EDGES_S[1:])
    rows = []
    for b, low in enumerate(SPAN_EDGES_S):
        pick = bins == b
        if not pick.any():
            continue
        has_odometry = bool(np.isfinite(odo_trans[pick]).all())
        rows.append(
            {
                "span_s": [low, SPAN_EDGES_S[b + 1] if b + 1 < len(SPAN_EDGES_S) else None],
                "relations": int(pick.sum()),
                "trans_error_m": float(trans[pick].mean()),
                "rot_error_deg": float(rot[pick].mean()),
                "share_of_mean_m": float(trans[pick].sum() / len(trans)),
                "odometry_trans_error_m": float(odo_trans[pick].mean()) if has_odometry else None,
                "odometry_rot_error_deg": float(odo_rot[pick].mean()) if has_odometry else None,
            }
        )
    return rows


def _setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of one `SlamConfig` field, the value a number like the field's default."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. odom_noise_scale=1.8")
    if key not in SlamConfig.__dataclass_fields__:
        near = difflib.get_close_matches(key, SlamConfig.__dataclass_fields__, n=3)
        hint = f"did you mean {' or '.join(near)}?" if near else "see SlamConfig in slam/mapper.py"
        raise argparse.ArgumentTypeError(f"{text!r}: {key!r} is not a slam setting; {hint}")
    default = SlamConfig.__dataclass_fields__[key].default
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, bool) or not isinstance(parsed, type(default) | int):
        kind = "a whole number" if isinstance(default, int) else "a number"
        raise argparse.ArgumentTypeError(f"{text!r}: {key} takes {kind}, e.g. {key}={default}")
    return key, parsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slam.evaluate", description=__doc__)
    parser.add_argument("dataset", type=Path, help="folder with *_laser.txt.gz, *_odom.txt, …")
    parser.add_argument("--json", action="store_true", help="end with one JSON metrics line")
    parser.add_argument("--map-out", type=Path, help="write map.png + map.yaml here")
    parser.add_argument("--max-scans", type=int, help="only the first N scans")
    parser.add_argument(
        "--set",
        dest="settings",
        type=_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run with one slam setting changed (slam/mapper.py, SlamConfig), e.g. "
        "--set odom_noise_scale=1.8; repeatable. The task's one configuration is the default",
    )
    args = parser.parse_args(argv)
    if args.max_scans is not None and args.max_scans < 2:
        parser.error("--max-scans must be at least 2")
    try:
        dataset = load_laser_dataset(args.dataset)
    except (ValueError, OSError) as exc:
        print(f"slam.evaluate: {exc}", file=sys.stderr)
        return 2

    result = evaluate(dataset, args.max_scans, args.map_out, dict(args.settings))
    m = result.metrics
    print(f"dataset          {dataset.name} ({args.dataset})")
    print(f"scans            {m['scans']} ({result.summary['keyframes']} keyframes)")
    print(
        f"loop closures    {m['loop_closures']} accepted, {m['rejected_closures']} rejected by "
        f"the graph, of {result.summary['loop_attempts']} attempts"
    )
    if m["trans_error_m"] is None:
        print("accuracy         n/a (no relations file or no relation inside the scans)")
    else:
        t_lo, t_hi = m["trans_error_ci95_m"]
        r_lo, r_hi = m["rot_error_ci95_deg"]
        print(
            f"accuracy         {m['trans_error_m']:.4f} m [95% CI {t_lo:.4f}, {t_hi:.4f}], "
            f"{m['rot_error_deg']:.3f} deg [{r_lo:.3f}, {r_hi:.3f}] "
            f"mean error over {m['relations']} relations"
        )
        print(
            f"  {'by span':<16} {'relations':>9}  {'error':<20}  {'of the mean':<11}  raw odometry"
        )
        for row in m["by_span"]:
            low, high = row["span_s"]
            span = f"{low:g}-{high:g} s" if high is not None else f">= {low:g} s"
            error = f"{row['trans_error_m']:.4f} m, {row['rot_error_deg']:.3f} deg"
            odometry = (
                f"{row['odometry_trans_error_m']:.4f} m, {row['odometry_rot_error_deg']:.3f} deg"
                if row["odometry_trans_error_m"] is not None
                else "n/a"
            )
            share = f"{row['share_of_mean_m']:.4f} m"
            print(f"  {span:<16} {row['relations']:>9}  {error:<20}  {share:<11}  {odometry}")
    rtf = m["realtime_factor"]
    print(
        f"speed            {m['cpu_s']:.1f} s CPU, {m['wall_s']:.1f} s wall, realtime factor "
        + (f"{rtf:.4f}" if rtf is not None else "n/a")
        + f", worst update {m['worst_update_cpu_s'] * 1000:.0f} ms CPU"
    )
    if result.summary["map"]:
        print(f"map              {result.summary['map']}")
    if args.json:
        print(json.dumps(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
