"""43-class GTSRB sign classifier: the TFLite CNN run through OpenCV's DNN module.

The model (``classifier-tflite/traffic_sign_model.tflite``) takes RGB 30×30 crops scaled to
0–1 and outputs a softmax whose index order is lexicographic in the class id ("0", "1",
"10", …); ``labels.csv`` beside it maps output index → GTSRB class id and name.

Why the dense head runs in numpy: OpenCV 4.x's TFLite importer turns FULLY_CONNECTED into
``Gemm`` layers whose bias blob is loaded but never added (checked on 4.14: the layer output
equals ``W @ x`` exactly, and the softmax then differs from the TFLite reference by up to
0.17). The convolutional trunk is exact, so OpenCV runs the trunk and we apply each Gemm's
own weights and bias, the ReLUs and the softmax ourselves. The result matches the TFLite
interpreter to ~1e-6 without shipping a second inference runtime.

Test-time views: the softmax can be averaged over a few *views* of each crop (``VIEWS``):
the crop as given, a slightly tighter crop (GTSRB margins vary between ~5 and 15 % of the
sign), and a contrast-equalised copy (a tenth of GTSRB crops are nearly black). Which views
to use was chosen by cross-validation (``python -m signs.tune``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ctxtask.datasets.signs import STOP_CLASS_ID

INPUT_SIZE = 30  # the model's square input side, px
#: The test-time views `SignClassifier` can average over; see the module docstring.
VIEWS = ("plain", "inner", "equalised")
INNER_TRIM = 1 / 32  # the tighter view drops this fraction of the crop on each side


@dataclass(frozen=True)
class Prediction:
    class_id: int
    name: str
    score: float


@dataclass(frozen=True)
class HeadStep:
    """One layer of the dense head: "gemm" (x @ weights + bias), "relu" or "softmax"."""

    op: str
    weights: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    bias: np.ndarray | float = 0.0


class ModelFileError(FileNotFoundError):
    """A model, label or cascade file is missing; the message says what to do."""


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ModelFileError(
            f"{what} not found at {path}. Point the task at it (config keys model/labels/"
            f"cascade, or --models DIR for the evaluator) or set CTXROBOT_DATA to the data "
            f"root that holds signs/cascades/ and signs/classifier-tflite/."
        )
    return path


def read_labels(path: Path) -> tuple[np.ndarray, list[str]]:
    """``output_index,gtsrb_class_id,sign_name`` → (class id per output, name per output)."""
    with require_file(path, "classifier labels (labels.csv)").open(newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        rows.sort(key=lambda r: int(r["output_index"]))
        class_ids = np.array([int(r["gtsrb_class_id"]) for r in rows], np.int64)
        names = [r["sign_name"] for r in rows]
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(
            f"{path}: expected columns output_index,gtsrb_class_id,sign_name with integer "
            f"ids ({exc})"
        ) from None
    if [int(r["output_index"]) for r in rows] != list(range(len(rows))):
        raise ValueError(f"{path}: output_index must run 0..{len(rows) - 1} without gaps")
    return class_ids, names


def view(crop: np.ndarray, name: str) -> np.ndarray:
    """One test-time view of a BGR crop (see ``VIEWS``)."""
    if name == "plain":
        return crop
    if name == "inner":
        h, w = crop.shape[:2]
        dy, dx = round(h * INNER_TRIM), round(w * INNER_TRIM)
        return crop[dy : h - dy, dx : w - dx] if h > 2 * dy and w > 2 * dx else crop
    if name == "equalised":
        lab = cv2.cvtColor(crop, cv2.COLOR_BGR2LAB)
        lab[..., 0] = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(4, 4)).apply(lab[..., 0])
        return cv2.cvtColor(lab, cv2.COLOR_LAB2BGR)
    raise ValueError(f"unknown classifier view {name!r}; known: {', '.join(VIEWS)}")


class SignClassifier:
    """Classifies BGR sign crops (a ~10 % margin around the sign, as in GTSRB).

    ``views`` are the test-time views `classify` averages over (default: the crop alone);
    `stop_scores` always looks at the crop alone.
    """

    def __init__(
        self, model_path: Path, labels_path: Path, views: tuple[str, ...] = ("plain",)
    ) -> None:
        unknown = [v for v in views if v not in VIEWS]
        if not views or unknown:
            raise ValueError(f"classifier views must be some of {VIEWS}, got {views}")
        self.views = tuple(views)
        self.class_ids, names = read_labels(labels_path)
        self.names_by_id = dict(zip(self.class_ids.tolist(), names, strict=True))
        if STOP_CLASS_ID not in self.names_by_id:
            raise ValueError(f"{labels_path}: no row for the Stop class ({STOP_CLASS_ID})")
        self.stop_column = int(np.flatnonzero(self.class_ids == STOP_CLASS_ID)[0])
        try:
            self.net = cv2.dnn.readNetFromTFLite(str(require_file(model_path, "TFLite classifier")))
        except cv2.error as exc:
            raise ValueError(f"{model_path}: OpenCV cannot load it as TFLite: {exc}") from None
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        self._trunk_output, self._head = self._split_dense_head()
        n_out = next(step.weights.shape[1] for step in reversed(self._head) if step.op == "gemm")
        if n_out != len(self.class_ids):
            raise ValueError(
                f"{model_path} has {n_out} outputs but {labels_path} lists "
                f"{len(self.class_ids)} classes"
            )

    def _split_dense_head(self) -> tuple[str, list[HeadStep]]:
        """The trunk's last layer name, and the dense head as steps to run in numpy."""
        names = self.net.getLayerNames()
        layers = [self.net.getLayer(i + 1) for i in range(len(names))]
        first_gemm = next((i for i, layer in enumerate(layers) if layer.type == "Gemm"), None)
        if first_gemm is None or first_gemm == 0:
            raise ValueError("classifier model has no dense (Gemm) head after a trunk")
        head: list[HeadStep] = []
        for layer in layers[first_gemm:]:
            if layer.type == "Gemm":
                weights = layer.blobs[0]  # (out, in)
                bias = layer.blobs[1].reshape(-1) if len(layer.blobs) > 1 else 0.0
                head.append(HeadStep("gemm", np.ascontiguousarray(weights.T), bias))
            elif layer.type in ("ReLU", "Softmax"):
                head.append(HeadStep(layer.type.lower()))
            else:
                raise ValueError(f"classifier head has an unsupported layer type {layer.type!r}")
        if head[-1].op != "softmax":
            raise ValueError("classifier model must end in a softmax")
        return names[first_gemm - 1], head

    def probabilities(
        self, crops: list[np.ndarray], views: tuple[str, ...] | None = None
    ) -> np.ndarray:
        """Softmax for each BGR crop, averaged over `views` (default: the classifier's).

        Shape (len(crops), 43).
        """
        views = views or self.views
        if len(views) > 1:
            return np.mean([self.probabilities(crops, (v,)) for v in views], axis=0)
        if not crops:
            return np.zeros((0, len(self.class_ids)), np.float32)
        small = [
            cv2.resize(view(c, views[0]), (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA)
            for c in crops
        ]
        blob = cv2.dnn.blobFromImages(small, 1.0 / 255.0, swapRB=True)
        self.net.setInput(blob)
        x = self.net.forward(self._trunk_output).reshape(len(crops), -1)
        for step in self._head:
            if step.op == "gemm":
                x = x @ step.weights + step.bias
            elif step.op == "relu":
                np.maximum(x, 0, out=x)
            else:
                x = np.exp(x - x.max(axis=1, keepdims=True))
                x /= x.sum(axis=1, keepdims=True)
        return x

    def classify(self, crops: list[np.ndarray]) -> list[Prediction]:
        """Top-1 class of each crop."""
        probs = self.probabilities(crops)
        best = probs.argmax(axis=1)
        return [
            Prediction(
                int(self.class_ids[i]), self.names_by_id[int(self.class_ids[i])], float(p[i])
            )
            for i, p in zip(best, probs, strict=True)
        ]

    def stop_scores(self, crops: list[np.ndarray]) -> np.ndarray:
        """P(Stop) for each crop as given: the detector's candidates take no test-time views
        (on the street photos' harder variants they found nothing more, at 2-3x the cost)."""
        return self.probabilities(crops, ("plain",))[:, self.stop_column]
