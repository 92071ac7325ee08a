"""Live sensor sources: devices on the robot, read on their own threads (see
:class:`ctxrobot.streams.source.LiveSource`).

Every live source also has ``attach(bus)``, which the runtime calls before ``start``: through
it a source publishes its ``source.state`` changes, and ``pose_odometry`` hears the task
results it turns into odometry.
"""

from __future__ import annotations

from typing import Any

from ctxrobot.streams.source import LiveSource


def build_live_source(name: str, spec: Any) -> LiveSource:
    """The live source a validated scenario entry describes.

    Drivers are imported here, on demand: a robot without a microphone needs no PortAudio.
    """
    if spec.kind == "rplidar":
        from ctxrobot.streams.live.rplidar import RplidarSource

        return RplidarSource(name, spec)
    if spec.kind == "camera":
        from ctxrobot.streams.live.camera import CameraSource

        return CameraSource(name, spec)
    if spec.kind == "microphone":
        from ctxrobot.streams.live.microphone import MicrophoneSource

        return MicrophoneSource(name, spec)
    if spec.kind == "pose_odometry":
        from ctxrobot.streams.live.odometry import PoseOdometrySource

        return PoseOdometrySource(name, spec.task)
    raise ValueError(f"source {name!r}: unknown kind {spec.kind!r}")
