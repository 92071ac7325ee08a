"""Scenario schema: what the robot senses during a run (replayed or live sources, and the
timed events a replay plays). Data paths resolve against ``data_dir``; when that folder
exists, each named file must too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ctxrobot.manifest.fields import MAX_PATH, MODEL, WEEK_S, Name, describe
from ctxrobot.manifest.hostpaths import matches, probe
from ctxrobot.manifest.live import LIVE_KINDS, Camera, Microphone, PoseOdometry, Rplidar
from ctxrobot.manifest.problems import shown

#: When an event may happen: within the longest scenario.
At = Annotated[float, Field(ge=0, le=WEEK_S)]


def _data_path(value: object, info: ValidationInfo) -> Path:
    """Resolve a scenario path against data_dir; when data_dir exists the path must too."""
    if not isinstance(value, str):
        raise ValueError(f"expected a path relative to data_dir, got {describe(value)}")
    if len(value) > MAX_PATH:
        raise ValueError(f"the path is longer than {MAX_PATH} characters, the most Linux takes")
    data_dir: Path = info.context["data_dir"]
    path = data_dir / value
    if probe(data_dir).kind != "dir":
        return path  # no data here (a build machine): nothing to check against
    found = probe(path)
    if found.kind == "missing" and found.reason != "not found":
        raise ValueError(f"cannot read {path}: {found.reason}")
    if found.kind == "missing":
        raise ValueError(
            f"data file not found: {path}; paths are relative to data_dir ({data_dir}), "
            "check the spelling or list the folder to pick an existing file"
        )
    return path


DataPath = Annotated[Path, BeforeValidator(_data_path)]


class LaserReplay(BaseModel):
    """Replays a 2D laser + odometry log folder (``*_laser.txt.gz``, ``*_odom.txt``)."""

    model_config = MODEL
    kind: Literal["laser_replay"]
    log: DataPath = Field(description="log folder under data_dir, e.g. slam/intel")
    start_s: At = Field(0.0, description="where in the log to start, in seconds")
    speed: Annotated[float, Field(ge=0.01, le=100)] = Field(
        1.0, description="replay speed; 2 plays the log twice as fast"
    )

    @field_validator("log")
    @classmethod
    def _is_log_folder(cls, log: Path) -> Path:
        kind = probe(log).kind
        if kind == "missing":  # data_dir absent: nothing to check against
            return log
        if kind != "dir":
            raise ValueError(f"{log} is a file; `log` names the folder that holds the log")
        for pattern in ("*_laser.txt.gz", "*_odom.txt", "laser.yaml"):
            if not matches(log, pattern):
                raise ValueError(
                    f"{log} has no {pattern}; point `log` at a laser log folder such as slam/intel"
                )
        return log


class IdleImages(BaseModel):
    """Stills shown in turn whenever no `show` event is on screen."""

    model_config = MODEL
    dir: DataPath = Field(description="image folder under data_dir")
    pattern: Annotated[str, Field(min_length=1, max_length=255)] = Field(
        "*.png", description="file names in `dir` to show, e.g. road*.png"
    )

    @field_validator("pattern")
    @classmethod
    def _file_names_only(cls, pattern: str) -> str:
        if "/" in pattern or "**" in pattern or pattern in (".", ".."):
            raise ValueError(
                f"pattern {pattern!r} must match file names inside `dir`, such as road*.png "
                "(no '/', no '**')"
            )
        return pattern

    @model_validator(mode="after")
    def _matches(self) -> IdleImages:
        if probe(self.dir).kind == "dir" and not self.images():
            raise ValueError(
                f"no file in {self.dir} matches pattern {self.pattern!r}; fix the pattern "
                "or the folder"
            )
        return self

    def images(self) -> list[Path]:
        """The idle images in natural order (road2 before road10)."""

        def key(path: Path) -> list[int | str]:
            return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]

        return sorted(matches(self.dir, self.pattern), key=key)


class ShowImage(BaseModel):
    model_config = MODEL
    at_s: At = Field(description="scenario time, e.g. 12.0")
    image: DataPath = Field(description="image file under data_dir")
    hold_s: Annotated[float, Field(ge=0.01, le=3600)] = 2.0


def _size_pair(value: object) -> object:
    # YAML has no tuples; strict mode would reject the list `[640, 480]` otherwise.
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"size must be [width, height], e.g. [640, 480], got {shown(value)}")
    return tuple(value)


class CameraReplay(BaseModel):
    """A camera that shows still photos at ``fps``, letterboxed to ``size`` (width, height)."""

    model_config = MODEL
    kind: Literal["camera_replay"]
    fps: Annotated[float, Field(ge=0.1, le=120)] = 5.0
    size: Annotated[
        tuple[Annotated[int, Field(ge=16, le=8192)], Annotated[int, Field(ge=16, le=8192)]],
        BeforeValidator(_size_pair),
    ] = (640, 480)
    idle: IdleImages | None = None
    show: list[ShowImage] = []

    @model_validator(mode="after")
    def _shows_something(self) -> CameraReplay:
        if self.idle is None and not self.show:
            raise ValueError(
                "the camera has nothing to show; add `idle:` (stills shown in turn) or "
                "`show:` (timed images)"
            )
        return self


class PlayAudio(BaseModel):
    model_config = MODEL
    at_s: At = Field(description="scenario time, e.g. 5.0")
    file: DataPath = Field(description="WAV file under data_dir")


class AudioReplay(BaseModel):
    """A microphone that plays utterances at given times and silence in between."""

    model_config = MODEL
    kind: Literal["audio_replay"]
    chunk_ms: Annotated[int, Field(ge=10, le=1000)] = 100
    play: list[PlayAudio] = []


Source = Annotated[
    LaserReplay | CameraReplay | AudioReplay | Camera | Microphone | Rplidar | PoseOdometry,
    Field(discriminator="kind"),
]
SOURCE_KINDS = ("laser_replay", "camera_replay", "audio_replay", *LIVE_KINDS)


class Scenario(BaseModel):
    """What the robot senses during a run: replayed sources and timed events."""

    model_config = MODEL
    version: Literal[1] = Field(description="schema version, 1")
    duration_s: Annotated[float, Field(ge=0.1, le=WEEK_S)] = Field(
        description="run length, e.g. 180"
    )
    sources: Annotated[dict[Name, Source], Field(min_length=1)] = Field(
        description="named sensor sources, e.g. {lidar: {kind: laser_replay, log: slam/intel}}"
    )
    _path: Path = PrivateAttr()
    _data_dir: Path = PrivateAttr()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def data_dir(self) -> Path:
        return self._data_dir
