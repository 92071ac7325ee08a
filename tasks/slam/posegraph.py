"""2D pose graph with sparse Gauss-Newton and dynamic covariance scaling for loop edges."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import SuperLU, splu

from ctxtask.se2 import wrap

# Weight of the prior that pins node 0 (the map frame is defined by the first pose).
_ANCHOR_INFO = 1e8


_R3 = np.arange(3)


def _block_indices(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the 3x3 blocks (u[e], v[e]) in the 3n x 3n Hessian."""
    rows = np.broadcast_to((3 * u)[:, None, None] + _R3[None, :, None], (len(u), 3, 3))
    cols = np.broadcast_to((3 * v)[:, None, None] + _R3[None, None, :], (len(v), 3, 3))
    return rows.ravel(), cols.ravel()


def _edge_errors(xi: np.ndarray, xj: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``z⁻¹ ⊕ (x_i⁻¹ ⊕ x_j)`` per edge, (m, 3): zero when the poses agree with the edge."""
    ci, si = np.cos(xi[:, 2]), np.sin(xi[:, 2])
    cz, sz = np.cos(z[:, 2]), np.sin(z[:, 2])
    dt = xj[:, :2] - xi[:, :2]
    # Ri^T (tj - ti): translation of x_j in frame i.
    lx = ci * dt[:, 0] + si * dt[:, 1]
    ly = -si * dt[:, 0] + ci * dt[:, 1]
    ex = cz * (lx - z[:, 0]) + sz * (ly - z[:, 1])
    ey = -sz * (lx - z[:, 0]) + cz * (ly - z[:, 1])
    eth = wrap(xj[:, 2] - xi[:, 2] - z[:, 2])
    return np.stack([ex, ey, eth], axis=1)


class PoseGraph:
    """Nodes ``[x, y, θ]`` and relative-pose edges ``z = x_i⁻¹ ⊕ x_j`` with information Ω."""

    def __init__(self, dcs_phi: float) -> None:
        # Dynamic covariance scaling (Agarwal et al. 2013) on robust edges: an edge with
        # χ² ≫ Φ is down-weighted by (2Φ/(Φ+χ²))², so a wrong loop closure cannot drag the map.
        self.dcs_phi = dcs_phi
        self.poses = np.zeros((0, 3))
        self._i: list[int] = []
        self._j: list[int] = []
        self._z: list[np.ndarray] = []
        self._info: list[np.ndarray] = []
        self._robust: list[bool] = []
        self._factor: SuperLU | None = None
        self._factor_nodes = 0  # nodes covered by _factor

    @property
    def num_nodes(self) -> int:
        return len(self.poses)

    def add_node(self, pose: np.ndarray) -> int:
        self.poses = np.vstack([self.poses, np.asarray(pose, dtype=np.float64)[None]])
        return self.num_nodes - 1

    def add_edge(self, i: int, j: int, z: np.ndarray, info: np.ndarray, robust: bool) -> None:
        self._i.append(i)
        self._j.append(j)
        self._z.append(np.asarray(z, dtype=np.float64))
        self._info.append(np.asarray(info, dtype=np.float64))
        self._robust.append(robust)

    @property
    def num_edges(self) -> int:
        return len(self._i)

    def edge_nodes(self, index: int) -> tuple[int, int]:
        """The two nodes edge ``index`` joins."""
        return self._i[index], self._j[index]

    def information(self, indices: np.ndarray) -> np.ndarray:
        """Information matrices (unscaled by the robust kernel) of the given edges, (m, 3, 3)."""
        return np.asarray(self._info)[np.asarray(indices, dtype=int)]

    def remove_edge(self, index: int) -> None:
        """Drop edge ``index`` (a loop closure the rest of the graph disagrees with)."""
        for column in (self._i, self._j, self._z, self._info, self._robust):
            del column[index]

    def robust_residuals(self) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the robust (loop) edges and their errors ``[ex, ey, eθ]`` at the poses."""
        robust = np.flatnonzero(np.asarray(self._robust, dtype=bool))
        if len(robust) == 0:
            return robust, np.zeros((0, 3))
        i = np.asarray(self._i)[robust]
        j = np.asarray(self._j)[robust]
        z = np.asarray(self._z)[robust]
        return robust, _edge_errors(self.poses[i], self.poses[j], z)

    def step(self) -> float:
        """One Gauss-Newton iteration over the whole graph; returns the largest update.

        Each call costs one sparse factorisation (tens of ms for thousands of nodes), which is
        what lets the caller spread an optimisation over several scan updates. The
        factorisation is kept for :meth:`joint_covariance`.
        """
        if self.num_nodes < 2 or not self._i:
            return 0.0
        hess, grad = self._linearise()
        self._factor = splu(hess)
        self._factor_nodes = self.num_nodes
        dx = self._factor.solve(-grad).reshape(-1, 3)
        self.poses = self.poses + dx
        self.poses[:, 2] = wrap(self.poses[:, 2])
        return float(np.abs(dx).max())

    @property
    def factored_nodes(self) -> int:
        """Nodes covered by the kept factorisation (0 before the first)."""
        return self._factor_nodes

    def joint_covariance(self, nodes: list[int]) -> np.ndarray:
        """Joint covariance (3m × 3m, map frame) of the poses of ``nodes`` given every edge.

        Read from the factorisation of the last Gauss-Newton step (closures added since make
        it slightly pessimistic); made afresh when a node is newer than that factorisation.
        """
        if self._factor is None or max(nodes) >= self._factor_nodes:
            hess, _ = self._linearise()
            self._factor = splu(hess)
            self._factor_nodes = self.num_nodes
        basis = np.zeros((3 * self._factor_nodes, 3 * len(nodes)))
        for col, node in enumerate(nodes):
            basis[3 * node + _R3, 3 * col + _R3] = 1.0
        solved = self._factor.solve(basis)
        rows = np.concatenate([3 * node + _R3 for node in nodes])
        return solved[rows]

    def _linearise(self) -> tuple[sp.csc_matrix, np.ndarray]:
        """Gauss-Newton normal equations (Hessian, gradient) at the current poses, with the
        robust kernel's weights and the anchor of node 0."""
        n = self.num_nodes
        i = np.asarray(self._i)
        j = np.asarray(self._j)
        z = np.asarray(self._z)
        info = np.asarray(self._info).copy()
        robust = np.asarray(self._robust)
        xi, xj = self.poses[i], self.poses[j]

        dt = xj[:, :2] - xi[:, :2]
        err = _edge_errors(xi, xj, z)

        chi2 = np.einsum("ei,eij,ej->e", err, info, err)
        scale = np.where(robust, np.minimum(1.0, 2.0 * self.dcs_phi / (self.dcs_phi + chi2)), 1.0)
        info *= (scale**2)[:, None, None]

        m = len(i)
        # Rotation Rz^T Ri^T and its derivative w.r.t. θi, applied to dt.
        c, s = np.cos(xi[:, 2] + z[:, 2]), np.sin(xi[:, 2] + z[:, 2])
        rt = np.zeros((m, 2, 2))
        rt[:, 0, 0], rt[:, 0, 1], rt[:, 1, 0], rt[:, 1, 1] = c, s, -s, c
        drt_dt = np.stack([-s * dt[:, 0] + c * dt[:, 1], -c * dt[:, 0] - s * dt[:, 1]], axis=1)
        a = np.zeros((m, 3, 3))
        b = np.zeros((m, 3, 3))
        a[:, :2, :2] = -rt
        a[:, :2, 2] = drt_dt
        a[:, 2, 2] = -1.0
        b[:, :2, :2] = rt
        b[:, 2, 2] = 1.0

        at_o = np.einsum("eki,ekl->eil", a, info)
        bt_o = np.einsum("eki,ekl->eil", b, info)
        hii = np.einsum("eil,elj->eij", at_o, a)
        hij = np.einsum("eil,elj->eij", at_o, b)
        hjj = np.einsum("eil,elj->eij", bt_o, b)
        gi = np.einsum("eil,el->ei", at_o, err)
        gj = np.einsum("eil,el->ei", bt_o, err)

        parts = [
            (i, i, hii),
            (i, j, hij),
            (j, i, np.transpose(hij, (0, 2, 1))),
            (j, j, hjj),
        ]
        rows, cols, vals = [], [], []
        for u, v, blk in parts:
            r_, c_ = _block_indices(u, v)
            rows.append(r_)
            cols.append(c_)
            vals.append(blk.ravel())
        rows.append(np.arange(3))
        cols.append(np.arange(3))
        vals.append(np.full(3, _ANCHOR_INFO))
        coo = (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols)))
        hess = sp.csc_matrix(coo, shape=(3 * n, 3 * n))
        grad = np.zeros(3 * n)
        np.add.at(grad, (3 * i[:, None] + _R3).ravel(), gi.ravel())
        np.add.at(grad, (3 * j[:, None] + _R3).ravel(), gj.ravel())
        return hess, grad

    def optimise(self, max_iterations: int = 20, tolerance: float = 1e-4) -> int:
        """Iterate to convergence; returns the number of iterations run."""
        for it in range(max_iterations):
            if self.step() < tolerance:
                return it + 1
        return max_iterations
