"""The Raspberry Pi example (config/examples/pi-robot.yaml) validates and builds the live
sources it names, without any device present."""

from __future__ import annotations

from ctxrobot.manifest.schema import load_manifest
from ctxrobot.streams.live.camera import CameraSource
from ctxrobot.streams.live.microphone import MicrophoneSource
from ctxrobot.streams.live.odometry import PoseOdometrySource
from ctxrobot.streams.live.rplidar import RplidarSource
from ctxrobot.streams.replay import build_sources
from tests.conftest import REPO


def test_the_pi_robot_example_builds_its_live_sources() -> None:
    manifest = load_manifest(REPO / "config" / "examples" / "pi-robot.yaml")
    sources = build_sources(manifest.scenario, manifest.data_dir)
    assert sources.replay == []
    kinds = {source.name: type(source) for source in sources.live}
    assert kinds == {
        "lidar": RplidarSource,
        "camera": CameraSource,
        "mic": MicrophoneSource,
        "slam_pose": PoseOdometrySource,
    }
    lidar = next(s for s in sources.live if s.name == "lidar")
    assert lidar.odometry is not None and lidar.odometry.where == "udp 127.0.0.1:5600"  # type: ignore[attr-defined]
