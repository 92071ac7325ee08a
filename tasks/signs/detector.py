"""Stop-sign detection in camera frames: two candidate sources, one CNN verifier.

1. **Haar cascade** (``cascades/stopsign_classifier.xml``, 24×24 window) on the grey frame.
   Alone it finds ~0.9 of stop signs, and lowering ``minNeighbors`` to raise recall also
   raises false hits.
2. **Red octagons**: HSV thresholds at a few strictness levels (dark, dusk-lit and sunlit
   signs need different saturation/value floors; a loose level can also glue a sign to a
   red neighbour, a strict one separates them), then external contours that are solid,
   roughly square, approximate to ≥ 7 vertices and carry a legend brighter than the red
   (white letters). This finds signs the cascade misses (orange-lit, partly occluded, odd
   viewing angles), and the shape and legend tests reject red lamps and dim orange signs
   that the CNN alone would call "Stop".
3. **Verification**: every candidate crop (with GTSRB's ~10 % margin) goes through the
   43-class GTSRB classifier; P(Stop) is the detection score. Cascade hits the CNN
   rejects and red blobs that are not Stop signs disappear here.

Overlapping accepted candidates are merged by non-maximum suppression. Cost on a 640×480
frame is ~14 ms of one x86 core, dominated by the cascade; ``min_sign_px`` trades the
smallest findable sign against that cost (the cascade runs on a frame scaled so that a
sign of ``min_sign_px`` fills its 24-px window).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from signs.classifier import STOP_CLASS_ID, SignClassifier, require_file

CASCADE_WINDOW = 24  # px, the cascade's training window (see cascades/MANIFEST.md)
CROP_MARGIN = 0.1  # GTSRB crops keep ~10 % of the sign size around it on each side
# OpenCV hue is 0..179; red wraps around 0. The upper bound reaches into orange because
# stop signs under sodium or low sun light turn orange (hue 10-16 seen on real photos).
RED_HUE_LOW_MAX = 15
RED_HUE_HIGH_MIN = 170
# (min saturation, min value) per mask: loose for dark/dusk signs, strict to split a sign
# from an adjacent red object the loose mask glues it to.
RED_LEVELS: tuple[tuple[int, int], ...] = ((70, 30), (100, 60), (150, 80))
# The red face of a stop sign is ~0.85 of its width (white rim), so a sign of min_sign_px
# leaves a red blob at least this fraction of it.
RED_FACE_FRACTION = 0.8


@dataclass(frozen=True)
class DetectorParams:
    """Tunable parameters; the defaults are what the evaluation numbers were measured with."""

    min_sign_px: int = 32  # smallest sign side (frame px) both candidate sources cover
    min_score: float = 0.5  # P(Stop) needed to report a detection
    cascade_scale_factor: float = 1.1  # pyramid step of detectMultiScale
    cascade_min_neighbors: int = 2  # low: the CNN removes the extra false hits
    colour_scale: float = 0.5  # the colour search runs at this fraction of the frame
    min_solidity: float = 0.85  # contour area / convex hull area (octagon: ~0.97-1)
    min_vertices: int = 7  # vertices of the hull's polygon approximation (octagon: 8)
    poly_epsilon: float = 0.03  # approxPolyDP tolerance, fraction of the hull perimeter
    min_legend_contrast: float = 1.2  # legend/face brightness: a light legend on red
    max_aspect: float = 1.5  # width/height (and height/width) limit of a candidate
    nms_iou: float = 0.3  # IoU above which two detections are the same sign
    nms_cover: float = 0.5  # ... or intersection over the smaller box above this

    def __post_init__(self) -> None:
        if self.min_sign_px < 8:
            raise ValueError(f"min_sign_px must be >= 8, got {self.min_sign_px}")
        if not 0.0 < self.min_score <= 1.0:
            raise ValueError(f"min_score must be in (0, 1], got {self.min_score}")
        if not 0.0 < self.colour_scale <= 1.0:
            raise ValueError(f"colour_scale must be in (0, 1], got {self.colour_scale}")


@dataclass(frozen=True)
class Detection:
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in frame pixels
    class_id: int
    name: str
    score: float
    source: str  # "cascade" or "colour": which candidate source found it

    def as_dict(self) -> dict[str, object]:
        return {
            "box": list(self.box),
            "class_id": self.class_id,
            "name": self.name,
            "score": round(self.score, 4),
            "source": self.source,
        }


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def overlap_of_smaller(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over the smaller box's area: 1 when one box lies inside the other."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller if smaller > 0 else 0.0


def _legend_contrast(
    grey: np.ndarray, red_mask: np.ndarray, hull: np.ndarray, rect: tuple[int, int, int, int]
) -> float:
    """Mean grey of the non-red pixels inside a red face over that of its red pixels.

    A stop sign carries a white legend on red, so its holes are brighter than its face
    (ratio 1.5-3.3 on the street photos). Red lamps, and orange-faced signs with black
    digits that turn "red" in dim light, have dark holes (ratio < 0.5) or none at all.
    """
    x, y, w, h = rect
    inside = np.zeros((h, w), np.uint8)
    cv2.drawContours(inside, [hull - np.array([x, y])], 0, 255, cv2.FILLED)
    # Drop the face's outer pixels: there the white rim of the sign would count as legend.
    inside = cv2.erode(inside, np.ones((3, 3), np.uint8)) > 0
    red = red_mask[y : y + h, x : x + w] > 0
    patch = grey[y : y + h, x : x + w]
    face, legend = patch[inside & red], patch[inside & ~red]
    if legend.size == 0 or face.size == 0:
        return 0.0
    return float(legend.mean()) / max(float(face.mean()), 1.0)


def _crop(frame: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The square crop around a sign box with the classifier's expected margin."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1 + 2 * CROP_MARGIN)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    h, w = frame.shape[:2]
    a, b = max(0, round(cx - side / 2)), max(0, round(cy - side / 2))
    c, d = min(w, round(cx + side / 2)), min(h, round(cy + side / 2))
    return frame[b:d, a:c]


class StopSignDetector:
    """Finds stop signs in BGR frames; see the module docstring for the method."""

    def __init__(
        self,
        classifier: SignClassifier,
        cascade_path: Path,
        params: DetectorParams | None = None,
    ) -> None:
        self.classifier = classifier
        self.params = params or DetectorParams()
        self.cascade = cv2.CascadeClassifier(str(require_file(cascade_path, "Haar cascade")))
        if self.cascade.empty():
            raise ValueError(f"{cascade_path}: not a valid OpenCV cascade XML")
        self.stop_name = classifier.names_by_id[STOP_CLASS_ID]

    def cascade_candidates(self, frame: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Cascade hits as sign boxes in frame pixels."""
        p = self.params
        scale = min(1.0, CASCADE_WINDOW / p.min_sign_px)
        grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        if scale < 1.0:
            grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        hits = self.cascade.detectMultiScale(
            grey,
            scaleFactor=p.cascade_scale_factor,
            minNeighbors=p.cascade_min_neighbors,
            minSize=(CASCADE_WINDOW, CASCADE_WINDOW),
        )
        return [
            (round(x / scale), round(y / scale), round((x + w) / scale), round((y + h) / scale))
            for x, y, w, h in np.asarray(hits).reshape(-1, 4).tolist()
        ]

    def colour_candidates(self, frame: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Solid, roughly square red regions with an octagon-like outline, in frame pixels."""
        p = self.params
        s = p.colour_scale
        small = (
            cv2.resize(frame, None, fx=s, fy=s, interpolation=cv2.INTER_AREA) if s < 1 else frame
        )
        hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
        grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
        min_side = RED_FACE_FRACTION * p.min_sign_px * s
        # Opening removes 1-px bridges (wires, sign posts) that join a sign to red clutter.
        kernel = np.ones((3, 3), np.uint8)
        boxes = []
        for s_min, v_min in RED_LEVELS:
            mask = cv2.inRange(hsv, (0, s_min, v_min), (RED_HUE_LOW_MAX, 255, 255))
            mask |= cv2.inRange(hsv, (RED_HUE_HIGH_MIN, s_min, v_min), (179, 255, 255))
            mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            for contour in contours:
                x, y, w, h = cv2.boundingRect(contour)
                if min(w, h) < min_side or max(w / h, h / w) > p.max_aspect:
                    continue
                hull = cv2.convexHull(contour)
                hull_area = cv2.contourArea(hull)
                if hull_area <= 0 or cv2.contourArea(contour) / hull_area < p.min_solidity:
                    continue
                outline = cv2.approxPolyDP(hull, p.poly_epsilon * cv2.arcLength(hull, True), True)
                if len(outline) < p.min_vertices:
                    continue
                if _legend_contrast(grey, mask, hull, (x, y, w, h)) < p.min_legend_contrast:
                    continue
                boxes.append((round(x / s), round(y / s), round((x + w) / s), round((y + h) / s)))
        return boxes

    def _same_sign(self, a: tuple[int, ...], b: tuple[int, ...]) -> bool:
        """Two boxes are one sign if they overlap much, or one mostly covers the other.

        The second test catches cascade windows on a corner of a sign (IoU ~0.2, but half
        of the window lies on the sign the CNN already confirmed).
        """
        p = self.params
        return iou(a, b) >= p.nms_iou or overlap_of_smaller(a, b) >= p.nms_cover

    def detect(self, frame: np.ndarray) -> list[Detection]:
        """Stop signs in one uint8 BGR frame, best first."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"expected a uint8 HxWx3 BGR frame, got {frame.dtype} {frame.shape}")
        candidates = [(b, "cascade") for b in self.cascade_candidates(frame)]
        candidates += [(b, "colour") for b in self.colour_candidates(frame)]
        if not candidates:
            return []
        scores = self.classifier.stop_scores([_crop(frame, b) for b, _ in candidates])
        accepted = sorted(
            (
                (float(score), box, source)
                for (box, source), score in zip(candidates, scores, strict=True)
                if score >= self.params.min_score
            ),
            reverse=True,
        )
        # Compare with every more confident candidate, not only the kept ones: the two
        # sources box one sign differently (cascade window vs red face), and a stray window
        # on a sign's corner may overlap the wider box of its sign although not the kept one.
        return [
            Detection(box, STOP_CLASS_ID, self.stop_name, score, source)
            for i, (score, box, source) in enumerate(accepted)
            if not any(self._same_sign(box, better) for _, better, _ in accepted[:i])
        ]
