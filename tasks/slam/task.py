"""The SLAM task: one laser scan in, one pose out; the map is written when the stream ends."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ctxtask.protocol import Sample
from ctxtask.task import Task
from slam.mapper import Slam, SlamConfig
from slam.occupancy import build_grid


class SlamTask(Task):
    """2D graph SLAM over ``scan`` samples.

    A scan's meta gives its geometry (``angle_min``, ``angle_increment``, ``max_range``), the
    base's wheel odometry (``odom``; None or absent: the robot has none, or its feed fell
    silent, and the scan is matched from the last motion) and, when the laser is not at the
    base's centre, its mount (``laser_mount``: x, y in m and yaw in rad on the base). Poses
    are the base's.

    Config keys: ``map_out`` (folder for ``map.png`` + ``map.yaml`` at the end of a stream),
    ``map_resolution`` (m per cell, default 0.05) and ``slam`` (overrides of
    :class:`~slam.mapper.SlamConfig` fields, for experiments).
    """

    name = "slam"

    def __init__(self) -> None:
        self._config: dict[str, Any] = {}
        self._slam_config = SlamConfig()
        self.slam = Slam(self._slam_config)
        self._cpu_s = 0.0

    def setup(self, config: dict[str, Any]) -> None:
        self._config = dict(config)
        overrides = self._config.get("slam") or {}
        unknown = set(overrides) - set(SlamConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown slam config key(s): {', '.join(sorted(unknown))}")
        self._slam_config = SlamConfig(**overrides)

    def initialise(self) -> None:
        self.slam = Slam(self._slam_config)
        self._cpu_s = 0.0

    def update(self, sample: Sample) -> dict[str, Any]:
        if sample.kind != "scan":
            raise ValueError(f"slam task takes 'scan' samples, got {sample.kind!r}")
        t0 = time.process_time()
        meta = sample.meta
        odom = meta.get("odom")
        estimate = self.slam.process(
            sample.array(),
            None if odom is None else np.asarray(odom, dtype=np.float64),
            float(meta["angle_min"]),
            float(meta["angle_increment"]),
            float(meta["max_range"]),
            meta.get("laser_mount", (0.0, 0.0, 0.0)),
        )
        self._cpu_s += time.process_time() - t0
        pose = [round(float(v), 4) for v in estimate.pose]
        if estimate.still:
            # Standing still: the scan was not matched (the host counts this as shed work).
            return {"shed": "still", "pose": pose, "t_log": meta.get("t_log")}
        return {
            "pose": pose,
            "t_log": meta.get("t_log"),
            "loop_closures": self.slam.loop_closures,
        }

    def terminate(self) -> dict[str, Any]:
        t0 = time.process_time()
        self.slam.finish()
        summary: dict[str, Any] = {
            "scans": self.slam.num_scans,
            "keyframes": len(self.slam.keyframes),
            "loop_closures": self.slam.loop_closures,
            "loop_attempts": self.slam.loop_attempts,
            "rejected_closures": self.slam.rejected_closures,
            "still_scans": self.slam.still_scans,
            "map": None,
        }
        map_out = self._config.get("map_out")
        if map_out and self.slam.keyframes:
            grid = build_grid(
                self.slam.graph.poses,
                [scan.points for scan in self.slam.keyframes],
                float(self._config.get("map_resolution", 0.05)),
            )
            summary["map"] = str(grid.save(Path(map_out)))
        self._cpu_s += time.process_time() - t0
        summary["cpu_s"] = round(self._cpu_s, 3)
        return summary
