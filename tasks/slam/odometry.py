"""How noisy this robot's odometry is, learned online from its disagreement with scan matches.

The odometry prior in tracking needs the odometry's noise, and that differs by orders of
magnitude between robots (fr-clinic's heading drifts by 0.07° over 3–30 s where intel's
drifts 60 times as much), so no fixed σ serves both. The odometry's error grows with motion
and a scan match's does not: so every stretch of about one unit of motion (one metre driven
or one radian turned), the scan at its end is matched against the scan at its start, without
any prior, starting from the odometry's relative pose. Where that match is well constrained
(high fitness, many inliers, translation fixed in both axes) its difference from the
odometry is the odometry's error over the stretch, plus one match's noise, which over a
stretch of many scans is the smaller part (a single step's disagreement with the map would be
mostly matching noise where the odometry is good). The error is taken to grow as a random
walk, variance ∝ motion, with a share for driving and one for turning (wheel odometry errs
in turns far more than a straight stretch says, MIT Killian most):

    σ_θ² = q_d (d + u₀) + q_t |Δθ|,   σ_xy² = q_xy (d + u₀)

per step of d metres and Δθ radians, with q_d from straight stretches, q_t from turning ones
(the driving share taken off), q_xy from all, each the robust (median) variance per unit of
the last stretches; u₀ is a small standing term. Both σ are then multiplied by a margin,
above floors: the tracking prior's (``odom_noise_scale``) or the pose graph's odometry
edges' (``odom_edge_noise_scale``). Until enough stretches are in, the fixed start values
of :class:`~slam.mapper.SlamConfig` hold (for the turn term: until enough turning ones are).
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from ctxtask.se2 import between, wrap
from slam.matching import PointLineMap, icp
from slam.scan import ScanPoints

if TYPE_CHECKING:
    from slam.mapper import SlamConfig

# Medians of χ² with one and two degrees of freedom: median e²/σ² of a heading error and of a
# 2D position error.
_MEDIAN_CHI2_1 = 0.4549
_MEDIAN_CHI2_2 = 1.3863


class OdometryNoise:
    """Robust running estimate of the odometry's noise per unit of motion; gives the
    tracking prior."""

    def __init__(self, config: SlamConfig) -> None:
        self.config = config
        self._heading_var: deque[float] = deque(maxlen=config.odom_noise_window)
        self._turn_var: deque[float] = deque(maxlen=config.odom_noise_window)
        self._xy_var: deque[float] = deque(maxlen=config.odom_noise_window)
        # Their medians, taken when a stretch is measured (about once a metre), not per scan.
        self._median_heading = self._median_turn = self._median_xy = 0.0
        # The odometry pose and scan that start the current stretch.
        self._start: tuple[np.ndarray, PointLineMap] | None = None
        # Motion since the start of the stretch: m driven + rad turned, m driven, net rad turned.
        self._units = 0.0
        self._dist = 0.0
        self._turn = 0.0

    @property
    def samples(self) -> int:
        """Straight stretches measured so far: the driving term's samples."""
        return len(self._heading_var)

    @property
    def learned(self) -> bool:
        """Whether enough straight stretches are in for the driving term to replace the
        start values."""
        return self.samples >= self.config.odom_noise_min_samples

    def sigmas(self, step: np.ndarray, margin: float) -> tuple[float, float]:
        """(σ_xy in m, σ_θ in rad) of the odometry over one odometry ``step``: the learned noise
        times ``margin`` (the tracking prior's and the pose graph's odometry edges differ)."""
        cfg = self.config
        dist = float(math.hypot(step[0], step[1]))
        if not self.learned:
            return (
                cfg.odom_sigma_xy_base_m + cfg.odom_sigma_xy_factor * dist,
                cfg.odom_sigma_th_base_rad + cfg.odom_sigma_th_factor * abs(float(step[2])),
            )
        q_th = self._median_heading / _MEDIAN_CHI2_1
        q_xy = self._median_xy / _MEDIAN_CHI2_2
        turn = abs(float(step[2]))
        if len(self._turn_var) >= cfg.odom_noise_min_samples:
            turn_var = self._median_turn / _MEDIAN_CHI2_1 * turn
        else:
            turn_var = (cfg.odom_sigma_th_factor * turn) ** 2
        u0 = cfg.odom_noise_standing_m
        return (
            max(cfg.odom_sigma_xy_min_m, margin * math.sqrt(q_xy * (dist + u0))),
            max(
                cfg.odom_sigma_th_min_rad,
                margin * math.sqrt(q_th * (dist + u0) + turn_var),
            ),
        )

    def observe(self, odom: np.ndarray, step: np.ndarray, scan: ScanPoints) -> None:
        """Add one matched scan (odometry pose ``odom``, ``step`` since the last scan); at the
        end of a stretch, measure the odometry's error over it."""
        cfg = self.config
        dist = float(math.hypot(step[0], step[1]))
        self._dist += dist
        self._turn += float(step[2])
        self._units += dist + abs(float(step[2]))
        if self._start is not None:
            if self._units < cfg.odom_noise_stretch_units:
                return
            start_odom, start_map = self._start
            self._measure(start_map, between(start_odom, odom), scan)
        self._start = (np.array(odom, dtype=np.float64), PointLineMap(scan.points, scan.normals))
        self._units = self._dist = self._turn = 0.0

    def _measure(self, start_map: PointLineMap, odom_rel: np.ndarray, scan: ScanPoints) -> None:
        cfg = self.config
        match = icp(start_map, scan.points, odom_rel)
        if match.fitness < cfg.odom_noise_min_fitness or match.inliers < cfg.odom_noise_min_inliers:
            return
        try:
            match_cov = np.linalg.inv(match.hessian)
        except np.linalg.LinAlgError:
            return
        # A corridor or an open place leaves a direction unfixed: no measurement. (Unit point
        # σ: the largest axis of the translation covariance, in points' worth of constraint.)
        if np.linalg.eigvalsh(match_cov[:2, :2])[-1] > 1.0 / cfg.odom_noise_min_constraint:
            return
        error = match.pose - odom_rel
        heading_sq = float(wrap(error[2])) ** 2
        turn = abs(self._turn)
        if turn < cfg.odom_noise_straight_ratio * self._dist:
            self._heading_var.append(heading_sq / max(self._dist, 1e-3))
            self._median_heading = float(np.median(self._heading_var))
        elif turn > cfg.odom_noise_turn_rad and len(self._heading_var):
            # A turn's share of the error: what driving alone would leave, taken off.
            share = heading_sq - self._median_heading * self._dist
            self._turn_var.append(max(0.0, share) / turn)
            self._median_turn = float(np.median(self._turn_var))
        if self._dist > 0:
            self._xy_var.append(float(error[0] ** 2 + error[1] ** 2) / self._dist)
            self._median_xy = float(np.median(self._xy_var))
