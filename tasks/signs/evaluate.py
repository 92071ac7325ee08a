"""Measure the road-sign task on a dataset folder.

    python -m signs.evaluate DATASET_DIR [--json] [--models DIR]

DATASET_DIR is a detection folder (``images/`` + ``annotations/``: image-level Stop
precision/recall), a classification folder (``Images/`` + ``GT-*.csv``: top-1 accuracy over
the 43 GTSRB classes), or a parent holding folders of either kind (both are measured).
Street photos are replayed exactly as the runtime does (`camera_frame`: letterboxed into a
640×480 BGR frame), so ``ms_per_frame`` is the task's real per-frame cost: CPU time of one
thread (``time.process_time``), which unlike wall time does not depend on what else the
machine is running. Each figure comes with its 95 % confidence interval (``*_ci95``, a
percentile bootstrap over the photos or crops, `ctxtask.stats.bootstrap_ci`): on 40 photos
one photo moves precision or recall by several points. With ``--json`` the last stdout line
is one JSON object.

Exit status: 0 after measuring (whatever the numbers), 2 when the folder, its data or the
models are unusable.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ctxtask.datasets import signs as ds
from ctxtask.stats import bootstrap_ci
from signs.classifier import STOP_CLASS_ID, ModelFileError, SignClassifier
from signs.detector import StopSignDetector, iou
from signs.task import CASCADE_SUBPATH, build_classifier, default_models_dir

BOX_IOU = 0.5  # PASCAL-VOC's match threshold for the (informational) box-level counts
CLASSIFY_BATCH = 64


@dataclass(frozen=True)
class Layout:
    detection: list[Path]
    classification: list[Path]


def find_layout(root: Path) -> Layout:
    """Which dataset folders `root` is or holds (one level down)."""
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    candidates = [root] if ds.is_detection_dir(root) or ds.is_classification_dir(root) else []
    if not candidates:
        candidates = sorted(p for p in root.iterdir() if p.is_dir())
    layout = Layout(
        detection=[p for p in candidates if ds.is_detection_dir(p)],
        classification=[p for p in candidates if ds.is_classification_dir(p)],
    )
    if not layout.detection and not layout.classification:
        raise ValueError(
            f"{root}: no dataset found. Expected images/ + annotations/ (street photos with "
            f"PASCAL-VOC boxes), Images/ + GT-*.csv (GTSRB crops), or a folder holding such "
            f"folders"
        )
    return layout


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


@dataclass(frozen=True)
class Outcome:
    """One photo at image level: does it show a Stop sign, did the detector report one."""

    has_stop: bool
    found: bool


def precision(outcomes: Sequence[Outcome]) -> float:
    """Image-level Stop precision; NaN when nothing was reported."""
    reported = [o for o in outcomes if o.found]
    return sum(o.has_stop for o in reported) / len(reported) if reported else math.nan


def recall(outcomes: Sequence[Outcome]) -> float:
    """Image-level Stop recall; NaN when no photo shows a Stop sign."""
    stops = [o for o in outcomes if o.has_stop]
    return sum(o.found for o in stops) / len(stops) if stops else math.nan


def ci95(items: Sequence[Any], statistic: Any) -> list[float | None]:
    """The bootstrap 95 % interval of `statistic` over `items`, JSON-ready (NaN → None)."""
    return [None if math.isnan(v) else round(v, 4) for v in bootstrap_ci(items, statistic)]


def detection_figures(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Precision and recall with their intervals, and the counts behind them."""
    tp = sum(o.has_stop and o.found for o in outcomes)
    fp = sum(o.found and not o.has_stop for o in outcomes)
    fn = sum(o.has_stop and not o.found for o in outcomes)
    return {
        "stop_precision": _ratio(tp, tp + fp),
        "stop_precision_ci95": ci95(outcomes, precision),
        "stop_recall": _ratio(tp, tp + fn),
        "stop_recall_ci95": ci95(outcomes, recall),
        "stop_tp": tp,
        "stop_fp": fp,
        "stop_fn": fn,
    }


def evaluate_detection(detector: StopSignDetector, folders: list[Path]) -> dict[str, Any]:
    """Image-level Stop precision/recall and per-frame cost over every annotated photo."""
    items = [item for folder in folders for item in ds.load_detection_set(folder)]
    # The first call allocates OpenCV's buffers; keep that one-off cost out of the timing.
    detector.detect(np.zeros((ds.FRAME_SIZE[1], ds.FRAME_SIZE[0], 3), np.uint8))
    box_tp = box_fp = box_fn = 0
    outcomes: list[Outcome] = []
    cpu_ms: list[float] = []
    wall_s = 0.0
    missed, false_alarms = [], []
    for item in items:
        image = ds.read_image(item.image_path)
        if image.shape[:2] != (item.height, item.width):
            raise ValueError(
                f"{item.annotation_path}: says {item.width}x{item.height}, but "
                f"{item.image_path} is {image.shape[1]}x{image.shape[0]}"
            )
        frame, placement = ds.letterbox(image)
        truth = [placement.to_frame((b.x1, b.y1, b.x2, b.y2)) for b in item.boxes_of("stop")]
        t_cpu, t_wall = time.process_time(), time.perf_counter()
        detections = detector.detect(frame)
        cpu_ms.append(1000 * (time.process_time() - t_cpu))
        wall_s += time.perf_counter() - t_wall
        outcome = Outcome(bool(truth), any(d.class_id == STOP_CLASS_ID for d in detections))
        outcomes.append(outcome)
        if outcome.has_stop and not outcome.found:
            missed.append(item.image_path.name)
        elif outcome.found and not outcome.has_stop:
            false_alarms.append(item.image_path.name)
        unmatched = list(truth)
        for d in detections:
            match = next((t for t in unmatched if iou(d.box, t) >= BOX_IOU), None)
            if match is None:
                box_fp += 1
            else:
                unmatched.remove(match)
                box_tp += 1
        box_fn += len(unmatched)
    n = len(items)
    return {
        "images": n,
        "stop_images": sum(o.has_stop for o in outcomes),
        **detection_figures(outcomes),
        "box_tp": box_tp,
        "box_fp": box_fp,
        "box_fn": box_fn,
        "ms_per_frame": float(np.mean(cpu_ms)),
        "ms_per_frame_ci95": ci95(cpu_ms, np.mean),
        "wall_ms_per_frame": 1000 * wall_s / n,
        "missed": missed,
        "false_alarms": false_alarms,
    }


def evaluate_classification(classifier: SignClassifier, folders: list[Path]) -> dict[str, Any]:
    """Top-1 accuracy over the GTSRB classes, and how many Stop crops were called Stop."""
    crops = [crop for folder in folders for crop in ds.load_classification_set(folder)]
    truth = np.array([c.class_id for c in crops])
    predicted = np.empty(len(crops), np.int64)
    cpu_s = 0.0
    for start in range(0, len(crops), CLASSIFY_BATCH):
        batch = crops[start : start + CLASSIFY_BATCH]
        images = [ds.read_image(c.image_path) for c in batch]
        t0 = time.process_time()
        predicted[start : start + len(batch)] = [p.class_id for p in classifier.classify(images)]
        cpu_s += time.process_time() - t0
    stop = truth == STOP_CLASS_ID
    correct = (predicted == truth).tolist()
    return {
        "crops": len(crops),
        "accuracy": float(np.mean(correct)),
        "accuracy_ci95": ci95(correct, np.mean),
        "correct": int(sum(correct)),
        "stop_crops": int(stop.sum()),
        "stop_crops_correct": int((predicted[stop] == STOP_CLASS_ID).sum()),
        "ms_per_crop": 1000 * cpu_s / len(crops),
    }


def _fmt(value: float | None, ci: list[float | None] | None = None) -> str:
    """A figure with its 95 % interval, e.g. ``0.950 [0.850, 1.000]``."""
    if value is None:
        return "n/a"
    if ci is None or None in ci:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def run(dataset: Path, models: Path) -> dict[str, Any]:
    """All metrics for `dataset`; raises ValueError/ModelFileError on unusable input."""
    layout = find_layout(dataset)
    classifier = build_classifier(models)
    result: dict[str, Any] = {
        "stop_precision": None,
        "stop_recall": None,
        "accuracy": None,
        "ms_per_frame": None,
        "images": None,
        "crops": None,
    }
    if layout.detection:
        detector = StopSignDetector(classifier, models / CASCADE_SUBPATH)
        det = evaluate_detection(detector, layout.detection)
        result.update(det)
        names = ", ".join(str(p) for p in layout.detection)
        print(
            f"detection ({names}): {det['images']} frames, {det['stop_images']} with a stop sign\n"
            f"  image level (95 % CI): precision "
            f"{_fmt(det['stop_precision'], det['stop_precision_ci95'])}, recall "
            f"{_fmt(det['stop_recall'], det['stop_recall_ci95'])} (TP {det['stop_tp']}, "
            f"FP {det['stop_fp']}, FN {det['stop_fn']})\n"
            f"  boxes (IoU >= {BOX_IOU}): TP {det['box_tp']}, FP {det['box_fp']}, "
            f"FN {det['box_fn']}\n"
            f"  cost: {_fmt(det['ms_per_frame'], det['ms_per_frame_ci95'])} ms CPU per "
            f"640x480 frame, one thread "
            f"(wall {det['wall_ms_per_frame']:.1f} ms)"
        )
        if det["missed"] or det["false_alarms"]:
            print(f"  missed: {det['missed']}; false alarms: {det['false_alarms']}")
    if layout.classification:
        cls = evaluate_classification(classifier, layout.classification)
        result.update(cls)
        names = ", ".join(str(p) for p in layout.classification)
        print(
            f"classification ({names}): {cls['crops']} crops, accuracy "
            f"{_fmt(cls['accuracy'], cls['accuracy_ci95'])} (95 % CI; "
            f"{cls['correct']}/{cls['crops']}); Stop {cls['stop_crops_correct']}/"
            f"{cls['stop_crops']}; {cls['ms_per_crop']:.2f} ms CPU per crop"
        )
    return result


def models_for(dataset: Path) -> Path:
    """Default models folder: ``$CTXROBOT_DATA/signs``, else DATASET_DIR if it holds them.

    The fallback covers ``ctxrobot eval`` mounting the signs folder itself (data and models
    side by side, as in the shared data) at ``/data``.
    """
    default = default_models_dir()
    if (
        not (default / CASCADE_SUBPATH.parent).is_dir()
        and (dataset / CASCADE_SUBPATH.parent).is_dir()
    ):
        return dataset
    return default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m signs.evaluate", description=__doc__)
    parser.add_argument("dataset", type=Path, help="dataset folder (or a parent of several)")
    parser.add_argument("--json", action="store_true", help="last stdout line: JSON metrics")
    parser.add_argument(
        "--models",
        type=Path,
        default=None,
        help="folder with cascades/ and classifier-tflite/ (default: $CTXROBOT_DATA/signs, "
        "else DATASET_DIR when it holds them)",
    )
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)  # measure what the task costs: it runs on one core
    try:
        result = run(args.dataset, args.models or models_for(args.dataset))
    except (ValueError, ModelFileError) as exc:
        print(f"signs.evaluate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
