"""Readers for the two road-sign dataset layouts, and camera-frame replay of street photos.

Detection folders (street photos, e.g. ``$CTXROBOT_DATA/signs/road-sign-detection-subset``)::

    images/<name>.png            any format cv2 reads (the shared set is 16-bit RGBA PNG)
    annotations/<name>.xml       PASCAL VOC: <filename>, <size>, one <object> per box

Classification folders (sign crops, e.g. ``$CTXROBOT_DATA/signs/gtsrb-test-subset``)::

    Images/<name>.ppm            one crop per file
    GT-*.csv                     ``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId``

A folder may hold fewer images than its ground truth lists (part of a set is kept back for
independent evaluation), so readers pair files by the names inside the ground truth and never
assume particular file names or counts.

The host runtime replays street photos as a camera stream with `camera_frame`, and the signs
task evaluates on exactly those frames, so what is measured is what the robot would see.
`score_run` scores what the signs task reported during such a replay (quality in the loop).
"""

from __future__ import annotations

import csv
import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

FRAME_SIZE = (640, 480)  # (width, height) of the robot camera frames
GTSRB_CLASSES = 43
STOP_CLASS_ID = 14  # GTSRB's "Stop"
# Original GTSRB folders keep their CSV inside Images/; only these count as crops.
IMAGE_SUFFIXES = frozenset({".ppm", ".png", ".jpg", ".jpeg", ".bmp"})
GT_COLUMNS = ("Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")


@dataclass(frozen=True)
class Box:
    """One annotated object: class name and pixel box (VOC convention, x2/y2 inclusive)."""

    name: str
    x1: int
    y1: int
    x2: int
    y2: int


@dataclass(frozen=True)
class AnnotatedImage:
    """One street photo with its ground-truth boxes."""

    image_path: Path
    annotation_path: Path
    width: int
    height: int
    boxes: tuple[Box, ...]

    def boxes_of(self, name: str) -> list[Box]:
        return [b for b in self.boxes if b.name == name]


@dataclass(frozen=True)
class SignCrop:
    """One classification crop with its GTSRB class and the sign's ROI in the original crop."""

    image_path: Path
    class_id: int
    width: int  # size of the original crop the ROI refers to (the file may be resized)
    height: int
    roi: tuple[int, int, int, int]  # x1, y1, x2, y2 (inclusive)


@dataclass(frozen=True)
class Letterbox:
    """How a photo was placed into a camera frame: frame = photo * scale + (dx, dy)."""

    scale: float
    dx: int
    dy: int

    def to_frame(self, box: tuple[float, float, float, float]) -> tuple[float, ...]:
        """A box in photo pixels → frame pixels."""
        x1, y1, x2, y2 = box
        s = self.scale
        return (x1 * s + self.dx, y1 * s + self.dy, x2 * s + self.dx, y2 * s + self.dy)


def is_detection_dir(folder: Path) -> bool:
    return (folder / "images").is_dir() and (folder / "annotations").is_dir()


def is_classification_dir(folder: Path) -> bool:
    return (folder / "Images").is_dir() and any(folder.glob("GT-*.csv"))


def read_image(path: Path) -> np.ndarray:
    """An image as 8-bit BGR (cv2's default read also reduces 16-bit RGBA PNGs to that)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: not a readable image (missing, truncated or unknown format)")
    return image


def letterbox(
    image: np.ndarray, size: tuple[int, int] = FRAME_SIZE
) -> tuple[np.ndarray, Letterbox]:
    """Fit `image` into a `size` (w, h) BGR frame, keeping its aspect ratio, black borders.

    Scaling up as well as down makes every replayed photo a full camera frame, so the task's
    cost per frame does not depend on the photo's resolution.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"letterbox needs a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    fw, fh = size
    h, w = image.shape[:2]
    scale = min(fw / w, fh / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    frame = np.zeros((fh, fw, 3), np.uint8)
    dx, dy = (fw - nw) // 2, (fh - nh) // 2
    frame[dy : dy + nh, dx : dx + nw] = resized
    return frame, Letterbox(scale=scale, dx=dx, dy=dy)


def camera_frame(path: Path, size: tuple[int, int] = FRAME_SIZE) -> np.ndarray:
    """A still photo as the robot camera would deliver it: uint8 BGR, `size` (w, h)."""
    return letterbox(read_image(path), size)[0]


def _text(node: ET.Element, tag: str, path: Path) -> str:
    value = node.findtext(tag)
    if value is None or not value.strip():
        raise ValueError(f"{path}: missing <{tag}>")
    return value.strip()


def _int(text: str, what: str, path: Path) -> int:
    try:
        # VOC writers sometimes store coordinates as "42.0".
        return round(float(text))
    except ValueError:
        raise ValueError(f"{path}: {what} is not a number: {text!r}") from None


def read_voc(path: Path, images_dir: Path) -> AnnotatedImage:
    """Parse one PASCAL-VOC annotation; its <filename> names the image in `images_dir`."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{path}: not well-formed XML: {exc}") from None
    if root.tag != "annotation":
        raise ValueError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    image_path = images_dir / Path(_text(root, "filename", path)).name
    if not image_path.is_file():
        raise ValueError(f"{path}: its image {image_path} does not exist")
    size = root.find("size")
    if size is None:
        raise ValueError(f"{path}: missing <size>")
    width = _int(_text(size, "width", path), "<size><width>", path)
    height = _int(_text(size, "height", path), "<size><height>", path)
    if width <= 0 or height <= 0:
        raise ValueError(f"{path}: image size {width}x{height} is not positive")
    boxes = []
    for i, obj in enumerate(root.iter("object")):
        name = _text(obj, "name", path)
        bnd = obj.find("bndbox")
        if bnd is None:
            raise ValueError(f"{path}: object {i} ({name}) has no <bndbox>")
        x1, y1, x2, y2 = (
            _int(_text(bnd, k, path), f"object {i} <{k}>", path)
            for k in ("xmin", "ymin", "xmax", "ymax")
        )
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"{path}: object {i} ({name}) has an empty box {[x1, y1, x2, y2]}")
        # Annotators click on the border pixel; clamp instead of rejecting an off-by-one.
        boxes.append(Box(name, max(0, x1), max(0, y1), min(width, x2), min(height, y2)))
    return AnnotatedImage(image_path, path, width, height, tuple(boxes))


def load_detection_set(folder: Path) -> list[AnnotatedImage]:
    """Every annotated image of a detection folder, in annotation-name order."""
    folder = Path(folder)
    if not is_detection_dir(folder):
        raise ValueError(f"{folder}: not a detection folder (needs images/ and annotations/)")
    items = [read_voc(p, folder / "images") for p in sorted((folder / "annotations").glob("*.xml"))]
    if not items:
        raise ValueError(f"{folder / 'annotations'}: no *.xml annotations")
    return items


def read_gt_csv(path: Path) -> dict[str, SignCrop]:
    """One GTSRB ground-truth CSV: file name → crop (images are expected in ``Images/``)."""
    images_dir = path.parent / "Images"
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f, delimiter=";"))
    if not rows or tuple(c.strip() for c in rows[0]) != GT_COLUMNS:
        got = ";".join(rows[0]) if rows else "an empty file"
        raise ValueError(f"{path}: header must be {';'.join(GT_COLUMNS)}, got {got}")
    crops: dict[str, SignCrop] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) != len(GT_COLUMNS):
            raise ValueError(
                f"{path}:{line_no}: expected {len(GT_COLUMNS)} ';'-separated fields, got {len(row)}"
            )
        name = row[0].strip()
        try:
            w, h, x1, y1, x2, y2, class_id = (int(c) for c in row[1:])
        except ValueError:
            raise ValueError(f"{path}:{line_no}: non-integer field in {row!r}") from None
        if not 0 <= class_id < GTSRB_CLASSES:
            raise ValueError(f"{path}:{line_no}: ClassId {class_id} is outside 0..42")
        if name in crops and crops[name].class_id != class_id:
            raise ValueError(f"{path}:{line_no}: {name} listed twice with different classes")
        crops[name] = SignCrop(images_dir / name, class_id, w, h, (x1, y1, x2, y2))
    return crops


def load_classification_set(folder: Path) -> list[SignCrop]:
    """Every crop in ``Images/`` with its label, in file-name order.

    A folder may carry several GT files (e.g. the full official list and a subset's rows);
    labels are merged and must agree. Rows whose image is absent are skipped, because a
    folder can hold a part of the set its ground truth describes; an image without a row
    is an error, since it could not be scored.
    """
    folder = Path(folder)
    if not is_classification_dir(folder):
        raise ValueError(f"{folder}: not a classification folder (needs Images/ and GT-*.csv)")
    labels: dict[str, SignCrop] = {}
    for gt in sorted(folder.glob("GT-*.csv")):
        for name, crop in read_gt_csv(gt).items():
            if name in labels and labels[name].class_id != crop.class_id:
                raise ValueError(
                    f"{gt}: {name} has ClassId {crop.class_id}, another GT file says "
                    f"{labels[name].class_id}"
                )
            labels[name] = crop
    images = sorted(p for p in (folder / "Images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{folder / 'Images'}: no images")
    unlabelled = [p.name for p in images if p.name not in labels]
    if unlabelled:
        raise ValueError(
            f"{folder}: {len(unlabelled)} image(s) have no row in any GT-*.csv, "
            f"e.g. {unlabelled[0]}"
        )
    return [labels[p.name] for p in images]


def score_run(results: Sequence[Mapping[str, Any]], dataset_dir: Path | str) -> dict[str, Any]:
    """Stop-sign recall and precision of what the signs task reported during one run.

    ``results`` are the task's result dicts in sample-id order, as it returned them; dropped
    samples are simply missing, and a result with a ``"shed"`` key was not processed, so it
    is not scored. Each result names its frame (``name``: the replayed photo's file name)
    and lists its ``detections``. A photo shows a Stop sign when its annotation in
    ``dataset_dir`` (a detection folder) has a ``stop`` box.

    Scored **per frame**, as the robot experiences it: a Stop photo held for 3 s at 30 fps
    is 90 chances to see it, and recall is the fraction of those frames on which a Stop was
    reported; precision is the fraction of frames with a Stop reported that showed one.
    Returns ``{"stop_recall", "stop_precision", "frames", "stop_frames"}``: ``frames`` were
    scored, ``stop_frames`` of them showed a Stop photo; a ratio is NaN when its
    denominator is 0. Raises ``ValueError`` when a result names no frame or a photo the
    folder has no annotation for.
    """
    folder = Path(dataset_dir)
    has_stop = {
        item.image_path.name: bool(item.boxes_of("stop")) for item in load_detection_set(folder)
    }
    tp = fp = fn = frames = 0
    for index, result in enumerate(results):
        if "shed" in result:
            continue
        name = result.get("name")
        if not isinstance(name, str):
            raise ValueError(
                f"result {index} names no frame (no 'name'): score results of a signs task "
                "that echoes the frame's name, from a replayed camera"
            )
        if name not in has_stop:
            raise ValueError(
                f"result {index} shows {name!r}, which has no annotation in "
                f"{folder / 'annotations'}; score the run against the detection folder it replayed"
            )
        found = any(d.get("class_id") == STOP_CLASS_ID for d in result.get("detections", ()))
        frames += 1
        tp += has_stop[name] and found
        fp += found and not has_stop[name]
        fn += has_stop[name] and not found
    return {
        "stop_recall": tp / (tp + fn) if tp + fn else math.nan,
        "stop_precision": tp / (tp + fp) if tp + fp else math.nan,
        "frames": frames,
        "stop_frames": tp + fn,
    }


def score_shown(
    shown: Sequence[str], results: Mapping[int, Mapping[str, Any]], dataset_dir: Path | str
) -> dict[str, Any]:
    """Stop-sign recall and precision over **every frame shown**, shed ones included.

    ``shown[k]`` is the photo frame ``k`` showed (its sample id is ``k``); ``results`` maps the
    sample ids the task answered to its result dicts. At each frame the robot knows what the
    task last reported for a frame it processed (a result with ``"shed"`` did no work and
    tells nothing): that held belief is what is scored, so a frame the context shed counts
    with whatever the robot believed then — shedding costs exactly the quality it loses.
    Returns ``{"stop_recall", "stop_precision", "frames", "stop_frames", "processed"}``.
    """
    folder = Path(dataset_dir)
    has_stop = {
        item.image_path.name: bool(item.boxes_of("stop")) for item in load_detection_set(folder)
    }
    unknown = sorted({name for name in shown if name not in has_stop})
    if unknown:
        raise ValueError(
            f"{unknown[0]} was shown but has no annotation in {folder / 'annotations'}; score "
            "the run against the detection folder it replayed"
        )
    tp = fp = fn = processed = 0
    believed = False
    for k, name in enumerate(shown):
        result = results.get(k)
        if result is not None and "shed" not in result:
            believed = any(d.get("class_id") == STOP_CLASS_ID for d in result.get("detections", ()))
            processed += 1
        tp += has_stop[name] and believed
        fp += believed and not has_stop[name]
        fn += has_stop[name] and not believed
    return {
        "stop_recall": tp / (tp + fn) if tp + fn else math.nan,
        "stop_precision": tp / (tp + fp) if tp + fp else math.nan,
        "frames": len(shown),
        "stop_frames": tp + fn,
        "processed": processed,
    }
