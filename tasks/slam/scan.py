"""Turning a range array into 2D points with surface normals."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Beams either side of a point used to fit the local surface line.
_NORMAL_HALF_WINDOW = 2
# A neighbour belongs to the same surface when it is closer than this many beam spacings
# (beam spacing grows with range), but never closer than _MIN_NEIGHBOUR_GAP_M.
_NEIGHBOUR_SPACINGS = 3.0
_MIN_NEIGHBOUR_GAP_M = 0.15
# Smallest/largest eigenvalue ratio above which the neighbourhood is a blob, not a line.
_MAX_LINE_EIGEN_RATIO = 0.15


@dataclass(frozen=True)
class ScanPoints:
    """Valid returns of one scan in the sensor (= robot) frame."""

    points: np.ndarray  # (N, 2) all valid returns
    normals: np.ndarray  # (N, 2) unit normals; NaN where no line could be fitted


def scan_to_points(
    ranges: np.ndarray,
    angle_min: float,
    angle_increment: float,
    max_range: float,
    min_range: float = 0.05,
) -> ScanPoints:
    """Project valid ranges to points and fit a normal to each from its beam neighbours.

    Normals come from the scan's own beam order (not a k-d tree) because neighbouring beams
    are the natural neighbourhood of a range scan and this costs a few vector operations.
    """
    ranges = np.asarray(ranges, dtype=np.float64)
    n = len(ranges)
    bearings = angle_min + angle_increment * np.arange(n)
    valid = np.isfinite(ranges) & (ranges > min_range) & (ranges < max_range)
    pts = np.stack([ranges * np.cos(bearings), ranges * np.sin(bearings)], axis=1)
    pts[~valid] = np.nan

    gap = np.maximum(_NEIGHBOUR_SPACINGS * ranges * angle_increment, _MIN_NEIGHBOUR_GAP_M)
    h = _NORMAL_HALF_WINDOW
    padded = np.full((n + 2 * h, 2), np.nan)
    padded[h : h + n] = pts
    neigh = np.stack([padded[h + k : h + k + n] for k in range(-h, h + 1)], axis=1)  # (n,w,2)
    dist = np.linalg.norm(neigh - pts[:, None, :], axis=2)
    use = np.isfinite(dist) & (dist < gap[:, None])
    count = use.sum(axis=1)
    neigh = np.where(use[:, :, None], neigh, 0.0)
    mean = neigh.sum(axis=1) / np.maximum(count, 1)[:, None]
    d = np.where(use[:, :, None], neigh - mean[:, None, :], 0.0)
    cxx = (d[:, :, 0] ** 2).sum(axis=1)
    cyy = (d[:, :, 1] ** 2).sum(axis=1)
    cxy = (d[:, :, 0] * d[:, :, 1]).sum(axis=1)
    # Closed-form 2x2 eigen-decomposition: major axis angle and both eigenvalues.
    phi = 0.5 * np.arctan2(2.0 * cxy, cxx - cyy)
    half_tr = 0.5 * (cxx + cyy)
    root = np.sqrt(np.maximum(0.25 * (cxx - cyy) ** 2 + cxy**2, 0.0))
    lam_max, lam_min = half_tr + root, half_tr - root
    normals = np.stack([-np.sin(phi), np.cos(phi)], axis=1)
    good = valid & (count >= 3) & (lam_min <= _MAX_LINE_EIGEN_RATIO * np.maximum(lam_max, 1e-12))
    normals[~good] = np.nan
    return ScanPoints(points=pts[valid], normals=normals[valid])
