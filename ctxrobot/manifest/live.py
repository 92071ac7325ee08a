"""Schema of the live sensor sources a scenario may name (a robot's own devices).

Each is usable wherever a replay source is: ``camera`` where ``camera_replay`` is,
``microphone`` where ``audio_replay`` is, ``rplidar`` where ``laser_replay`` is.
``pose_odometry`` turns a task's poses (the SLAM task's) into the odometry the motion
context reads, for robots without wheel odometry; a robot that has its own odometry feeds
it to ``rplidar`` (see :class:`OdometryFeed` for the line protocol).

Nothing here checks that a device exists: devices come and go on a robot, so a missing one
is a run-time fault (a ``source.state`` event and a reopen with back-off), not a
validation error.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: A device by name or path (camera URL, sound card name) or by index.
DeviceName = Annotated[str, Field(max_length=4096)]
DeviceIndex = Annotated[int, Field(ge=0, le=63)]

_MODEL = ConfigDict(extra="forbid", strict=True, frozen=True)
# Streams OpenCV's FFmpeg backend opens for IP cameras.
CAMERA_URL_SCHEMES = ("rtsp", "rtsps", "http", "https", "rtmp", "udp", "tcp")
_HOST_PORT = re.compile(r"^(?P<host>[^:\s]+):(?P<port>\d{1,5})$")


class Camera(BaseModel):
    """A live camera: a V4L2 device (path or index), an RTSP/HTTP URL, a video file, or a
    GStreamer ``pipeline`` (how a Pi camera is read through libcamera)."""

    model_config = _MODEL
    kind: Literal["camera"]
    device: Annotated[str, Field(max_length=4096)] | Annotated[int, Field(ge=0, le=63)] | None = (
        Field(
            None,
            description="/dev/video0, an index such as 0, rtsp://… or http://… or a video file",
        )
    )
    pipeline: Annotated[str, Field(max_length=4096)] | None = Field(
        None, description="a GStreamer pipeline, instead of device"
    )
    fps: Annotated[float, Field(ge=1, le=120)] = 30.0
    size: tuple[Annotated[int, Field(ge=16, le=8192)], Annotated[int, Field(ge=16, le=8192)]] = (
        640,
        480,
    )

    @field_validator("size", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: object) -> object:
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError(f"size must be [width, height], e.g. [640, 480], got {value!r}")
        return tuple(value)

    @field_validator("device")
    @classmethod
    def _known_scheme(cls, device: str | int | None) -> str | int | None:
        if isinstance(device, str) and "://" in device:
            scheme = device.split("://", 1)[0].lower()
            if scheme not in CAMERA_URL_SCHEMES:
                raise ValueError(
                    f"camera URL scheme {scheme!r} is not one OpenCV streams; use one of "
                    f"{', '.join(CAMERA_URL_SCHEMES)}"
                )
        return device

    @field_validator("pipeline")
    @classmethod
    def _no_sink(cls, pipeline: str | None) -> str | None:
        if pipeline is not None and "sink" in pipeline.rsplit("!", 1)[-1]:
            raise ValueError(
                "end the pipeline at the last video element, without a sink: ctxrobot adds "
                "`! videoconvert ! video/x-raw,format=BGR ! fdsink` itself"
            )
        return pipeline

    @model_validator(mode="after")
    def _one_input(self) -> Camera:
        if (self.device is None) == (self.pipeline is None):
            raise ValueError("give exactly one of `device:` and `pipeline:`")
        return self


class Microphone(BaseModel):
    """A live microphone through PortAudio (ALSA, PulseAudio, PipeWire), resampled to the
    tasks' 16 kHz mono int16 and cut into ``chunk_ms`` chunks like the replay."""

    model_config = _MODEL
    kind: Literal["microphone"]
    device: Annotated[str, Field(max_length=4096)] | Annotated[int, Field(ge=0, le=63)] | None = (
        Field(None, description="device name (or part of it) or index; default: the system default")
    )
    chunk_ms: Annotated[int, Field(ge=10, le=1000)] = 100


class OdometryFeed(BaseModel):
    """Where a robot's odometry arrives: UDP datagrams or a serial line, one reading a line.

    Line protocol (ASCII, one reading per line, ``#`` starts a comment)::

        x y theta [v w]

    metres, metres, radians in the odometry frame; ``v`` forward speed (m/s) and ``w`` turn
    rate (rad/s) are optional (derived from the poses when absent). A reading is stamped on
    the host's monotonic clock when it arrives.
    """

    model_config = _MODEL
    udp: str | None = Field(
        None, description="HOST:PORT to listen on, e.g. 0.0.0.0:5600 (or 127.0.0.1:5600)"
    )
    serial: str | None = Field(None, description="serial device, e.g. /dev/ttyACM0")
    baud: Annotated[int, Field(ge=1200, le=4_000_000)] = 115200

    @field_validator("udp")
    @classmethod
    def _host_port(cls, udp: str | None) -> str | None:
        if udp is not None:
            match = _HOST_PORT.match(udp)
            if match is None or not 0 < int(match["port"]) < 65536:
                raise ValueError(f"udp must be HOST:PORT, e.g. 0.0.0.0:5600, got {udp!r}")
        return udp

    @model_validator(mode="after")
    def _one_link(self) -> OdometryFeed:
        if (self.udp is None) == (self.serial is None):
            raise ValueError("give exactly one of `udp:` (HOST:PORT) and `serial:` (a device)")
        return self

    @property
    def udp_address(self) -> tuple[str, int]:
        assert self.udp is not None
        host, _, port = self.udp.rpartition(":")
        return host, int(port)


class Rplidar(BaseModel):
    """A Slamtec RPLidar A1/A2/A3 on a serial port; one scan per revolution, binned into
    ``beams`` equal bearings. With ``odometry``, each scan carries the robot's pose (the
    SLAM prior) and the source publishes the odometry the motion context reads."""

    model_config = _MODEL
    kind: Literal["rplidar"]
    port: str = Field("/dev/ttyUSB0", description="serial device, e.g. /dev/ttyUSB0")
    baud: Literal[115200, 256000] = 115200
    beams: Annotated[int, Field(ge=90, le=3600)] = 360
    motor_pwm: Annotated[int, Field(ge=0, le=1023)] = 660
    odometry: OdometryFeed | None = None
    # Where the lidar sits on the robot's base, as a URDF's base_link → laser joint says it:
    # SLAM carries the base's odometry to the lidar and hands back the base's poses.
    mount: tuple[
        Annotated[float, Field(ge=-5.0, le=5.0, allow_inf_nan=False)],
        Annotated[float, Field(ge=-5.0, le=5.0, allow_inf_nan=False)],
        Annotated[float, Field(ge=-360.0, le=360.0, allow_inf_nan=False)],
    ] = Field(
        (0.0, 0.0, 0.0),
        description="[x, y, yaw]: metres forward and left of the base's centre, degrees "
        "counter-clockwise from the base's forward axis to the lidar's (default: centred)",
    )

    @field_validator("mount", mode="before")
    @classmethod
    def _mount_triple(cls, value: object) -> object:
        # YAML has no tuples; strict mode would reject the list `[0.1, 0, 180]` otherwise.
        if not isinstance(value, list) or len(value) != 3:
            raise ValueError(
                f"mount must be [x, y, yaw]: metres forward, metres left, degrees "
                f"counter-clockwise, e.g. [0.1, 0.0, 180.0], got {value!r}"
            )
        return tuple(value)


class PoseOdometry(BaseModel):
    """Odometry from a task's own poses (the SLAM task's), for the motion context."""

    model_config = _MODEL
    kind: Literal["pose_odometry"]
    task: str = Field(description="the task whose results carry `pose: [x, y, theta]`")


LIVE_SOURCES = (Camera, Microphone, Rplidar, PoseOdometry)
LIVE_KINDS = ("camera", "microphone", "rplidar", "pose_odometry")
