"""Scan-to-map matching: point-to-line Gauss-Newton ICP and a correlative search.

ICP refines a good initial guess (odometry prediction, or the correlative search result) to
centimetre accuracy. The correlative search finds the basin of attraction when the guess may
be off by up to a metre and ~10 degrees (loop closures), by scoring every pose of a grid
against a likelihood field built with ``cv2.distanceTransform``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.spatial import cKDTree

from ctxtask.se2 import transform_points, wrap


class PointLineMap:
    """Map points with normals in one frame, indexed by a k-d tree for nearest-line queries."""

    def __init__(self, points: np.ndarray, normals: np.ndarray) -> None:
        keep = ~np.isnan(normals[:, 0])
        self.points = np.ascontiguousarray(points[keep])
        self.normals = np.ascontiguousarray(normals[keep])
        self.tree = cKDTree(self.points) if len(self.points) else None

    def __len__(self) -> int:
        return len(self.points)


@dataclass(frozen=True)
class MatchResult:
    pose: np.ndarray  # (3,) pose of the scan in the map frame
    fitness: float  # fraction of scan points within the inlier distance of a map line
    inliers: int
    rmse: float  # RMS point-to-line distance of the inliers, m
    hessian: np.ndarray  # (3, 3) Huber-weighted J^T J of the scan term, for degeneracy checks


def icp(
    target: PointLineMap,
    points: np.ndarray,
    initial: np.ndarray,
    prior: np.ndarray | None = None,
    prior_info: np.ndarray | None = None,
    max_iterations: int = 20,
    gate_m: tuple[float, float] = (0.5, 0.2),
    huber_m: float = 0.03,
    inlier_m: float = 0.05,
    point_sigma_m: float = 0.05,
) -> MatchResult:
    """Point-to-line Gauss-Newton registration of ``points`` (sensor frame) onto ``target``.

    Point residuals are weighted by ``1/point_sigma_m²`` so that they and the prior share
    units. ``prior``/``prior_info`` add an odometry term ``(x − prior)ᵀ Ω (x − prior)`` so that the
    solution stays put along directions the scan does not constrain (long corridors).
    The correspondence gate shrinks from ``gate_m[0]`` to ``gate_m[1]`` after three iterations,
    capturing larger initial errors first and rejecting outliers at the end.
    """
    x = np.array(initial, dtype=np.float64)
    if target.tree is None or len(points) == 0:
        return MatchResult(x, 0.0, 0, float("inf"), np.zeros((3, 3)))
    hessian = np.zeros((3, 3))
    for it in range(max_iterations):
        gate = gate_m[0] if it < 3 else gate_m[1]
        world = transform_points(x, points)
        dist, idx = target.tree.query(world, distance_upper_bound=gate)
        ok = np.isfinite(dist)
        if ok.sum() < 3:
            break
        p = world[ok]
        q = target.points[idx[ok]]
        n = target.normals[idx[ok]]
        r = np.einsum("ij,ij->i", n, p - q)
        # d(R s)/dθ is R s rotated by +90°, i.e. (p - t) rotated.
        rel = p - x[:2]
        jth = n[:, 0] * -rel[:, 1] + n[:, 1] * rel[:, 0]
        jac = np.column_stack([n[:, 0], n[:, 1], jth])
        absr = np.abs(r)
        w = np.where(absr <= huber_m, 1.0, huber_m / np.maximum(absr, 1e-12))
        hessian = (jac * w[:, None]).T @ jac
        grad = (jac * w[:, None]).T @ r / point_sigma_m**2
        h = hessian / point_sigma_m**2
        if prior is not None and prior_info is not None:
            err = x - prior
            err[2] = wrap(err[2])
            h += prior_info
            grad += prior_info @ err
        try:
            dx = -np.linalg.solve(h + 1e-9 * np.eye(3), grad)
        except np.linalg.LinAlgError:
            break
        x += dx
        if it >= 3 and abs(dx[0]) + abs(dx[1]) < 1e-4 and abs(dx[2]) < 1e-4:
            break
    world = transform_points(x, points)
    dist, idx = target.tree.query(world, distance_upper_bound=gate_m[1])
    ok = np.isfinite(dist)
    r = np.einsum("ij,ij->i", target.normals[idx[ok]], world[ok] - target.points[idx[ok]])
    inl = np.abs(r) < inlier_m
    n_in = int(inl.sum())
    rmse = float(np.sqrt(np.mean(r[inl] ** 2))) if n_in else float("inf")
    x[2] = wrap(x[2])
    return MatchResult(x, n_in / len(points), n_in, rmse, hessian)


# Greedy descents run side by side to find the first score the optimum must beat.
_GREEDY_SEEDS = 8
# More blocks than this above the pruning threshold at one level: the window is ambiguous.
_MAX_BLOCKS = 20000


class LikelihoodField:
    """exp(−d²/2σ²) of the distance d to the nearest map point, on a regular grid.

    ``pyramid[l]`` holds, at every cell, the largest value of the 2ˡ × 2ˡ block of cells that
    starts there (Olson 2009; Hess et al. 2016): a scan scored on level ``l`` gets an upper
    bound of its score at every one of the 2ˡ × 2ˡ translations of that block, which is what
    lets :func:`correlative_search` skip most of a large window.
    """

    def __init__(
        self, points: np.ndarray, resolution: float, sigma: float, margin: float, levels: int = 6
    ) -> None:
        self.resolution = resolution
        lo = points.min(axis=0) - margin
        hi = points.max(axis=0) + margin
        self.origin = lo
        w, h = (np.ceil((hi - lo) / resolution).astype(int) + 1).tolist()
        free = np.full((h, w), 255, np.uint8)
        cells = np.floor((points - lo) / resolution).astype(int)
        free[cells[:, 1], cells[:, 0]] = 0
        dist = cv2.distanceTransform(free, cv2.DIST_L2, cv2.DIST_MASK_PRECISE) * resolution
        field = np.exp(-0.5 * (dist / sigma) ** 2).astype(np.float32)
        # A zero border: lookups outside the grid are clipped onto it and score nothing.
        field[0, :] = field[-1, :] = field[:, 0] = field[:, -1] = 0.0
        self.field = field
        self.shape = (h, w)
        self.pyramid = [field]
        for level in range(1, levels + 1):
            half = 1 << (level - 1)
            prev = np.pad(self.pyramid[-1], ((0, half), (0, half)))
            self.pyramid.append(
                np.maximum(
                    np.maximum(prev[:h, :w], prev[half : half + h, :w]),
                    np.maximum(prev[:h, half : half + w], prev[half : half + h, half : half + w]),
                )
            )


@dataclass(frozen=True)
class SearchResult:
    pose: np.ndarray  # best grid pose
    score: float  # its mean likelihood per point, 0…1
    # Covariance (x, y, θ; map frame) of the near-optimal poses about the best one, weighted
    # by how close each scores to it: small when the place is distinct, long along a corridor,
    # wide where the place repeats. Exact unless ``crowded``.
    spread: np.ndarray
    # So many blocks scored near the best that only the most promising were followed: the
    # best pose and the spread are those of a part of the near-optimal set.
    crowded: bool


def correlative_search(
    field: LikelihoodField,
    points: np.ndarray,
    initial: np.ndarray,
    linear_window: float,
    angular_window: float,
    angular_step: float,
    near_ratio: float = 0.9,
) -> SearchResult:
    """Best pose on a grid around ``initial`` (cell-sized translation steps), with its score.

    Branch and bound over translations, level by level: a greedy descent from the best
    coarse block gives a score s₀ that the optimum must beat, and every block whose upper
    bound is below ``near_ratio`` × s₀ is dropped with all its translations. What survives to
    level 0 is scored exactly, so the best pose and the near-optimal set (score ≥
    ``near_ratio`` × best), whose spread says which directions the match fixes, are the
    exhaustive search's — unless thousands of blocks stay above the bound: then only the most
    promising are followed and the result is marked ``crowded``.
    """
    res = field.resolution
    h, w = field.shape
    k = max(1, round(linear_window / res))
    n_ang = round(angular_window / angular_step)
    angles = initial[2] + angular_step * np.arange(-n_ang, n_ang + 1)
    # Cell of every point at every angle, translated by the window's lowest offset (-k, -k).
    cells = np.empty((len(angles), len(points), 2), np.int64)
    for a, theta in enumerate(angles):
        world = transform_points(np.array([initial[0], initial[1], theta]), points)
        cells[a] = np.floor((world - field.origin) / res).astype(np.int64) - k
    span = 2 * k + 1
    top = min(len(field.pyramid) - 1, max(0, int(np.log2(span))))

    def bound(level: int, a: np.ndarray, ox: np.ndarray, oy: np.ndarray) -> np.ndarray:
        grid = field.pyramid[level]
        cx = np.clip(cells[a, :, 0] + ox[:, None], 0, w - 1)
        cy = np.clip(cells[a, :, 1] + oy[:, None], 0, h - 1)
        return grid[cy, cx].sum(axis=1)

    def children(
        a: np.ndarray, ox: np.ndarray, oy: np.ndarray, size: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The four half-size blocks of each block (those inside the window), with parents."""
        half = size // 2
        parent = np.repeat(np.arange(len(a)), 4)
        ox2 = (ox[:, None] + np.array([0, half, 0, half])).ravel()
        oy2 = (oy[:, None] + np.array([0, 0, half, half])).ravel()
        keep = (ox2 < span) & (oy2 < span)
        return a[parent[keep]], ox2[keep], oy2[keep], parent[keep]

    size = 1 << top
    grid_off = np.arange(0, span, size)
    a, ox, oy = (v.ravel() for v in np.meshgrid(np.arange(len(angles)), grid_off, grid_off))
    scores = bound(top, a, ox, oy)
    # Greedy descents from the best few top-level blocks, side by side: the best exact score
    # they reach is one the optimum must beat (the higher, the more blocks are skipped).
    seeds = np.argsort(scores)[-_GREEDY_SEEDS:]
    ga, gx, gy = a[seeds], ox[seeds], oy[seeds]
    for level in range(top - 1, -1, -1):
        ga, gx, gy, parent = children(ga, gx, gy, 1 << (level + 1))
        s = bound(level, ga, gx, gy)
        # Best child of each parent: sort by (parent, score) and take each parent's last.
        order = np.lexsort((s, parent))
        last = order[np.r_[parent[order][1:] != parent[order][:-1], True]]
        ga, gx, gy, s = ga[last], gx[last], gy[last], s[last]
    threshold = near_ratio * float(s.max())
    crowded = False
    for level in range(top - 1, -1, -1):
        keep = np.flatnonzero(scores >= threshold)
        if len(keep) > _MAX_BLOCKS:
            # So many blocks of the window score near the best that the place is ambiguous
            # whatever the exact winner: follow the most promising ones only.
            crowded = True
            keep = keep[np.argsort(scores[keep])[-_MAX_BLOCKS:]]
        a, ox, oy, _ = children(a[keep], ox[keep], oy[keep], 1 << (level + 1))
        scores = bound(level, a, ox, oy)
    i = int(np.argmax(scores))
    pose = np.array([initial[0] + (ox[i] - k) * res, initial[1] + (oy[i] - k) * res, angles[a[i]]])
    offsets = np.column_stack([(ox - ox[i]) * res, (oy - oy[i]) * res, angles[a] - angles[a[i]]])
    spread = _near_optimal_spread(offsets, scores, near_ratio * float(scores[i]))
    return SearchResult(pose, float(scores[i]) / max(len(points), 1), spread, crowded)


def _near_optimal_spread(offsets: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Covariance of the pose ``offsets`` (from the best) scoring at least ``threshold``,
    each weighted by how far its score rises above the threshold (0 at it, most at the best)."""
    near = scores >= threshold
    weight = scores[near] - threshold
    total = float(weight.sum())
    if total <= 0:
        return np.zeros((3, 3))
    return (offsets[near] * weight[:, None]).T @ offsets[near] / total
