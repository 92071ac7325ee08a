"""The road-sign task as the ctxrobot runtime sees it: frames in, stop-sign detections out."""

from __future__ import annotations

import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import cv2

from ctxtask.datasets import data_dir
from ctxtask.protocol import Sample
from ctxtask.task import Task
from signs.classifier import SignClassifier
from signs.detector import DetectorParams, StopSignDetector

MODEL_SUBPATH = Path("classifier-tflite") / "traffic_sign_model.tflite"
LABELS_SUBPATH = Path("classifier-tflite") / "labels.csv"
CASCADE_SUBPATH = Path("cascades") / "stopsign_classifier.xml"
PATH_KEYS = ("models", "model", "labels", "cascade")
#: Test-time views of the GTSRB classifier, chosen by cross-validation (``signs.tune``).
CLASSIFIER_VIEWS: tuple[str, ...] = ("plain", "inner", "equalised")


def default_models_dir() -> Path:
    """``$CTXROBOT_DATA/signs``: holds ``cascades/`` and ``classifier-tflite/``."""
    return data_dir() / "signs"


def build_classifier(
    models_dir: Path, *, model: Path | None = None, labels: Path | None = None
) -> SignClassifier:
    """The GTSRB classifier from a models folder; explicit file paths override its defaults."""
    return SignClassifier(
        model or models_dir / MODEL_SUBPATH,
        labels or models_dir / LABELS_SUBPATH,
        CLASSIFIER_VIEWS,
    )


def build_detector(
    models_dir: Path,
    *,
    model: Path | None = None,
    labels: Path | None = None,
    cascade: Path | None = None,
    params: DetectorParams | None = None,
) -> StopSignDetector:
    """The stop-sign detector from a models folder; explicit file paths override its defaults."""
    classifier = build_classifier(models_dir, model=model, labels=labels)
    return StopSignDetector(classifier, cascade or models_dir / CASCADE_SUBPATH, params)


class SignsTask(Task):
    """Detects stop signs in each `frame` sample.

    Each result is ``{"name": the frame's meta name (the replayed photo's file name, None
    from a live camera), "detections": [Detection.as_dict(), ...]}``.

    Config keys (all optional): ``models`` (folder with ``cascades/`` and
    ``classifier-tflite/``, default ``$CTXROBOT_DATA/signs``), ``model``, ``labels`` and
    ``cascade`` (single files overriding that folder), and any `DetectorParams` field
    (e.g. ``min_sign_px``, ``min_score``).
    """

    name = "signs"

    def __init__(self) -> None:
        self.detector: StopSignDetector | None = None
        self._frames = 0
        self._frames_with_stop = 0
        self._detections = 0
        self._cpu_s = 0.0

    def setup(self, config: dict[str, Any]) -> None:
        # One core per task: the scheduler shares the CPU between containers, and OpenCV's
        # own thread pool would fight it (and make per-frame cost depend on the machine).
        cv2.setNumThreads(1)
        param_names = {f.name for f in fields(DetectorParams)}
        unknown = sorted(set(config) - param_names - set(PATH_KEYS))
        if unknown:
            allowed = ", ".join([*PATH_KEYS, *sorted(param_names)])
            raise ValueError(f"signs task: unknown config key(s) {unknown}; allowed: {allowed}")
        paths = {k: Path(config[k]) for k in PATH_KEYS if config.get(k) is not None}
        models_dir = paths.pop("models", None) or default_models_dir()
        params = DetectorParams(**{k: v for k, v in config.items() if k in param_names})
        self.detector = build_detector(models_dir, params=params, **paths)

    def initialise(self) -> None:
        self._frames = self._frames_with_stop = self._detections = 0
        self._cpu_s = 0.0

    def update(self, sample: Sample) -> dict[str, Any]:
        if self.detector is None:
            raise RuntimeError("signs task: update() before setup()")
        if sample.kind != "frame":
            raise ValueError(f"signs task handles 'frame' samples, got {sample.kind!r}")
        t0 = time.process_time()
        detections = self.detector.detect(sample.array())
        self._cpu_s += time.process_time() - t0
        self._frames += 1
        self._frames_with_stop += bool(detections)
        self._detections += len(detections)
        # The frame's name (the replayed photo's file name) lets a run be scored afterwards
        # against the photo's annotation (`ctxtask.datasets.signs.score_run`).
        return {"name": sample.meta.get("name"), "detections": [d.as_dict() for d in detections]}

    def terminate(self) -> dict[str, Any]:
        return {
            "frames": self._frames,
            "frames_with_stop": self._frames_with_stop,
            "detections": self._detections,
            "cpu_ms_per_frame": round(1000 * self._cpu_s / self._frames, 2)
            if self._frames
            else None,
        }

    def shutdown(self) -> None:
        self.detector = None
