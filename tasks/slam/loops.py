"""Loop closing: find a revisited place, measure which directions the match fixes, and add
only closures that another closure agrees with and the optimised graph does not contradict.

A new keyframe and the few before it (the *query*) are matched against every path-distant
keyframe around its estimated pose (the *target*), by a branch-and-bound correlative search
over a window of a few σ of the pose relative to that place (from the graph's marginal
covariances, so it is wide after a long stretch without closures), then ICP. The match's
covariance is the spread of the near-optimal poses of the search plus the ICP's own: long
along a corridor, small across it. So a corridor closure fixes the lateral offset and the
heading and leaves the along-corridor position to odometry and other closures, instead of
being refused (Olson 2009 and Karto read the covariance from the search's response the same
way). A match must leave its keyframe where the graph allows relative to the visit it lands
on (the window is sized on the keyframe nearest the estimate, but the target holds every
visit around it). It enters the graph once a second match, whose query shares no scan with it,
agrees with it within their covariances (chi-square test on the cycle they close); after the
optimisation converges, a closure whose residual is improbable under its own covariance is
removed (worst first), and loop edges carry dynamic covariance scaling (Agarwal et al. 2013).

When that search finds nothing, place recognition (``slam.places``) proposes the older
keyframe whose surroundings look most alike, wherever the graph puts it: after a long stretch
without closures the drift can exceed any window. The proposal is searched for only if the
graph's own (uncapped) uncertainty between the two keyframes allows the move, and its match
goes through the same checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ctxtask.se2 import between, compose, rotate_vectors, transform_points, wrap
from slam.matching import LikelihoodField, MatchResult, PointLineMap, correlative_search, icp
from slam.places import PlaceIndex, trail
from slam.posegraph import PoseGraph
from slam.scan import ScanPoints

if TYPE_CHECKING:
    from slam.mapper import SlamConfig


@dataclass
class LoopMatch:
    j: int  # older keyframe nearest to where the match put k
    k: int  # newer keyframe, the last of the query
    z: np.ndarray  # measured pose of k in the frame of j
    cov: np.ndarray  # (3, 3) covariance of z, in the frame of j
    path_m: float  # path length at keyframe k
    added: bool = False


def _rotation_block(theta: float) -> np.ndarray:
    """3×3 map of a pose covariance from a frame rotated by ``theta`` into its parent."""
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def edge_information(match: LoopMatch) -> np.ndarray:
    """Information of the loop edge j → k, in the frame the pose graph measures its error:
    the measured pose of k (``z``)."""
    rot = _rotation_block(-float(match.z[2]))
    return np.linalg.inv(rot @ match.cov @ rot.T)


def _lever(delta: np.ndarray) -> np.ndarray:
    """Jacobian of ``a ⊕ b`` with respect to ``a`` (map frame) when b's position is
    ``delta`` away from a's: a turn of a swings b around it."""
    return np.array([[1.0, 0.0, -delta[1]], [0.0, 1.0, delta[0]], [0.0, 0.0, 1.0]])


def submap(
    poses: np.ndarray, keyframes: list[ScanPoints], indices: np.ndarray | range
) -> tuple[np.ndarray, np.ndarray]:
    """Points and normals of the given keyframes in the map frame."""
    pts, nrm = [], []
    for idx in indices:
        pose = poses[idx]
        sc = keyframes[idx]
        pts.append(transform_points(pose, sc.points))
        nrm.append(rotate_vectors(pose[2], sc.normals))
    return np.concatenate(pts), np.concatenate(nrm)


def thin_points(points: np.ndarray, limit: int) -> np.ndarray:
    """Every n-th point, so that at most about ``limit`` remain (search cost)."""
    stride = max(1, math.ceil(len(points) / limit))
    return points[::stride]


class LoopCloser:
    """Loop closing over a growing pose graph whose nodes are ``keyframes``."""

    def __init__(
        self,
        config: SlamConfig,
        graph: PoseGraph,
        keyframes: list[ScanPoints],
        keyframe_path: list[float],
    ) -> None:
        self.config = config
        self.graph = graph
        self.keyframes = keyframes
        self.keyframe_path = keyframe_path  # path length at each keyframe
        self.closures = 0
        self.attempts = 0
        self.rejected = 0
        self._recent: list[LoopMatch] = []
        self._path_at_last_attempt = -math.inf
        self._last_place = -(10**9)  # keyframe of the last place search
        self._spacing = config.loop_attempt_every_m  # path between attempts, from the window
        self.places = PlaceIndex(
            config.place_rings, config.place_sectors, config.place_radius_m, config.place_candidates
        )

    # ----------------------------------------------------------------------------- windows
    def relative_covariance(self, j: int, k: int) -> np.ndarray:
        """Covariance (map-aligned) of the pose of ``k`` relative to ``j``, from the graph.

        Marginals of j and of the newest factored node m come from the graph's factorisation;
        the chain of scan-matched edges from m to k (no closure since, or the graph would have
        been re-factored) is propagated on top. So the uncertainty between two places is
        what every edge between them says, not the path since the last closure anywhere.
        The chain leaves out the odometry edges beside it (the factorisation's marginals hold
        them): their σ is learned from medians, and with them the window after a long stretch
        without a closure would be narrower than the drift it has to cover.
        """
        cfg = self.config
        poses = self.graph.poses
        m = self.graph.factored_nodes - 1
        if j > m or k - m > cfg.loop_chain_max_keyframes:
            m = k
        joint = self.graph.joint_covariance([j, m])
        seq = np.diag([cfg.seq_sigma_xy_m**2, cfg.seq_sigma_xy_m**2, cfg.seq_sigma_th_rad**2])
        chain = np.zeros((3, 3))
        for i in range(m, k):
            jac = _lever(poses[i + 1] - poses[i])
            rot = _rotation_block(float(poses[i, 2]))
            chain = jac @ chain @ jac.T + rot @ seq @ rot.T
        to_k = _lever(poses[k] - poses[m])
        cov_k = to_k @ joint[3:, 3:] @ to_k.T + chain
        cov_jk = joint[:3, 3:] @ to_k.T
        from_j = _lever(poses[k] - poses[j])
        return from_j @ joint[:3, :3] @ from_j.T + cov_k - from_j @ cov_jk - cov_jk.T @ from_j.T

    def windows(self, j: int, k: int) -> tuple[float, float]:
        """Search window (m, rad) for matching keyframe ``k`` near keyframe ``j``: a few σ
        of their relative pose, within the configured bounds."""
        cfg = self.config
        cov = self.relative_covariance(j, k)
        sigma_m = math.sqrt(float(np.linalg.eigvalsh(cov[:2, :2])[1]))
        sigma_rad = math.sqrt(float(cov[2, 2]))
        lin = min(
            max(cfg.loop_window_sigmas * sigma_m, cfg.loop_linear_window_m),
            cfg.loop_linear_window_max_m,
        )
        ang = min(
            max(cfg.loop_window_sigmas * sigma_rad, cfg.loop_angular_window_rad),
            cfg.loop_angular_window_max_rad,
        )
        return lin, ang

    def _attempt_spacing(self, linear_window: float) -> float:
        """Path between attempts: a wide window costs more and its answer moves less between
        neighbouring keyframes, so it is tried less often."""
        return max(self.config.loop_attempt_every_m, linear_window / 4.0)

    # ----------------------------------------------------------------------------- matching
    def try_close(self, k: int) -> bool:
        """Match keyframe ``k`` against the path-distant keyframes around it, then against
        the place its surroundings look like; True when a closure was added to the graph (the
        caller then re-optimises)."""
        cfg = self.config
        self._describe(k)
        last_eligible = k - cfg.local_map_keyframes
        path_now = self.keyframe_path[k]
        if last_eligible <= 0 or path_now - self._path_at_last_attempt < self._spacing:
            return False
        poses = self.graph.poses
        paths = np.asarray(self.keyframe_path[:last_eligible])
        distant = path_now - paths > cfg.loop_min_path_m
        searched = np.zeros(0, dtype=int)
        d = np.hypot(*(poses[:last_eligible, :2] - poses[k, :2]).T)
        reach = distant & (d < cfg.loop_search_radius_m + cfg.loop_linear_window_max_m)
        if reach.any():
            nearest = int(np.flatnonzero(reach)[np.argmin(d[reach])])
            lin_win, ang_win = self.windows(nearest, k)
            self._spacing = self._attempt_spacing(lin_win)
            self._path_at_last_attempt = path_now
            if d[nearest] <= cfg.loop_search_radius_m + lin_win:
                searched = np.flatnonzero(distant & (d < cfg.loop_target_radius_m + lin_win))
                floor = self._window_floor()
                if self._verify(
                    k, poses[k], searched, lin_win, ang_win, cfg.loop_min_fitness, floor
                ):
                    return True
        return self._try_place(k, paths, distant, searched)

    def _try_place(
        self, k: int, paths: np.ndarray, distant: np.ndarray, searched: np.ndarray
    ) -> bool:
        """Match keyframe ``k`` where its surroundings look like an older keyframe's, wherever
        the graph puts that place: after a long stretch without closures the drift can exceed
        any window around the estimate (fr-clinic returns to its start 13-40 m off)."""
        cfg = self.config
        # Trails that share no keyframe with the query's, outside the search just made.
        eligible = self.keyframe_path[k] - paths > cfg.loop_min_path_m + cfg.place_trail_m
        eligible[searched] = False
        # One query apart: two consecutive place matches share no scan and can confirm each
        # other in the pair test.
        if k - self._last_place < cfg.loop_query_keyframes:
            return False
        found = self.places.best(k, np.flatnonzero(eligible))
        if found is None or found.distance > cfg.place_max_distance:
            return False
        poses = self.graph.poses
        j = found.keyframe
        guess = np.array([poses[j, 0], poses[j, 1], wrap(poses[j, 2] + found.heading_rad)])
        ang_win = 2.0 * math.pi / cfg.place_sectors
        # The graph must allow the move: a place that looks alike (a repeated room, a
        # parallel corridor) where the graph is sure of k relative to j is not this place.
        # Checked before the search too, which it saves.
        if not self._plausible(j, k, guess, self._place_floor(ang_win)):
            return False
        self._last_place = k
        if self._verify_place(k, guess, distant, ang_win):
            return True
        # A revisit driven the other way matches near the bar (fitness 0.4-0.6), so whether
        # a later place search gives the pair test its second match is a draw (fr-clinic's
        # return closed at an odometry margin of 2, not at 1.8 or 2.2). The keyframes just
        # before the query (no scan shared) are searched where this match puts them instead.
        # (A match that was checked and found no partner is the last of the recent ones.)
        if not self._recent or self._recent[-1].k != k:
            return False
        lone = self._recent[-1]
        before = k - cfg.loop_query_keyframes  # >= 0: try_close needs k > local_map_keyframes
        matched_k = compose(poses[lone.j], lone.z)
        return self._verify_place(
            before, compose(matched_k, between(poses[k], poses[before])), distant, ang_win
        )

    def _window_floor(self) -> np.ndarray:
        """σ a windowed match may move beyond the graph's uncertainty: the smallest window."""
        cfg = self.config
        return np.array(
            [cfg.loop_linear_window_m, cfg.loop_linear_window_m, cfg.loop_angular_window_rad]
        )

    def _place_floor(self, ang_win: float) -> np.ndarray:
        """σ a place match may move beyond the graph's uncertainty: the place window."""
        return np.array([self.config.place_window_m, self.config.place_window_m, ang_win])

    def _verify_place(self, k: int, guess: np.ndarray, distant: np.ndarray, ang_win: float) -> bool:
        """Search for the query of ``k`` around ``guess`` among the ``distant`` keyframes near
        it, with the place window and fitness bar."""
        cfg = self.config
        d = np.hypot(*(self.graph.poses[: len(distant), :2] - guess[:2]).T)
        near = np.flatnonzero(distant & (d < cfg.loop_target_radius_m + cfg.place_window_m))
        return self._verify(
            k,
            guess,
            near,
            cfg.place_window_m,
            ang_win,
            cfg.place_min_fitness,
            self._place_floor(ang_win),
        )

    def _plausible(self, j: int, k: int, pose: np.ndarray, floor: np.ndarray) -> bool:
        """Whether the graph allows keyframe ``k`` at ``pose``: the move from its estimate is
        within the graph's uncertainty of k relative to ``j`` (uncapped, plus ``floor`` σ for
        what the search itself may move; χ² test, 99 %, 3 dof)."""
        move = pose - self.graph.poses[k]
        move[2] = wrap(move[2])
        cov = self.relative_covariance(j, k) + np.diag(floor**2)
        return float(move @ np.linalg.solve(cov, move)) <= self.config.loop_consistency_chi2

    def _describe(self, k: int) -> None:
        """Add the place descriptor of every keyframe up to ``k``: the points of its trail (the
        keyframes of the last ``place_trail_m`` of path) in its frame."""
        poses = self.graph.poses
        paths = np.asarray(self.keyframe_path)
        while len(self.places) <= k:
            i = len(self.places)
            self.places.add(
                np.concatenate(
                    [
                        transform_points(between(poses[i], poses[t]), self.keyframes[t].points)
                        for t in trail(paths, i, self.config.place_trail_m)
                    ]
                )
            )

    def _verify(
        self,
        k: int,
        guess: np.ndarray,
        near: np.ndarray,
        lin_win: float,
        ang_win: float,
        min_fitness: float,
        floor: np.ndarray,
    ) -> bool:
        """Search for the query of ``k`` around ``guess`` in the keyframes ``near``, check the
        match (ICP fitness at least ``min_fitness``, plausible to the graph with ``floor``, see
        :meth:`_plausible`), and keep it once another agrees with it."""
        cfg = self.config
        poses = self.graph.poses
        if len(near) == 0:
            return False
        self.attempts += 1
        if len(near) > cfg.loop_target_keyframes:
            pick = np.linspace(0, len(near) - 1, cfg.loop_target_keyframes).round()
            near = near[pick.astype(int)]
        query = self._query(k)
        if len(query) < cfg.loop_min_inliers:
            return False
        target = self._target(near, transform_points(guess, query), lin_win)
        if target is None:
            return False
        res = cfg.loop_field_resolution_m
        field = LikelihoodField(target.points, res, res, 1.0)
        found = correlative_search(
            field,
            thin_points(query, cfg.loop_search_max_points),
            guess,
            lin_win,
            ang_win,
            math.radians(1.0),
            near_ratio=cfg.loop_near_ratio,
        )
        if found.crowded:
            return False  # too much of the window fits: the place repeats
        result = icp(target, query, found.pose)
        if result.fitness < min_fitness or result.inliers < cfg.loop_min_inliers:
            return False
        cov = self._match_covariance(found.spread, result)
        if cov is None:
            return False
        j = int(near[np.argmin(np.hypot(*(poses[near, :2] - result.pose[:2]).T))])
        # The window is a few σ of k relative to the keyframe nearest its estimate, but the
        # target holds every visit around it, and the match can land on one the graph is far
        # surer of: MIT Killian's corridor, driven the other way, fits 8.5 m along at the edge
        # of an 8 m window where the graph puts k within 2 m of the visit it lands on (χ² 70-80,
        # docs/slam.md, round 8).
        if not self._plausible(j, k, result.pose, floor):
            return False
        rot = _rotation_block(-float(poses[j, 2]))
        path_now = self.keyframe_path[k]
        match = LoopMatch(j, k, between(poses[j], result.pose), rot @ cov @ rot.T, path_now)
        return self._accept_if_consistent(match)

    def _query(self, k: int) -> np.ndarray:
        """Points of keyframe ``k`` and the few before it, in k's frame.

        One 180-beam scan outdoors may hold 80 returns that fit many places; the short chain
        before it is accurate (scan matching over a few metres) and gives the match the shape
        of the place instead of one view of it.
        """
        first = max(0, k - self.config.loop_query_keyframes + 1)
        pose_k = self.graph.poses[k]
        return np.concatenate(
            [
                transform_points(between(pose_k, self.graph.poses[i]), self.keyframes[i].points)
                for i in range(first, k + 1)
            ]
        )

    def _target(
        self, indices: np.ndarray, query_world: np.ndarray, window_m: float
    ) -> PointLineMap | None:
        """Map points of ``indices`` where the query can land, one per small cell.

        Every path-distant keyframe around the pose takes part, not only one stretch of path:
        a place seen on several visits, or a parallel corridor inside the window, is then in
        the target, so the search sees the alternatives instead of one of them.
        """
        cfg = self.config
        pts, nrm = submap(self.graph.poses, self.keyframes, indices)
        reach = window_m + 1.0
        lo = query_world.min(axis=0) - reach
        hi = query_world.max(axis=0) + reach
        inside = np.all((pts >= lo) & (pts <= hi), axis=1)
        pts, nrm = pts[inside], nrm[inside]
        if len(pts) == 0:
            return None
        # One point per cell of the tracking field: fine enough for ICP, and a revisited
        # place seen from many keyframes does not weigh more than once.
        cells = np.floor((pts - lo) / cfg.track_field_resolution_m).astype(np.int64)
        _, first = np.unique(cells[:, 0] * (1 << 32) + cells[:, 1], return_index=True)
        target = PointLineMap(pts[first], nrm[first])
        return target if len(target) else None

    def _match_covariance(self, spread: np.ndarray, result: MatchResult) -> np.ndarray | None:
        """Covariance (map frame) of the matched pose, or None when the place is ambiguous.

        The ICP's Hessian says how precisely the best pose is fixed, plus a floor for what it
        cannot see (map errors, correlated points). The search's near-optimal poses say where
        the match is not determined at all: spread beyond ``loop_distinct_m`` along one axis
        is a corridor (or doors along one), and that axis is left to the rest of the graph;
        spread along both axes, or in heading, is a place that repeats, and the match is
        not used.
        """
        cfg = self.config
        hessian = result.hessian + 1e-6 * np.eye(3)
        cov = np.linalg.inv(hessian) * cfg.loop_point_sigma_m**2
        cov += np.diag([cfg.loop_sigma_xy_m**2, cfg.loop_sigma_xy_m**2, cfg.loop_sigma_th_rad**2])
        values, vectors = np.linalg.eigh(spread[:2, :2])
        if values[0] > cfg.loop_distinct_m**2 or spread[2, 2] > cfg.loop_distinct_rad**2:
            return None
        if values[1] > cfg.loop_distinct_m**2:
            cov[:2, :2] += cfg.loop_open_sigma_m**2 * np.outer(vectors[:, 1], vectors[:, 1])
        return cov

    # ----------------------------------------------------------------------------- verification
    def _world_covariance(self, match: LoopMatch) -> np.ndarray:
        rot = _rotation_block(float(self.graph.poses[match.j, 2]))
        return rot @ match.cov @ rot.T

    def _agree(self, first: LoopMatch, second: LoopMatch) -> bool:
        """Whether two matches agree: the pose of k2 that match 1 predicts through the local
        chain k1 → k2 against the pose match 2 measures, weighed by both covariances."""
        cfg = self.config
        poses = self.graph.poses
        measured_1 = compose(poses[first.j], first.z)
        predicted = compose(measured_1, between(poses[first.k], poses[second.k]))
        measured_2 = compose(poses[second.j], second.z)
        err = measured_2 - predicted
        err[2] = wrap(err[2])
        jac = _lever(predicted - measured_1)
        chain_m = abs(self.keyframe_path[second.k] - self.keyframe_path[first.k])
        chain = np.diag(
            [
                (cfg.loop_chain_sigma_per_m * chain_m) ** 2,
                (cfg.loop_chain_sigma_per_m * chain_m) ** 2,
                (cfg.loop_chain_sigma_rad_per_m * chain_m) ** 2,
            ]
        )
        cov = jac @ self._world_covariance(first) @ jac.T + self._world_covariance(second) + chain
        return float(err @ np.linalg.solve(cov, err)) < cfg.loop_consistency_chi2

    def _accept_if_consistent(self, match: LoopMatch) -> bool:
        """Add ``match`` (and the earlier matches it agrees with) once two matches agree.

        A single verified match can still be wrong where places look alike. Two matches from
        keyframes whose queries share no scan rarely agree by chance, so the pair test removes
        wrong matches before they reach the graph.
        """
        cfg = self.config
        # The partner is one of the last few attempts, however far apart wide windows put them.
        reach = max(cfg.loop_consistency_path_m, 4.0 * self._spacing)
        horizon = match.path_m - reach
        self._recent = [m for m in self._recent if m.path_m >= horizon]
        agreeing = [
            other
            for other in self._recent
            # Queries that share keyframes would share their errors too.
            if abs(other.k - match.k) >= cfg.loop_query_keyframes and self._agree(other, match)
        ]
        self._recent.append(match)
        if not agreeing:
            return False
        for m in [*agreeing, match]:
            if not m.added:
                self.graph.add_edge(m.j, m.k, m.z, edge_information(m), robust=True)
                m.added = True
                self.closures += 1
        return True

    def reject_worst(self) -> bool:
        """Remove the loop edge the optimised graph disagrees with most, if improbable.

        A wrong closure that passed every match test still cannot bend the rest of the graph
        onto itself: at the optimum it keeps a residual far outside its own covariance, while
        the right closures around it are satisfied. One edge per convergence, worst first, so
        a wrong edge's pull on its neighbours is gone before they are judged.
        """
        index, err = self.graph.robust_residuals()
        if len(index) == 0:
            return False
        info = self.graph.information(index)
        chi2 = np.einsum("ei,eij,ej->e", err, info, err)
        worst = int(np.argmax(chi2))
        if chi2[worst] <= self.config.loop_reject_chi2:
            return False
        self.graph.remove_edge(int(index[worst]))
        self.closures -= 1
        self.rejected += 1
        return True
