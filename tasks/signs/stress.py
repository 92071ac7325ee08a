"""Harder variants of annotated street photos: the conditions the detector fails in.

Unseen photos of the same source fail the detector where the development photos do not:
signs that are far away, cut by the frame edge, partly hidden, or seen in dim or coloured
light, and red things that are not stop signs. These variants make those conditions out of
the photos at hand, so that tuning and testing see them; every variant is built from the
photos given (a tuning half never borrows from the other half) and is deterministic.

Each `Variant` is a 640×480 camera frame with its Stop boxes in frame pixels (none for a
negative). `stop_variants` turns each Stop photo into:

- ``far``: the sign shrunk to 24, 32 or 48 px, with its surroundings, on a negative photo;
- ``edge``: the sign cut by 30 % by each frame edge in turn;
- ``zoom``: the sign 90 % of the frame height, centred, then cut at the top;
- ``hidden``: a dark bar over a quarter of the sign (left, top, diagonal);
- ``dim``, ``orange``, ``blur``: dusk, sodium light, an out-of-focus camera.

`negative_variants` turns each negative photo into red-thing tests: the photo in ``dim``,
``orange`` and ``blur`` light, and every annotated object (traffic lights, speed limits,
crosswalks) scaled to 32, 64 and 128 px on another negative (``object``). The parts of
Stop photos beside their sign are no negatives: annotations do not mark every Stop sign
(``road54.png`` shows a second, far one without a box).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from ctxtask.datasets import signs as ds

FloatBox = tuple[float, float, float, float]

FAR_SIDES = (24, 32, 48)  # px: far signs, around the smallest the detector covers
EDGE_CUT = 0.3  # fraction of the sign outside the frame
ZOOM_FILL = 0.9  # the sign's height over the frame's
HIDDEN_FRACTION = 0.25  # of the sign's width (or height) under the bar
OBJECT_SIDES = (32, 64, 128)  # px: non-stop objects at these sizes
OCCLUDER_BGR = (40, 70, 50)  # dark foliage green
FRAME_W, FRAME_H = ds.FRAME_SIZE


@dataclass(frozen=True)
class Variant:
    kind: str  # what was done, e.g. "far24", "edge-left", "dim"
    source: str  # the photo's file name
    frame: np.ndarray  # uint8 BGR, FRAME_SIZE
    stop_boxes: tuple[FloatBox, ...]  # Stop signs in frame pixels; empty for a negative


def _frame_with_boxes(item: ds.AnnotatedImage) -> tuple[np.ndarray, list[FloatBox]]:
    frame, placement = ds.letterbox(ds.read_image(item.image_path))
    return frame, [placement.to_frame((b.x1, b.y1, b.x2, b.y2)) for b in item.boxes_of("stop")]


def _warp(image: np.ndarray, matrix: np.ndarray, box: FloatBox) -> tuple[np.ndarray, FloatBox]:
    """`image` under an affine `matrix` into a camera frame, and `box` clipped to it."""
    frame = cv2.warpAffine(image, matrix, ds.FRAME_SIZE, flags=cv2.INTER_LINEAR)
    x1, y1, x2, y2 = box
    corners = np.array([[x1, y1, 1], [x2, y1, 1], [x1, y2, 1], [x2, y2, 1]]) @ matrix.T
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    return frame, (max(0.0, lo[0]), max(0.0, lo[1]), min(FRAME_W, hi[0]), min(FRAME_H, hi[1]))


def _shrunk_onto(
    item: ds.AnnotatedImage, box: ds.Box, side: int, background: np.ndarray
) -> tuple[np.ndarray, FloatBox]:
    """`box` of `item` scaled to `side` px with 1.5 sides around it, pasted at the centre."""
    image = ds.read_image(item.image_path)
    s = side / max(box.x2 - box.x1, box.y2 - box.y1)
    cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
    reach = 1.5 * side / s  # half the patch side, in photo pixels
    x0, y0 = max(0, round(cx - reach)), max(0, round(cy - reach))
    x1, y1 = min(item.width, round(cx + reach)), min(item.height, round(cy + reach))
    patch = image[y0:y1, x0:x1]
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    patch = cv2.resize(patch, None, fx=s, fy=s, interpolation=interp)[:FRAME_H, :FRAME_W]
    h, w = patch.shape[:2]
    px, py = (FRAME_W - w) // 2, (FRAME_H - h) // 2
    frame = background.copy()
    frame[py : py + h, px : px + w] = patch
    left, top = px + (box.x1 - x0) * s, py + (box.y1 - y0) * s
    return frame, (left, top, left + (box.x2 - box.x1) * s, top + (box.y2 - box.y1) * s)


def _edge_cuts(frame: np.ndarray, box: FloatBox) -> list[tuple[str, np.ndarray, FloatBox]]:
    """The frame shifted so that the sign is cut by ``EDGE_CUT`` at each edge in turn."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    shifts = {
        "left": (-(x1 + EDGE_CUT * w), 0.0),
        "right": (FRAME_W - (x2 - EDGE_CUT * w), 0.0),
        "top": (0.0, -(y1 + EDGE_CUT * h)),
        "bottom": (0.0, FRAME_H - (y2 - EDGE_CUT * h)),
    }
    out = []
    for side, (dx, dy) in shifts.items():
        shifted, cut = _warp(frame, np.float32([[1, 0, dx], [0, 1, dy]]), box)
        out.append((f"edge-{side}", shifted, cut))
    return out


def _zooms(item: ds.AnnotatedImage, box: ds.Box) -> list[tuple[str, np.ndarray, FloatBox]]:
    """The photo magnified so that the sign fills ``ZOOM_FILL`` of the frame height."""
    image = ds.read_image(item.image_path)
    s = ZOOM_FILL * FRAME_H / (box.y2 - box.y1)
    cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
    out = []
    for name, dy in (("zoom", 0.0), ("zoom-cut", 0.3 * FRAME_H)):
        matrix = np.float32([[s, 0, FRAME_W / 2 - cx * s], [0, s, FRAME_H / 2 - cy * s + dy]])
        out.append((name, *_warp(image, matrix, (box.x1, box.y1, box.x2, box.y2))))
    return out


def _hidden(frame: np.ndarray, box: FloatBox) -> list[tuple[str, np.ndarray]]:
    """A dark bar over ``HIDDEN_FRACTION`` of the sign: from the left, the top, diagonally."""
    x1, y1, x2, y2 = (round(v) for v in box)
    f = HIDDEN_FRACTION
    out = []
    for name, corner_a, corner_b in (
        ("hidden-left", (x1, y1), (round(x1 + f * (x2 - x1)), y2)),
        ("hidden-top", (x1, y1), (x2, round(y1 + f * (y2 - y1)))),
    ):
        hidden = frame.copy()
        cv2.rectangle(hidden, corner_a, corner_b, OCCLUDER_BGR, cv2.FILLED)
        out.append((name, hidden))
    diagonal = frame.copy()
    cv2.line(diagonal, (x1, y1), (x2, y2), OCCLUDER_BGR, max(3, round(f * (x2 - x1) / 2)))
    out.append(("hidden-diagonal", diagonal))
    return out


def lighting(frame: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Dusk (gamma 2.2), sodium-orange light, and an out-of-focus blur of a frame."""
    dim = np.clip(255.0 * (frame / 255.0) ** 2.2, 0, 255).astype(np.uint8)
    orange = np.clip(frame * np.array([0.45, 0.85, 1.15]), 0, 255).astype(np.uint8)
    blur = cv2.GaussianBlur(frame, (0, 0), 2.5)
    return [("dim", dim), ("orange", orange), ("blur", blur)]


def stop_variants(
    stops: Sequence[ds.AnnotatedImage], negatives: Sequence[ds.AnnotatedImage]
) -> list[Variant]:
    """The harder variants of every Stop photo (the first Stop box of each), see above."""
    backgrounds = [ds.letterbox(ds.read_image(n.image_path))[0] for n in negatives]
    if not backgrounds:
        raise ValueError("stop variants need at least one negative photo as a background")
    out: list[Variant] = []
    for k, item in enumerate(stops):
        frame, boxes = _frame_with_boxes(item)
        if not boxes:
            raise ValueError(f"{item.annotation_path}: no stop box, so no stop variants")
        box, sign = boxes[0], item.boxes_of("stop")[0]
        name = item.image_path.name
        for j, side in enumerate(FAR_SIDES):
            bg = backgrounds[(k + j) % len(backgrounds)]
            far, far_box = _shrunk_onto(item, sign, side, bg)
            out.append(Variant(f"far{side}", name, far, (far_box,)))
        for kind, cut, cut_box in _edge_cuts(frame, box) + _zooms(item, sign):
            out.append(Variant(kind, name, cut, (cut_box,)))
        for kind, changed in _hidden(frame, box) + lighting(frame):
            out.append(Variant(kind, name, changed, tuple(boxes)))
    return out


def negative_variants(negatives: Sequence[ds.AnnotatedImage]) -> list[Variant]:
    """Frames without a Stop sign that carry red things, see the module docstring."""
    backgrounds = [ds.letterbox(ds.read_image(n.image_path))[0] for n in negatives]
    out: list[Variant] = []
    k = 0
    for item, frame in zip(negatives, backgrounds, strict=True):
        name = item.image_path.name
        out += [Variant(kind, name, changed, ()) for kind, changed in lighting(frame)]
        for box in item.boxes:
            for side in OBJECT_SIDES:
                k += 1
                bg = backgrounds[k % len(backgrounds)]
                shrunk, _ = _shrunk_onto(item, box, side, bg)
                out.append(Variant(f"object-{box.name}", name, shrunk, ()))
    return out
