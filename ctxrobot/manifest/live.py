"""Schema of the live sensor sources a scenario may name (a robot's own devices).

Each is usable wherever a replay source is: ``camera`` where ``camera_replay`` is,
``microphone`` where ``audio_replay`` is, ``rplidar`` where ``laser_replay`` is.
``pose_odometry`` turns a task's poses (the SLAM task's) into the odometry the motion
context reads, for robots without wheel odometry.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_MODEL = ConfigDict(extra="forbid", strict=True, frozen=True)


class Camera(BaseModel):
    """A live camera: a V4L2 device (path or index), an RTSP/HTTP URL, a video file, or a
    GStreamer ``pipeline`` (how a Pi camera is read through libcamera)."""

    model_config = _MODEL
    kind: Literal["camera"]
    device: str | int | None = Field(
        None, description="/dev/video0, an index such as 0, rtsp://… or http://… or a video file"
    )
    pipeline: str | None = Field(None, description="a GStreamer pipeline, instead of device")
    fps: Annotated[float, Field(gt=0, le=120)] = 30.0
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
    device: str | int | None = Field(
        None, description="device name (or part of it) or index; default: the system default"
    )
    chunk_ms: Annotated[int, Field(ge=10, le=1000)] = 100


class Rplidar(BaseModel):
    """A Slamtec RPLidar A1/A2/A3 on a serial port; one scan per revolution."""

    model_config = _MODEL
    kind: Literal["rplidar"]
    port: str = Field("/dev/ttyUSB0", description="serial device, e.g. /dev/ttyUSB0")
    baud: Literal[115200, 256000] = 115200


class PoseOdometry(BaseModel):
    """Odometry from a task's own poses (the SLAM task's), for the motion context."""

    model_config = _MODEL
    kind: Literal["pose_odometry"]
    task: str = Field(description="the task whose results carry `pose: [x, y, theta]`")


LIVE_SOURCES = (Camera, Microphone, Rplidar, PoseOdometry)
LIVE_KINDS = ("camera", "microphone", "rplidar", "pose_odometry")
