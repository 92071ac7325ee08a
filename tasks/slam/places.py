"""Place recognition: a rotation-invariant descriptor of the map around each keyframe, so that a
revisit can be proposed where the graph's estimate has drifted too far to look for it.

Each keyframe is described by the points of its own trail (the keyframes of the last
``place_trail_m`` of path, in its frame) on a polar grid of rings × sectors around it: a cell is
1 when a point falls in it (in the spirit of Scan Context, Kim and Kim 2018, on 2D points).
The trail, not the one scan, because a forward-looking 180° scanner sees the place from one
side only: a robot driving back the other way sees the other half, which its old trail saw
on the way there. A heading change rolls the sectors, so two descriptors are compared at every
circular shift of the sectors (one FFT) and the best shift also gives the relative heading.
Each ring's occupancy is rotation invariant and picks the few candidates worth comparing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Keyframes of a trail that describe it (evenly spread): enough to cover the place, few
# enough that describing a keyframe costs well under a millisecond.
_TRAIL_KEYFRAMES = 40


def trail(paths: np.ndarray, keyframe: int, length_m: float) -> np.ndarray:
    """Indices of the keyframes on the last ``length_m`` of path up to ``keyframe``, at most
    ``_TRAIL_KEYFRAMES`` of them; ``paths`` is the path length at each keyframe."""
    first = int(np.searchsorted(paths[: keyframe + 1], paths[keyframe] - length_m))
    count = min(_TRAIL_KEYFRAMES, keyframe - first + 1)
    return np.unique(np.linspace(first, keyframe, count).round().astype(int))


@dataclass(frozen=True)
class PlaceMatch:
    keyframe: int  # the older keyframe whose surroundings look like the query's
    distance: float  # 0 (same) … 1 (nothing in common): mean cosine distance of the sectors
    heading_rad: float  # query heading − candidate heading that aligns the two


class PlaceIndex:
    """Descriptors of every keyframe, and the nearest ones to a query."""

    def __init__(self, rings: int, sectors: int, radius_m: float, candidates: int) -> None:
        self.rings = rings
        self.sectors = sectors
        self.radius_m = radius_m
        self.candidates = candidates  # compared in full after the ring prefilter
        self._spectra: list[np.ndarray] = []  # FFT over sectors of the column-normalised grid
        self._occupied: list[np.ndarray] = []  # FFT over sectors of "column not empty"
        self._keys = np.zeros((64, rings))  # occupancy per ring, one row per keyframe
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, points: np.ndarray) -> None:
        """Describe the next keyframe from ``points`` in its own frame."""
        grid = self._grid(points)
        norms = np.linalg.norm(grid, axis=0)
        unit = grid / np.maximum(norms, 1e-12)
        self._spectra.append(np.fft.rfft(unit, axis=1))
        self._occupied.append(np.fft.rfft((norms > 0).astype(np.float64)))
        if self._count == len(self._keys):
            self._keys = np.concatenate([self._keys, np.zeros_like(self._keys)])
        self._keys[self._count] = grid.mean(axis=1)
        self._count += 1

    def best(self, query: int, eligible: np.ndarray) -> PlaceMatch | None:
        """The eligible keyframe (indices) whose descriptor is nearest to keyframe ``query``'s."""
        if len(eligible) == 0 or not self._keys[query].any():
            return None
        gaps = np.abs(self._keys[eligible] - self._keys[query]).sum(axis=1)
        picked = eligible[np.argsort(gaps)[: self.candidates]]
        spectra = np.stack([self._spectra[i] for i in picked])
        occupied = np.stack([self._occupied[i] for i in picked])
        # Sum over rings and sectors of a[:, c]·b[:, c + s] for every shift s, and the number
        # of sectors non-empty in both, by circular cross-correlation over the sectors.
        similarity = np.fft.irfft(
            (np.conj(self._spectra[query])[None] * spectra).sum(axis=1), self.sectors, axis=1
        )
        shared = np.fft.irfft(np.conj(self._occupied[query])[None] * occupied, self.sectors)
        cosine = similarity / np.maximum(np.round(shared), 1.0)
        row, shift = np.unravel_index(int(np.argmax(cosine)), cosine.shape)
        return PlaceMatch(
            int(picked[row]),
            float(1.0 - cosine[row, shift]),
            float(2.0 * math.pi * shift / self.sectors),
        )

    def _grid(self, points: np.ndarray) -> np.ndarray:
        ranges = np.hypot(points[:, 0], points[:, 1])
        inside = ranges < self.radius_m
        ring = (ranges[inside] * (self.rings / self.radius_m)).astype(np.int64)
        bearing = np.arctan2(points[inside, 1], points[inside, 0])
        sector = np.floor(bearing * (self.sectors / (2.0 * math.pi))).astype(np.int64)
        grid = np.zeros((self.rings, self.sectors))
        grid[np.minimum(ring, self.rings - 1), sector % self.sectors] = 1.0
        return grid
