"""Stop-sign detection in camera frames: two candidate sources, two kinds of evidence.

1. **Haar cascade** (``cascades/stopsign_classifier.xml``, 24×24 window) over the grey frame.
2. **Red regions**: HSV thresholds at a few strictness levels (dark, dusk-lit and sunlit
   signs need different saturation/value floors; a loose level can glue a sign to a red
   neighbour, a strict one separates them), each as an *opened* mask (cuts 1-px bridges to
   red clutter) and a *healed* one (closed first: on a small sign the white letters would
   split the face in two). Every red region that is roughly square and at least
   ``min_sign_px`` wide is a candidate, also one inside a hole of a larger red region (a
   sign before a red wall), and one cut by the frame edge or partly hidden.
3. **Verification**: each candidate's square crop (GTSRB's ~10 % margin; the part outside
   the frame is filled by replicating the edge) goes through the 43-class GTSRB classifier,
   and P(Stop) must reach ``min_score``. The classifier alone is not enough for red
   regions: it never saw background in training and calls almost any red patch "Stop" (a
   dome, a red lamp, the ring of a speed-limit sign). So a red region must also be a sign
   by a second, independent test: an **octagon with a light legend** (solid, ≥ 7 vertices,
   letters brighter than the face), or the **cascade confirms it** when run on the region
   alone, magnified so the region fills ``CONFIRM_SIDE`` px. The second test finds what the
   first misses: signs too small, partly hidden or cut by the frame edge to keep their
   octagon, and those the whole-frame cascade misses because they are smaller than its
   window or tilted.

Overlapping accepted candidates are merged by non-maximum suppression. Cost on a 640×480
frame is ~25 ms of one x86 core, ~11 ms of it the whole-frame cascade. docs/signs.md says
which failures each part fixes and how the thresholds were cross-validated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from signs.classifier import STOP_CLASS_ID, SignClassifier, require_file

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in frame pixels

CASCADE_WINDOW = 24  # px, the cascade's training window (see cascades/MANIFEST.md)
CROP_MARGIN = 0.1  # GTSRB crops keep ~10 % of the sign size around it on each side
# OpenCV hue is 0..179; red wraps around 0. The upper bound reaches into orange because
# stop signs under sodium or low sun light turn orange (hue 10-16 seen on real photos).
RED_HUE_LOW_MAX = 15
RED_HUE_HIGH_MIN = 170
# (min saturation, min value) per mask: loose for dark/dusk signs, strict to split a sign
# from an adjacent red object the loose mask glues it to.
RED_LEVELS: tuple[tuple[int, int], ...] = ((70, 30), (100, 60), (150, 80))
# The red face spans ~0.93 of a stop sign's width (median over the street photos: white rim,
# and the mask's lost edge pixels), so the GTSRB margin around the sign is a wider one
# around the face. A sign of min_sign_px leaves a red region at least RED_FACE_FRACTION of it.
FACE_OF_SIGN = 0.93
FACE_CROP_MARGIN = ((1 + 2 * CROP_MARGIN) / FACE_OF_SIGN - 1) / 2
RED_FACE_FRACTION = 0.8
# Closing fills gaps up to this many px: the letters of a small sign.
HEAL_KERNEL = 5
# The confirming cascade sees the region at this side (px), inside a window of twice that.
CONFIRM_SIDE = 48
# Below this side (px) a red region has too few pixels for its outline and legend to be
# told from those of a lamp's glow: the cascade must confirm it instead.
MIN_OCTAGON_PX = 32
# A region whose sides differ by more than this factor may be a partly hidden sign...
SQUARE_TOLERANCE = 1.2
# ... up to this factor (60 % of the sign hidden or outside the frame).
MAX_PARTIAL_ASPECT = 2.5
# Cascade windows closer than this (relative size) are one detection, as in detectMultiScale.
GROUP_EPS = 0.2
# Two boxes from the red masks are one candidate above this IoU (saves classifier runs).
DUPLICATE_IOU = 0.85


@dataclass(frozen=True)
class DetectorParams:
    """Tunable parameters. The decision thresholds (`DECISION_FIELDS`) were chosen by
    cross-validation (``python -m signs.crossval``); the rest follow from the sign's
    geometry and the cost budget."""

    min_sign_px: int = 24  # smallest sign side (frame px) the red regions cover
    cascade_min_sign_px: int = 40  # ... and the whole-frame cascade (its cost grows fast)
    min_score: float = 0.7  # P(Stop) needed to report a detection
    cascade_scale_factor: float = 1.1  # pyramid step of the cascade
    cascade_min_neighbors: int = 3  # whole-frame cascade: windows needed beyond the first
    confirm_min_neighbors: int = 2  # confirming cascade: the same, on one red region
    min_solidity: float = 0.85  # contour area / convex hull area (octagon: ~0.97-1)
    min_vertices: int = 7  # vertices of the hull's polygon approximation (octagon: 8)
    poly_epsilon: float = 0.03  # approxPolyDP tolerance, fraction of the hull perimeter
    min_legend_contrast: float = 1.2  # legend/face brightness: a light legend on red
    max_aspect: float = 1.6  # width/height (and height/width) limit of a red region
    nms_iou: float = 0.3  # IoU above which two detections are the same sign
    nms_cover: float = 0.5  # ... or intersection over the smaller box above this

    def __post_init__(self) -> None:
        for name in ("min_sign_px", "cascade_min_sign_px"):
            if getattr(self, name) < 8:
                raise ValueError(f"{name} must be >= 8, got {getattr(self, name)}")
        if not 0.0 < self.min_score <= 1.0:
            raise ValueError(f"min_score must be in (0, 1], got {self.min_score}")
        if self.max_aspect < 1.0:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")
        if self.cascade_min_neighbors < 1 or self.confirm_min_neighbors < 1:
            raise ValueError("cascade_min_neighbors and confirm_min_neighbors must be >= 1")


#: The parameters `decide` applies to gathered evidence: cross-validation tunes these.
DECISION_FIELDS = (
    "min_score",
    "cascade_min_neighbors",
    "confirm_min_neighbors",
    "min_legend_contrast",
)


@dataclass(frozen=True)
class Detection:
    box: Box
    class_id: int
    name: str
    score: float
    source: str  # "cascade", "octagon" or "confirmed": which evidence accepted it

    def as_dict(self) -> dict[str, object]:
        return {
            "box": list(self.box),
            "class_id": self.class_id,
            "name": self.name,
            "score": round(self.score, 4),
            "source": self.source,
        }


@dataclass(frozen=True)
class Candidate:
    """One candidate sign and the evidence gathered on it; `decide` judges it."""

    box: Box
    source: str  # "cascade" (whole-frame cascade window) or "red" (red region)
    score: float  # P(Stop) from the classifier
    # Cascade windows behind it: for "cascade" the windows merged into this box, for "red"
    # those of the confirming cascade centred on the region (0: not looked at).
    neighbours: int
    legend: float  # "red" with an octagon outline: legend/face brightness, else 0


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


def square_crop(frame: np.ndarray, box: Box, margin: float = CROP_MARGIN) -> np.ndarray:
    """The square around a box with `margin` (fraction of its side) on each side.

    Where the square leaves the frame, the frame's edge is replicated: a sign cut by the
    frame edge then keeps its place and size in the crop, as the classifier expects,
    instead of being squeezed into a square.
    """
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    a, b = round(cx - side / 2), round(cy - side / 2)
    c, d = round(cx + side / 2), round(cy + side / 2)
    h, w = frame.shape[:2]
    inside = frame[max(0, b) : min(h, d), max(0, a) : min(w, c)]
    top, bottom, left, right = max(0, -b), max(0, d - h), max(0, -a), max(0, c - w)
    if top or bottom or left or right:
        return cv2.copyMakeBorder(inside, top, bottom, left, right, cv2.BORDER_REPLICATE)
    return inside


def _legend_contrast(grey: np.ndarray, red_mask: np.ndarray, hull: np.ndarray, rect: Box) -> float:
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


def _completed_squares(box: Box) -> list[Box]:
    """The two squares a clearly non-square box would complete along its shorter side."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    if w > SQUARE_TOLERANCE * h:
        return [(x1, y2 - w, x2, y2), (x1, y1, x2, y1 + w)]
    if h > SQUARE_TOLERANCE * w:
        return [(x2 - h, y1, x2, y2), (x1, y1, x1 + h, y2)]
    return []


def _outer_contours(mask: np.ndarray) -> list[np.ndarray]:
    """The outer boundary of every connected region, also of those inside another's hole.

    A stop sign's white rim cuts its face off from red behind it (a brick wall, a car), so
    the face lies in a hole of the red background region, where ``RETR_EXTERNAL`` would
    not see it.
    """
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    return [c for c, (_, _, _, parent) in zip(contours, hierarchy[0], strict=True) if parent < 0]


def _add_region(regions: list[tuple[Box, float]], box: Box, legend: float) -> None:
    """Add a red region unless a near-duplicate is there; keep the better legend contrast."""
    same = next((i for i, (b, _) in enumerate(regions) if iou(b, box) > DUPLICATE_IOU), None)
    if same is None:
        regions.append((box, legend))
    elif legend > regions[same][1]:
        regions[same] = (regions[same][0], legend)


def _red_masks(hsv: np.ndarray) -> list[np.ndarray]:
    """Per strictness level, the opened mask and the closed-then-opened ("healed") one."""
    kernel = np.ones((3, 3), np.uint8)
    heal = np.ones((HEAL_KERNEL, HEAL_KERNEL), np.uint8)
    masks = []
    for s_min, v_min in RED_LEVELS:
        mask = cv2.inRange(hsv, (0, s_min, v_min), (RED_HUE_LOW_MAX, 255, 255))
        mask |= cv2.inRange(hsv, (RED_HUE_HIGH_MIN, s_min, v_min), (179, 255, 255))
        opened = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
        healed = cv2.morphologyEx(
            cv2.morphologyEx(mask, cv2.MORPH_CLOSE, heal), cv2.MORPH_OPEN, kernel
        )
        masks += [opened, healed]
    return masks


def _grouped(windows: list[Box], scale: float = 1.0) -> list[tuple[Box, int]]:
    """Overlapping cascade windows merged (as detectMultiScale does), with their count.

    Keeping the count lets `decide` apply any ``min_neighbors`` to windows found once.
    """
    if len(windows) < 2:
        return []
    boxes, counts = cv2.groupRectangles([list(w) for w in windows], 1, GROUP_EPS)
    return [
        (
            (round(x / scale), round(y / scale), round((x + w) / scale), round((y + h) / scale)),
            int(n),
        )
        for (x, y, w, h), n in zip(
            np.asarray(boxes).reshape(-1, 4).tolist(), np.ravel(counts).tolist(), strict=True
        )
    ]


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

    def _windows(self, grey: np.ndarray, **sizes: tuple[int, int]) -> list[Box]:
        """Every window the cascade accepts in `grey`, as (x, y, w, h), before grouping."""
        hits = self.cascade.detectMultiScale(
            grey, scaleFactor=self.params.cascade_scale_factor, minNeighbors=0, **sizes
        )
        return [tuple(h) for h in np.asarray(hits).reshape(-1, 4).tolist()]

    def cascade_windows(self, frame: np.ndarray) -> list[tuple[Box, int]]:
        """Whole-frame cascade detections (frame pixels) with their window counts."""
        scale = min(1.0, CASCADE_WINDOW / self.params.cascade_min_sign_px)
        grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        if scale < 1.0:
            grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        return _grouped(self._windows(grey, minSize=(CASCADE_WINDOW, CASCADE_WINDOW)), scale)

    def _octagon_legend(self, contour: np.ndarray, mask: np.ndarray, grey: np.ndarray) -> float:
        """Legend contrast of a solid, octagon-like red outline; 0 for any other shape."""
        p = self.params
        x, y, w, h = cv2.boundingRect(contour)
        if min(w, h) < MIN_OCTAGON_PX:
            return 0.0
        hull = cv2.convexHull(contour)
        hull_area = cv2.contourArea(hull)
        if hull_area <= 0 or cv2.contourArea(contour) / hull_area < p.min_solidity:
            return 0.0
        outline = cv2.approxPolyDP(hull, p.poly_epsilon * cv2.arcLength(hull, True), True)
        if len(outline) < p.min_vertices:
            return 0.0
        return _legend_contrast(grey, mask, hull, (x, y, w, h))

    def red_regions(self, frame: np.ndarray) -> list[tuple[Box, float]]:
        """Roughly square red regions, each with its octagon legend contrast (0: none).

        A region clearly wider than tall (or taller than wide, up to ``MAX_PARTIAL_ASPECT``)
        may be a sign partly hidden or cut by the frame edge; the squares it would complete,
        on either side, are candidates too (without an octagon: only the cascade can
        confirm those).
        Near-duplicates (the same face in several masks) are kept once, with the best
        legend contrast among them.
        """
        p = self.params
        hsv = cv2.cvtColor(frame, cv2.COLOR_BGR2HSV)
        grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        min_side = RED_FACE_FRACTION * p.min_sign_px
        regions: list[tuple[Box, float]] = []
        for mask in _red_masks(hsv):
            for contour in _outer_contours(mask):
                x, y, w, h = cv2.boundingRect(contour)
                aspect = max(w / h, h / w)
                if max(w, h) < min_side or aspect > MAX_PARTIAL_ASPECT:
                    continue
                box = (x, y, x + w, y + h)
                if aspect <= p.max_aspect:
                    _add_region(regions, box, self._octagon_legend(contour, mask, grey))
                for square in _completed_squares(box):
                    _add_region(regions, square, 0.0)
        return regions

    def confirming_windows(self, frame: np.ndarray, box: Box) -> int:
        """How many cascade windows find a sign centred on `box`, looking at it alone.

        The region is magnified (or shrunk) so that it fills ``CONFIRM_SIDE`` px, which
        lets the cascade see signs smaller than its window, at a cost of a few 96×96 px
        searches instead of a finer whole-frame pyramid.
        """
        window = square_crop(frame, box, margin=0.5)
        scale = 2 * CONFIRM_SIDE / window.shape[0]
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        grey = cv2.cvtColor(
            cv2.resize(window, None, fx=scale, fy=scale, interpolation=interp), cv2.COLOR_BGR2GRAY
        )
        windows = self._windows(
            grey,
            minSize=(round(0.6 * CONFIRM_SIDE),) * 2,
            maxSize=(round(1.6 * CONFIRM_SIDE),) * 2,
        )
        centre, tolerance = grey.shape[1] / 2, 0.35 * CONFIRM_SIDE
        return max(
            (
                n
                for (x1, y1, x2, y2), n in _grouped(windows)
                if abs((x1 + x2) / 2 - centre) < tolerance
                and abs((y1 + y2) / 2 - centre) < tolerance
            ),
            default=0,
        )

    def candidates(
        self, frame: np.ndarray, permissive: DetectorParams | None = None
    ) -> list[Candidate]:
        """Every candidate with the evidence that `decide` could need under `permissive`.

        `permissive` (default: this detector's parameters) sets how far to look: a
        cascade window group too small, or a red region scored too low, to pass under it
        is not scored or confirmed. Cross-validation passes the loosest of its grid.
        """
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"expected a uint8 HxWx3 BGR frame, got {frame.dtype} {frame.shape}")
        loose = permissive or self.params
        cascade = [
            (b, n) for b, n in self.cascade_windows(frame) if n > loose.cascade_min_neighbors
        ]
        regions = self.red_regions(frame)
        if not cascade and not regions:
            return []
        crops = [square_crop(frame, b) for b, _ in cascade]
        crops += [square_crop(frame, b, FACE_CROP_MARGIN) for b, _ in regions]
        scores = self.classifier.stop_scores(crops).tolist()
        found = [
            Candidate(box, "cascade", score, n, 0.0)
            for (box, n), score in zip(cascade, scores[: len(cascade)], strict=True)
        ]
        for (box, legend), score in zip(regions, scores[len(cascade) :], strict=True):
            # The cascade is asked only where its answer could change the verdict.
            ask = score >= loose.min_score and legend < loose.min_legend_contrast
            n = self.confirming_windows(frame, box) if ask else 0
            found.append(Candidate(box, "red", score, n, legend))
        return found

    def decide(
        self, candidates: list[Candidate], params: DetectorParams | None = None
    ) -> list[Detection]:
        """The stop signs among `candidates` under `params` (default: the detector's).

        Best first; overlapping detections of one sign are merged.
        """
        p = params or self.params
        accepted = []
        for c in candidates:
            if c.score < p.min_score:
                continue
            if c.source == "cascade":
                source = "cascade" if c.neighbours > p.cascade_min_neighbors else None
            elif c.legend >= p.min_legend_contrast:
                source = "octagon"
            else:
                # The classifier's word is not enough for a plain red region (see above).
                source = "confirmed" if c.neighbours > p.confirm_min_neighbors else None
            if source is not None:
                accepted.append((c.score, c.box, source))
        accepted.sort(reverse=True)
        # Compare with every more confident candidate, not only the kept ones: the sources
        # box one sign differently (cascade window vs red face), and a stray window on a
        # sign's corner may overlap the wider box of its sign although not the kept one.
        return [
            Detection(box, STOP_CLASS_ID, self.stop_name, score, source)
            for i, (score, box, source) in enumerate(accepted)
            if not any(_same_sign(box, better, p) for _, better, _ in accepted[:i])
        ]

    def detect(self, frame: np.ndarray) -> list[Detection]:
        """Stop signs in one uint8 BGR frame, best first."""
        return self.decide(self.candidates(frame))


def _same_sign(a: Box, b: Box, p: DetectorParams) -> bool:
    """Two boxes are one sign if they overlap much, or one mostly covers the other.

    The second test catches cascade windows on a corner of a sign (IoU ~0.2, but half of
    the window lies on the sign the classifier already confirmed).
    """
    return iou(a, b) >= p.nms_iou or overlap_of_smaller(a, b) >= p.nms_cover
