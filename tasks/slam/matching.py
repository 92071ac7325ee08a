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

from slam.se2 import transform_points, wrap


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


class LikelihoodField:
    """exp(−d²/2σ²) of the distance d to the nearest map point, on a regular grid."""

    def __init__(self, points: np.ndarray, resolution: float, sigma: float, margin: float) -> None:
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


@dataclass(frozen=True)
class SearchResult:
    pose: np.ndarray  # best grid pose
    score: float  # its mean likelihood per point, 0…1
    runner_up: float  # best mean score of poses clearly apart from it (aliasing measure)


def correlative_search(
    field: LikelihoodField,
    points: np.ndarray,
    initial: np.ndarray,
    linear_window: float,
    angular_window: float,
    angular_step: float,
    distinct_m: float = 0.3,
    distinct_rad: float = np.radians(3.0),
) -> SearchResult:
    """Best pose on a grid around ``initial`` (cell-sized translation steps), with its score.

    Exhaustive, vectorised over translations: for each rotation the scan's cell indices are
    offset by every translation at once, so the cost is rotations × points × translations
    table look-ups (about 1 M for a ±1 m, ±10° window at 10 cm / 1°). ``runner_up`` is the
    best score farther than ``distinct_m`` or ``distinct_rad`` from the winner: close to the
    winner's score means the place is ambiguous (repeated doors, featureless corridor).
    """
    res = field.resolution
    h, w = field.shape
    k = round(linear_window / res)
    offs = np.arange(-k, k + 1)
    flat = field.field.ravel()
    n_ang = round(angular_window / angular_step)
    angles = initial[2] + angular_step * np.arange(-n_ang, n_ang + 1)
    scores = np.empty((len(angles), len(offs), len(offs)), np.float32)
    for a, theta in enumerate(angles):
        world = transform_points(np.array([initial[0], initial[1], theta]), points)
        cells = np.floor((world - field.origin) / res).astype(int)
        cx = np.clip(cells[:, 0, None] + offs[None, :], 0, w - 1)  # (N, T)
        cy = np.clip(cells[:, 1, None] + offs[None, :], 0, h - 1)
        # scores[a, iy, ix] = Σ_points field[cy[p, iy], cx[p, ix]]
        scores[a] = flat[cy[:, :, None] * w + cx[:, None, :]].sum(axis=0)
    ia, iy, ix = np.unravel_index(int(np.argmax(scores)), scores.shape)
    best = float(scores[ia, iy, ix])
    near_t = np.hypot(*np.meshgrid(offs - offs[iy], offs - offs[ix], indexing="ij")) * res
    near_a = np.abs(angles - angles[ia]) <= distinct_rad
    apart = ~(near_a[:, None, None] & (near_t <= distinct_m)[None])
    runner_up = float(scores[apart].max()) if apart.any() else 0.0
    n = max(len(points), 1)
    pose = np.array([initial[0] + offs[ix] * res, initial[1] + offs[iy] * res, angles[ia]])
    return SearchResult(pose, best / n, runner_up / n)
