"""Graph SLAM: scan-to-local-map ICP front end, keyframe pose graph with loop closures.

Every scan is matched against a local map made of the last few keyframes, starting from the
odometry prediction. Keyframes become pose-graph nodes joined by the matched relative poses.
When a new keyframe comes near an older, path-distant part of the graph, it and the few
keyframes before it are matched against a submap around that place (branch-and-bound
correlative search in a window that grows with the path since the last closure, then ICP). A
match that is good, unambiguous and well constrained is added as a loop edge once a second
match, whose query shares no scan with it, agrees. Optimisation is spread over the following
scan updates, one Gauss-Newton iteration per update, so no single update stalls; once it has
converged, a loop edge the graph still disagrees with is removed and counted as rejected.
A scan taken while the odometry shows no motion is not matched at all (``ScanEstimate.still``).

Each scan's pose is stored relative to the keyframe it was matched against, so optimising the
keyframes moves every scan with them and a pose exists for every scan.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from slam.matching import LikelihoodField, MatchResult, PointLineMap, correlative_search, icp
from slam.posegraph import PoseGraph
from slam.scan import ScanPoints, scan_to_points
from slam.se2 import between, compose, rotate_vectors, transform_points


@dataclass(frozen=True)
class SlamConfig:
    """Tuning knobs. Distances in m, angles in rad; defaults suit indoor 180° scanners."""

    # Returns beyond this are not used. Outdoors the far returns carry the structure (fr-clinic:
    # a 30 m cut left ~80 points a scan and a front end worse than the odometry).
    max_range_m: float = 80.0
    keyframe_distance_m: float = 0.3
    keyframe_angle_rad: float = math.radians(10.0)
    local_map_keyframes: int = 20
    # Below this odometry motion since the last matched scan the robot is standing still and
    # the scan is not matched (its pose is the prediction): saves CPU while parked.
    still_distance_m: float = 0.01
    still_angle_rad: float = math.radians(0.5)
    # Odometry prior for tracking: σ = base + factor × motion.
    odom_sigma_xy_base_m: float = 0.02
    odom_sigma_xy_factor: float = 0.2
    odom_sigma_th_base_rad: float = math.radians(1.0)
    odom_sigma_th_factor: float = 0.2
    # σ of one scan point against the map in tracking: weighs the scan against the odometry
    # prior. Neighbouring returns err together (one wall, one bush), so it is larger than the
    # range noise.
    track_point_sigma_m: float = 0.05
    track_min_fitness: float = 0.4  # below this, recover with a correlative search
    # Below this even after the search, the scan cannot place itself (open space, nothing in
    # range, a featureless stretch): the odometry prediction is kept rather than a guess.
    track_accept_fitness: float = 0.4
    track_linear_window_m: float = 0.3
    track_angular_window_rad: float = math.radians(8.0)
    track_field_resolution_m: float = 0.05  # also the σ of its likelihood field
    # Pose-graph edge uncertainties (1σ).
    seq_sigma_xy_m: float = 0.02
    seq_sigma_th_rad: float = math.radians(0.3)
    loop_sigma_xy_m: float = 0.03
    loop_sigma_th_rad: float = math.radians(0.5)
    # DCS Φ for loop edges: only a last-resort guard, because wrong matches are already
    # removed by the pairwise consistency test. The edge σ above describe one match, but after
    # tens of metres without a closure the drift is far larger than the chain of sequential
    # edges claims (Intel: 4 m and 18° after one 35 m stretch, χ² ≈ 10⁴), and a small Φ would
    # throw exactly those closures away.
    loop_dcs_phi: float = 1e5
    # Loop closing.
    loop_search_radius_m: float = 3.0
    loop_min_path_m: float = 10.0
    loop_submap_half: int = 6
    # Path between two loop-closure attempts (CPU budget); a quarter of the window when wider.
    loop_attempt_every_m: float = 0.6
    # Search window: base + growth per metre travelled since the last closure, capped. The
    # branch-and-bound search makes a window of metres and tens of degrees affordable.
    loop_linear_window_m: float = 0.3
    loop_linear_window_per_m: float = 0.04
    loop_linear_window_max_m: float = 12.0
    loop_angular_window_rad: float = math.radians(3.0)
    loop_angular_window_per_m: float = math.radians(0.5)
    loop_angular_window_max_rad: float = math.radians(30.0)
    # Reject when a clearly different pose scores this close to the best (aliasing).
    loop_max_ambiguity: float = 0.9
    loop_field_resolution_m: float = 0.1
    loop_min_fitness: float = 0.55
    loop_min_inliers: int = 60
    loop_min_constraint: float = 0.08  # min eigenvalue of the translational Hessian / inliers
    # Pairwise consistency: a match is added once another match from the last
    # loop_consistency_path_m of path (or four attempts) closes a cycle with it within these bounds.
    loop_consistency_path_m: float = 4.0
    loop_consistency_m: float = 0.15
    loop_consistency_rad: float = math.radians(2.0)
    # Once the optimisation has converged, a closure the graph still disagrees with by more
    # than this is removed (counted in rejected_closures) and the graph re-optimised.
    loop_reject_m: float = 0.3
    loop_reject_rad: float = math.radians(3.0)
    search_max_points: int = 120
    loop_query_keyframes: int = 5  # keyframes matched together at a loop closure
    loop_search_max_points: int = 250
    # Optimisation pacing: Gauss-Newton iterations per scan update while one is pending.
    gn_iterations_per_update: int = 1
    gn_max_iterations: int = 10
    gn_tolerance: float = 1e-4


@dataclass(frozen=True)
class ScanEstimate:
    """What :meth:`Slam.process` knows about one scan."""

    pose: np.ndarray  # (3,) pose of the scan in the map frame
    still: bool  # the robot stood still: the scan was not matched, its pose is the prediction


@dataclass
class _LoopMatch:
    j: int  # older keyframe
    k: int  # newer keyframe
    z: np.ndarray  # measured pose of k in the frame of j
    path_m: float  # path length at keyframe k
    added: bool = False


def _diag_info(sigma_xy: float, sigma_th: float) -> np.ndarray:
    return np.diag([sigma_xy**-2, sigma_xy**-2, sigma_th**-2])


class Slam:
    """Online 2D graph SLAM; feed scans in time order with :meth:`process`."""

    def __init__(self, config: SlamConfig | None = None) -> None:
        self.config = config or SlamConfig()
        self.graph = PoseGraph(self.config.loop_dcs_phi)
        self.keyframes: list[ScanPoints] = []  # scan of each pose-graph node
        self.loop_closures = 0
        self.loop_attempts = 0
        self.rejected_closures = 0
        self.still_scans = 0
        self._scan_ref: list[int] = []  # keyframe index each scan's pose is relative to
        self._scan_rel: list[np.ndarray] = []
        self._last_odom: np.ndarray | None = None
        self._matched_odom: np.ndarray | None = None
        self._path_m = 0.0
        self._local: PointLineMap | None = None
        self._local_field: LikelihoodField | None = None
        self._local_dirty = True
        self._gn_pending = 0
        self._recent_matches: list[_LoopMatch] = []
        self._kf_path: list[float] = []  # path length at each keyframe
        self._path_at_last_closure = 0.0
        self._path_at_last_attempt = -math.inf
        cfg = self.config
        self._seq_info = _diag_info(cfg.seq_sigma_xy_m, cfg.seq_sigma_th_rad)
        self._loop_info = _diag_info(cfg.loop_sigma_xy_m, cfg.loop_sigma_th_rad)

    # ----------------------------------------------------------------------------- poses
    @property
    def num_scans(self) -> int:
        return len(self._scan_ref)

    def scan_pose(self, k: int) -> np.ndarray:
        return compose(self.graph.poses[self._scan_ref[k]], self._scan_rel[k])

    def trajectory(self) -> np.ndarray:
        """Current pose estimate of every processed scan, (N, 3)."""
        if not self._scan_ref:
            return np.zeros((0, 3))
        ref = np.asarray(self._scan_ref)
        return compose(self.graph.poses[ref], np.asarray(self._scan_rel))

    def finish(self) -> None:
        """Optimise the graph to convergence, rejecting disagreeing closures (end of a log)."""
        cfg = self.config
        self.graph.optimise(cfg.gn_max_iterations * 3, cfg.gn_tolerance)
        while self._reject_worst_closure():
            self.graph.optimise(cfg.gn_max_iterations * 3, cfg.gn_tolerance)
        self._gn_pending = 0
        self._local_dirty = True

    # ----------------------------------------------------------------------------- main
    def process(
        self,
        ranges: np.ndarray,
        odom: np.ndarray,
        angle_min: float,
        angle_increment: float,
        max_range: float,
    ) -> ScanEstimate:
        """Estimate the pose of one scan; ``odom`` is the wheel odometry pose at its stamp."""
        cfg = self.config
        odom = np.asarray(odom, dtype=np.float64)
        self._advance_optimisation()

        # Fitting the scan's points and normals is the costly part of an update; a parked
        # robot needs neither, so it is done at most once and only when a branch uses it.
        @functools.cache
        def scan() -> ScanPoints:
            return scan_to_points(
                ranges, angle_min, angle_increment, min(max_range, cfg.max_range_m)
            )

        if not self.keyframes:
            self._add_keyframe(odom.copy(), scan())
            self._record_scan(0, np.zeros(3))
            self._last_odom = self._matched_odom = odom
            return ScanEstimate(odom.copy(), still=False)

        assert self._last_odom is not None and self._matched_odom is not None
        step = between(self._last_odom, odom)
        self._path_m += float(np.hypot(step[0], step[1]))
        self._last_odom = odom
        prediction = compose(self.scan_pose(self.num_scans - 1), step)

        since = between(self._matched_odom, odom)
        still = np.hypot(since[0], since[1]) < cfg.still_distance_m and abs(since[2]) < (
            cfg.still_angle_rad
        )
        if still:
            pose = prediction
            self.still_scans += 1
        else:
            pose = self._track(scan(), prediction, step)
            self._matched_odom = odom

        ref = len(self.keyframes) - 1
        rel = between(self.graph.poses[ref], pose)
        if np.hypot(rel[0], rel[1]) > cfg.keyframe_distance_m or abs(rel[2]) > (
            cfg.keyframe_angle_rad
        ):
            k = self._add_keyframe(pose, scan())
            self.graph.add_edge(ref, k, rel, self._seq_info, robust=False)
            self._record_scan(k, np.zeros(3))
            self._try_loop_closure(k)
        else:
            self._record_scan(ref, rel)
        return ScanEstimate(self.scan_pose(self.num_scans - 1), still=bool(still))

    # ----------------------------------------------------------------------------- front end
    def _record_scan(self, ref: int, rel: np.ndarray) -> None:
        self._scan_ref.append(ref)
        self._scan_rel.append(rel)

    def _add_keyframe(self, pose: np.ndarray, scan: ScanPoints) -> int:
        self.keyframes.append(scan)
        self._kf_path.append(self._path_m)
        self._local_dirty = True
        return self.graph.add_node(pose)

    def _submap(self, indices: range) -> tuple[np.ndarray, np.ndarray]:
        pts, nrm = [], []
        for idx in indices:
            pose = self.graph.poses[idx]
            sc = self.keyframes[idx]
            pts.append(transform_points(pose, sc.points))
            nrm.append(rotate_vectors(pose[2], sc.normals))
        return np.concatenate(pts), np.concatenate(nrm)

    def _local_map(self) -> PointLineMap:
        if self._local is None or self._local_dirty:
            n = len(self.keyframes)
            pts, nrm = self._submap(range(max(0, n - self.config.local_map_keyframes), n))
            self._local = PointLineMap(pts, nrm)
            self._local_field = None
            self._local_dirty = False
        return self._local

    def _track(self, scan: ScanPoints, prediction: np.ndarray, step: np.ndarray) -> np.ndarray:
        cfg = self.config
        local = self._local_map()
        if len(local) == 0 or len(scan.points) == 0:
            return prediction  # nothing to match (e.g. every beam saw "no return")
        dist = float(np.hypot(step[0], step[1]))
        s_xy = cfg.odom_sigma_xy_base_m + cfg.odom_sigma_xy_factor * dist
        s_th = cfg.odom_sigma_th_base_rad + cfg.odom_sigma_th_factor * abs(float(step[2]))
        prior_info = _diag_info(s_xy, s_th)
        result = icp(
            local,
            scan.points,
            prediction,
            prediction,
            prior_info,
            point_sigma_m=cfg.track_point_sigma_m,
        )
        if result.fitness >= cfg.track_min_fitness:
            return result.pose
        # Tracking is lost (wheel slip, fast turn): search the neighbourhood exhaustively.
        if self._local_field is None:
            res = cfg.track_field_resolution_m
            self._local_field = LikelihoodField(local.points, res, res, 1.0)
        guess = correlative_search(
            self._local_field,
            self._search_points(scan.points, cfg.search_max_points),
            prediction,
            cfg.track_linear_window_m,
            cfg.track_angular_window_rad,
            math.radians(1.0),
        ).pose
        retry = icp(local, scan.points, guess)
        best = retry if retry.fitness > result.fitness else result
        return best.pose if best.fitness >= cfg.track_accept_fitness else prediction

    def _search_points(self, pts: np.ndarray, limit: int) -> np.ndarray:
        stride = max(1, math.ceil(len(pts) / limit))
        return pts[::stride]

    def _loop_query(self, k: int) -> np.ndarray:
        """Points of keyframe ``k`` and the few before it, in k's frame.

        One 180-beam scan outdoors may hold 80 returns that fit many places; the short chain
        before it is accurate (scan matching over a few metres) and gives the match the shape
        of the place instead of one view of it.
        """
        cfg = self.config
        first = max(0, k - cfg.loop_query_keyframes + 1)
        pose_k = self.graph.poses[k]
        return np.concatenate(
            [
                transform_points(between(pose_k, self.graph.poses[i]), self.keyframes[i].points)
                for i in range(first, k + 1)
            ]
        )

    # ----------------------------------------------------------------------------- back end
    def _advance_optimisation(self) -> None:
        cfg = self.config
        for _ in range(cfg.gn_iterations_per_update):
            if self._gn_pending <= 0:
                return
            change = self.graph.step()
            self._local_dirty = True
            self._gn_pending -= 1
            if change < cfg.gn_tolerance:
                self._gn_pending = 0
                if self._reject_worst_closure():
                    self._gn_pending = cfg.gn_max_iterations

    def _reject_worst_closure(self) -> bool:
        """Remove the loop edge the optimised graph disagrees with most, if beyond the bounds.

        A wrong closure that passed every match test still cannot bend the rest of the graph
        onto itself: at the optimum it keeps a residual far above a match's error, while the
        right closures around it are satisfied. One edge per convergence, worst first, so a
        wrong edge's pull on its neighbours is gone before they are judged.
        """
        cfg = self.config
        index, err = self.graph.robust_residuals()
        if len(index) == 0:
            return False
        excess = np.maximum(
            np.hypot(err[:, 0], err[:, 1]) / cfg.loop_reject_m,
            np.abs(err[:, 2]) / cfg.loop_reject_rad,
        )
        worst = int(np.argmax(excess))
        if excess[worst] <= 1.0:
            return False
        self.graph.remove_edge(int(index[worst]))
        self.loop_closures -= 1
        self.rejected_closures += 1
        return True

    def _loop_windows(self, k: int) -> tuple[float, float]:
        """Search window (m, rad) for keyframe ``k``: grows with the path since the last closure.

        Right after a closure the pose is anchored and a small window suffices (and rarely
        aliases); after a long open stretch the drift may be metres and tens of degrees.
        """
        cfg = self.config
        open_path = self._kf_path[k] - self._path_at_last_closure
        lin = min(
            cfg.loop_linear_window_max_m,
            cfg.loop_linear_window_m + cfg.loop_linear_window_per_m * open_path,
        )
        ang = min(
            cfg.loop_angular_window_max_rad,
            cfg.loop_angular_window_rad + cfg.loop_angular_window_per_m * open_path,
        )
        return lin, ang

    def _attempt_spacing(self, linear_window: float) -> float:
        """Path between loop-closure attempts: a wide window costs more and its answer moves
        less between neighbouring keyframes, so it is tried less often."""
        return max(self.config.loop_attempt_every_m, linear_window / 4.0)

    def _try_loop_closure(self, k: int) -> None:
        """Match keyframe ``k`` against the submap around the nearest path-distant keyframe."""
        cfg = self.config
        last_eligible = k - cfg.local_map_keyframes
        path_now = self._kf_path[k]
        lin_win, ang_win = self._loop_windows(k)
        if last_eligible <= 0 or path_now - self._path_at_last_attempt < self._attempt_spacing(
            lin_win
        ):
            return
        poses = self.graph.poses
        paths = np.asarray(self._kf_path[:last_eligible])
        d = np.hypot(*(poses[:last_eligible, :2] - poses[k, :2]).T)
        ok = (path_now - paths > cfg.loop_min_path_m) & (d < cfg.loop_search_radius_m + lin_win)
        if not ok.any():
            return
        j = int(np.flatnonzero(ok)[np.argmin(d[ok])])
        self.loop_attempts += 1
        self._path_at_last_attempt = path_now
        lo = max(0, j - cfg.loop_submap_half)
        hi = min(last_eligible, j + cfg.loop_submap_half + 1)
        pts, nrm = self._submap(range(lo, hi))
        target = PointLineMap(pts, nrm)
        query = self._loop_query(k)
        if len(target) == 0 or len(query) < cfg.loop_min_inliers:
            return
        res = cfg.loop_field_resolution_m
        field = LikelihoodField(pts, res, res, lin_win + 1.0)
        found = correlative_search(
            field,
            self._search_points(query, cfg.loop_search_max_points),
            poses[k],
            lin_win,
            ang_win,
            math.radians(1.0),
            ambiguity=cfg.loop_max_ambiguity,
        )
        if found.runner_up > cfg.loop_max_ambiguity * found.score:
            return
        result = icp(target, query, found.pose)
        if self._loop_match_ok(result):
            self._accept_if_consistent(_LoopMatch(j, k, between(poses[j], result.pose), path_now))

    def _accept_if_consistent(self, match: _LoopMatch) -> None:
        """Add ``match`` (and the earlier match it agrees with) once two matches agree.

        A single verified match can still be wrong where places look alike (doors along a
        corridor). Two matches from keyframes whose queries share no scan agree when the cycle
        k1 → j1 → j2 → k2 → k1 closes: it uses only the local chains j1…j2 and k1…k2, which
        are accurate however large the drift between the two visits. Wrong matches rarely
        agree with each other, so the pair test removes them before they reach the graph.
        """
        cfg = self.config
        # The partner is one of the last few attempts, however far apart wide windows put them.
        lin_win, _ = self._loop_windows(match.k)
        reach = max(cfg.loop_consistency_path_m, 4.0 * self._attempt_spacing(lin_win))
        horizon = match.path_m - reach
        self._recent_matches = [m for m in self._recent_matches if m.path_m >= horizon]
        poses = self.graph.poses
        agreeing = []
        for other in self._recent_matches:
            if other.k > match.k - cfg.loop_query_keyframes:
                continue  # the two queries share keyframes: their errors would agree too
            # Pose of k2 in k1 through the loop: k1 → j1 (z1⁻¹), j1 → j2 (map), j2 → k2 (z2).
            k1_to_j1 = between(other.z, np.zeros(3))
            via_j = compose(compose(k1_to_j1, between(poses[other.j], poses[match.j])), match.z)
            direct = between(poses[other.k], poses[match.k])
            err = between(direct, via_j)
            if np.hypot(err[0], err[1]) < cfg.loop_consistency_m and abs(err[2]) < (
                cfg.loop_consistency_rad
            ):
                agreeing.append(other)
        self._recent_matches.append(match)
        if not agreeing:
            return
        for m in [*agreeing, match]:
            if not m.added:
                self.graph.add_edge(m.j, m.k, m.z, self._loop_info, robust=True)
                m.added = True
                self.loop_closures += 1
        self._path_at_last_closure = match.path_m
        self._gn_pending = cfg.gn_max_iterations

    def _loop_match_ok(self, result: MatchResult) -> bool:
        cfg = self.config
        if result.fitness < cfg.loop_min_fitness or result.inliers < cfg.loop_min_inliers:
            return False
        min_eig = float(np.linalg.eigvalsh(result.hessian[:2, :2])[0])
        return min_eig >= cfg.loop_min_constraint * result.inliers
