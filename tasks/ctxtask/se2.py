"""SE(2) pose algebra on ``[x, y, theta]`` arrays (single poses or stacks of shape (N, 3))."""

from __future__ import annotations

import numpy as np


def wrap(angle: np.ndarray | float) -> np.ndarray | float:
    """Angle(s) wrapped to [-π, π)."""
    return (np.asarray(angle) + np.pi) % (2.0 * np.pi) - np.pi


def compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a ⊕ b``: pose ``b`` (expressed in frame ``a``) in a's parent frame."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    c, s = np.cos(a[..., 2]), np.sin(a[..., 2])
    return np.stack(
        [
            a[..., 0] + c * b[..., 0] - s * b[..., 1],
            a[..., 1] + s * b[..., 0] + c * b[..., 1],
            wrap(a[..., 2] + b[..., 2]),
        ],
        axis=-1,
    )


def between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a⁻¹ ⊕ b``: pose ``b`` expressed in the frame of ``a``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    c, s = np.cos(a[..., 2]), np.sin(a[..., 2])
    dx = b[..., 0] - a[..., 0]
    dy = b[..., 1] - a[..., 1]
    return np.stack([c * dx + s * dy, -s * dx + c * dy, wrap(b[..., 2] - a[..., 2])], axis=-1)


def transform_points(pose: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (N, 2) from the frame of ``pose`` into its parent frame."""
    c, s = np.cos(pose[2]), np.sin(pose[2])
    rot = np.array([[c, -s], [s, c]])
    return points @ rot.T + pose[:2]


def rotate_vectors(theta: float, vectors: np.ndarray) -> np.ndarray:
    """Rotate direction vectors (N, 2) by ``theta`` (normals move with their points)."""
    c, s = np.cos(theta), np.sin(theta)
    return vectors @ np.array([[c, -s], [s, c]]).T
