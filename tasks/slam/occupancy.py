"""Occupancy-grid map from posed scans, saved in the ROS map_server format (PNG + YAML)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ctxtask.se2 import transform_points

# Log-odds increments of the inverse sensor model and the clamp that keeps cells revisable.
_L_HIT = 0.9
_L_MISS = -0.4
_L_CLAMP = 5.0
# ROS map_server thresholds (probabilities) written into the YAML.
_OCCUPIED_THRESH = 0.65
_WALL_MARGIN = 2.0  # cells
_FREE_THRESH = 0.196


@dataclass(frozen=True)
class OccupancyGrid:
    log_odds: np.ndarray  # (H, W) float32, row 0 at the lowest y
    resolution: float  # m per cell
    origin: tuple[float, float]  # world (x, y) of the lower-left corner of cell (0, 0)

    def image(self) -> np.ndarray:
        """uint8 image in map_server's trinary convention: 0 occupied, 254 free, 205 unknown."""
        prob = 1.0 - 1.0 / (1.0 + np.exp(self.log_odds))
        img = np.full(self.log_odds.shape, 205, np.uint8)
        img[prob > _OCCUPIED_THRESH] = 0
        img[prob < _FREE_THRESH] = 254
        return np.flipud(img)  # image rows run top-down, the map's y runs bottom-up

    def save(self, folder: Path, name: str = "map") -> Path:
        """Write ``name.png`` and ``name.yaml``; returns the YAML path."""
        folder.mkdir(parents=True, exist_ok=True)
        png = folder / f"{name}.png"
        if not cv2.imwrite(str(png), self.image()):
            raise OSError(f"cannot write {png}")
        yaml_path = folder / f"{name}.yaml"
        yaml_path.write_text(
            f"image: {png.name}\n"
            f"resolution: {self.resolution}\n"
            f"origin: [{self.origin[0]:.4f}, {self.origin[1]:.4f}, 0.0]\n"
            "negate: 0\n"
            f"occupied_thresh: {_OCCUPIED_THRESH}\n"
            f"free_thresh: {_FREE_THRESH}\n"
        )
        return yaml_path


def build_grid(
    poses: np.ndarray, scans: Sequence[np.ndarray], resolution: float = 0.05
) -> OccupancyGrid:
    """Integrate scans (points in the sensor frame, one array per pose) by ray casting.

    Each ray marks the cells it crosses as free and its end cell as occupied, each at most once
    per scan. Rays are sampled at the cell size (what Bresenham visits, up to diagonal
    steps), all rays of a scan at once, instead of a Python loop per beam.
    """
    world = [transform_points(p, s) for p, s in zip(poses, scans, strict=True)]
    every = np.concatenate([*world, poses[:, :2]]) if world else poses[:, :2]
    lo = every.min(axis=0) - 1.0
    hi = every.max(axis=0) + 1.0
    w, h = (np.ceil((hi - lo) / resolution).astype(int) + 1).tolist()
    log_odds = np.zeros(h * w, np.float32)
    for pose, pts in zip(poses, world, strict=True):
        if len(pts) == 0:
            continue
        start = (pose[:2] - lo) / resolution
        end = (pts - lo) / resolution
        length = np.linalg.norm(end - start, axis=1)
        # Free space stops _WALL_MARGIN cells short of the hit so that rays grazing a wall at
        # a shallow angle do not erase it (cell rounding would put them inside the wall).
        steps = np.maximum(np.ceil(length - _WALL_MARGIN).astype(int), 0)
        ray = np.repeat(np.arange(len(pts)), steps)
        cell = np.arange(len(ray)) - np.repeat(np.cumsum(steps) - steps, steps)
        unit = (end - start) / np.maximum(length, 1e-9)[:, None]
        samples = start + unit[ray] * cell[:, None]
        free = np.floor(samples).astype(int)
        hit = np.floor(end).astype(int)
        free_idx = np.unique(free[:, 1] * w + free[:, 0])
        hit_idx = np.unique(hit[:, 1] * w + hit[:, 0])
        free_idx = np.setdiff1d(free_idx, hit_idx, assume_unique=True)
        log_odds[free_idx] = np.maximum(log_odds[free_idx] + _L_MISS, -_L_CLAMP)
        log_odds[hit_idx] = np.minimum(log_odds[hit_idx] + _L_HIT, _L_CLAMP)
    return OccupancyGrid(log_odds.reshape(h, w), resolution, (float(lo[0]), float(lo[1])))
