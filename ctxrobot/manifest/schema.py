"""Robot manifest and scenario schema, and the loader that reports every problem precisely.

The YAML is checked in three layers, and problems from all of them are collected before
anything is raised, so one `ctxrobot validate` run lists everything to fix:

1. YAML itself (syntax, duplicate keys, ``${VAR}`` expansion): ``ctxrobot.manifest.yamlpos``;
2. the pydantic models below (types, ranges, unknown keys, data files that must exist);
3. cross references that no single model can see (task input → scenario source, rule and
   context task names, which context sections a rule's signals need), checked on the raw
   data so they still run when layer 2 found something else wrong.

Each problem is ``FILE:LINE:COL: message``, where the message says what is wrong and how to
fix it. The loaded ``Manifest`` holds resolved values: absolute paths, bytes and seconds.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ctxrobot.manifest.live import LIVE_KINDS, Camera, Microphone, PoseOdometry, Rplidar
from ctxrobot.manifest.yamlpos import Pos, Problem, YamlDoc, load_yaml
from ctxrobot.sched.rules import (
    NAME_PATTERN,
    SIGNAL_PROVIDERS,
    ExpressionError,
    RuleSpec,
    TaskSetting,
    compile_expression,
)
from ctxtask.datasets import data_dir as default_data_dir

__all__ = [
    "DATA_MOUNT",
    "SOURCE_KINDS",
    "AudioReplay",
    "CameraReplay",
    "ContextSpec",
    "FeedbackSpec",
    "HostContext",
    "IdleImages",
    "LaserReplay",
    "Manifest",
    "ManifestDocument",
    "ManifestError",
    "MotionContext",
    "Mount",
    "ObstacleContext",
    "PlayAudio",
    "Problem",
    "QueueSpec",
    "Resources",
    "RestartSpec",
    "RobotSpec",
    "RuleSpec",
    "Scenario",
    "SchedulerSpec",
    "ShowImage",
    "SignContext",
    "TaskSetting",
    "TaskSpec",
    "VoiceContext",
    "load_manifest",
    "load_scenario",
    "validate_file",
]

_MODEL = ConfigDict(extra="forbid", strict=True, frozen=True)
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Fraction = Annotated[float, Field(gt=0, le=1)]
DATA_MOUNT = "/data"  # where data_dir appears inside every container
_RESERVED_TARGETS = (DATA_MOUNT, "/run/ctxrobot")  # data and the task socket folder


class ManifestError(Exception):
    """Raised by the loaders with every problem found, sorted by file and position."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --------------------------------------------------------------------------- scenario


def _data_path(value: object, info: ValidationInfo) -> Path:
    """Resolve a scenario path against data_dir; when data_dir exists the path must too."""
    if not isinstance(value, str):
        raise ValueError(f"expected a path relative to data_dir, got {_describe(value)}")
    data_dir: Path = info.context["data_dir"]
    path = data_dir / value
    if data_dir.is_dir() and not path.exists():
        raise ValueError(
            f"data file not found: {path}; paths are relative to data_dir ({data_dir}), "
            "check the spelling or list the folder to pick an existing file"
        )
    return path


DataPath = Annotated[Path, BeforeValidator(_data_path)]


class LaserReplay(BaseModel):
    """Replays a 2D laser + odometry log folder (``*_laser.txt.gz``, ``*_odom.txt``)."""

    model_config = _MODEL
    kind: Literal["laser_replay"]
    log: DataPath = Field(description="log folder under data_dir, e.g. slam/intel")
    start_s: Annotated[float, Field(ge=0)] = 0.0
    speed: Annotated[float, Field(gt=0)] = 1.0

    @field_validator("log")
    @classmethod
    def _is_log_folder(cls, log: Path) -> Path:
        if not log.exists():  # data_dir absent: nothing to check against
            return log
        if not log.is_dir():
            raise ValueError(f"{log} is a file; `log` names the folder that holds the log")
        for pattern in ("*_laser.txt.gz", "*_odom.txt", "laser.yaml"):
            if not any(log.glob(pattern)):
                raise ValueError(
                    f"{log} has no {pattern}; point `log` at a laser log folder such as slam/intel"
                )
        return log


class IdleImages(BaseModel):
    """Stills shown in turn whenever no `show` event is on screen."""

    model_config = _MODEL
    dir: DataPath = Field(description="image folder under data_dir")
    pattern: str = "*.png"

    @model_validator(mode="after")
    def _matches(self) -> IdleImages:
        if self.dir.is_dir() and not self.images():
            raise ValueError(
                f"no file in {self.dir} matches pattern {self.pattern!r}; fix the pattern "
                "or the folder"
            )
        return self

    def images(self) -> list[Path]:
        """The idle images in natural order (road2 before road10)."""

        def key(path: Path) -> list[int | str]:
            return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]

        return sorted(self.dir.glob(self.pattern), key=key)


class ShowImage(BaseModel):
    model_config = _MODEL
    at_s: Annotated[float, Field(ge=0)] = Field(description="scenario time, e.g. 12.0")
    image: DataPath = Field(description="image file under data_dir")
    hold_s: Annotated[float, Field(gt=0)] = 2.0


class CameraReplay(BaseModel):
    """A camera that shows still photos at ``fps``, letterboxed to ``size`` (width, height)."""

    model_config = _MODEL
    kind: Literal["camera_replay"]
    fps: Annotated[float, Field(gt=0, le=120)] = 5.0
    size: tuple[Annotated[int, Field(ge=16)], Annotated[int, Field(ge=16)]] = (640, 480)
    idle: IdleImages | None = None
    show: list[ShowImage] = []

    @field_validator("size", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: object) -> object:
        # YAML has no tuples; strict mode would reject the list `[640, 480]` otherwise.
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError(f"size must be [width, height], e.g. [640, 480], got {value!r}")
        return tuple(value)

    @model_validator(mode="after")
    def _shows_something(self) -> CameraReplay:
        if self.idle is None and not self.show:
            raise ValueError(
                "the camera has nothing to show; add `idle:` (stills shown in turn) or "
                "`show:` (timed images)"
            )
        return self


class PlayAudio(BaseModel):
    model_config = _MODEL
    at_s: Annotated[float, Field(ge=0)] = Field(description="scenario time, e.g. 5.0")
    file: DataPath = Field(description="WAV file under data_dir")


class AudioReplay(BaseModel):
    """A microphone that plays utterances at given times and silence in between."""

    model_config = _MODEL
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

    model_config = _MODEL
    version: Literal[1] = Field(description="schema version, 1")
    duration_s: Annotated[float, Field(gt=0)] = Field(description="run length, e.g. 180")
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


# --------------------------------------------------------------------------- manifest

_SIZE = re.compile(r"(\d+(?:\.\d+)?)([kKMGT]i?)?")
_UNITS = {"": 1, "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}
_UNITS |= {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
_DOCKER_MIN_MEMORY = 6 * 1024**2  # Docker refuses smaller memory limits


def memory_bytes(value: object) -> object:
    """``"768Mi"``/``"1Gi"``/``"800M"``/``123456`` → bytes; other types fail strict int."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match is None:
            raise ValueError(
                f"memory {value!r} is not a size: write bytes or a number with K/M/G/T "
                "(x1000) or Ki/Mi/Gi/Ti (x1024), e.g. 768Mi"
            )
        value = int(float(match.group(1)) * _UNITS[match.group(2) or ""])
    if value < _DOCKER_MIN_MEMORY:
        raise ValueError(f"memory {value} bytes is below Docker's 6 MiB minimum; give at least 6Mi")
    return value


class RobotSpec(BaseModel):
    model_config = _MODEL
    name: Name = Field(description="robot name, e.g. pi-rover")
    cpus: Annotated[int, Field(ge=1, le=1024)] = Field(default_factory=lambda: os.cpu_count() or 1)


class Mount(BaseModel):
    model_config = _MODEL
    source: Path = Field(description="host path, relative to the manifest's folder")
    target: str = Field(description="absolute path inside the container")
    read_only: bool = True

    @field_validator("source", mode="before")
    @classmethod
    def _resolve(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, str):
            return value
        path = (info.context["base"] / value).resolve()
        if not path.exists():
            raise ValueError(
                f"mount source not found: {path}; relative paths start at the manifest's "
                "folder, create it or fix the path"
            )
        return path

    @field_validator("target")
    @classmethod
    def _target(cls, target: str) -> str:
        if not target.startswith("/"):
            raise ValueError(f"mount target {target!r} must be an absolute container path")
        for reserved in _RESERVED_TARGETS:
            if target.rstrip("/") == reserved or target.startswith(reserved + "/"):
                raise ValueError(
                    f"mount target {target!r} is inside {reserved}, which ctxrobot mounts "
                    "itself; pick another folder"
                )
        return target


class Resources(BaseModel):
    model_config = _MODEL
    cpu_min: Fraction = 0.05
    cpu_max: Fraction = 1.0
    weight: Annotated[int, Field(ge=1, le=10000)] = 100
    memory: Annotated[int | None, BeforeValidator(memory_bytes)] = None
    max_freeze_s: Annotated[float, Field(gt=0)] = 2.0

    @model_validator(mode="after")
    def _ordered(self) -> Resources:
        if self.cpu_min > self.cpu_max:
            raise ValueError(
                f"cpu_min {self.cpu_min} is above cpu_max {self.cpu_max}; "
                "lower cpu_min or raise cpu_max"
            )
        return self


class QueueSpec(BaseModel):
    model_config = _MODEL
    depth: Annotated[int, Field(ge=1, le=1024)] = 4
    overflow: Literal["drop_oldest", "block"] = "drop_oldest"


class RestartSpec(BaseModel):
    """What the daemon does when a task's container stops serving (Docker's meanings)."""

    model_config = _MODEL
    policy: Literal["never", "on-failure", "always"] = Field(
        "on-failure",
        description="never; on-failure: after a non-zero exit or a broken connection, at most "
        "max_retries times; always: after any exit, a clean one too, without limit",
    )
    max_retries: Annotated[int, Field(ge=0, description="on-failure only")] = 5
    backoff_s: Annotated[float, Field(ge=0)] = 1.0


class TaskSpec(BaseModel):
    """One containerized task."""

    model_config = _MODEL
    name: Name = Field(description="task name, e.g. slam")
    image: Annotated[str, Field(min_length=1)] = Field(
        description="the Docker image that runs the task, e.g. ctxrobot/slam"
    )
    command: list[str] | None = None
    input: Name = Field(description="a source name from the scenario, e.g. lidar")
    env: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], str] = {}
    mounts: list[Mount] = []
    config: dict[str, Any] = {}
    resources: Resources = Resources()
    deadline_ms: Annotated[float, Field(gt=0)] = 1000.0
    queue: QueueSpec = QueueSpec()
    restart: RestartSpec = RestartSpec()

    @property
    def deadline_s(self) -> float:
        return self.deadline_ms / 1000.0


class FeedbackSpec(BaseModel):
    model_config = _MODEL
    window_s: Annotated[float, Field(gt=0)] = 2.0
    miss_boost: Annotated[float, Field(ge=0, le=1)] = 0.1
    slack_release: Annotated[float, Field(ge=0, le=1)] = 0.05


class SchedulerSpec(BaseModel):
    model_config = _MODEL
    policy: Literal["cfs", "static", "weights", "ctx"] = "ctx"
    period_ms: Annotated[float, Field(gt=0)] = 100.0
    feedback: FeedbackSpec = FeedbackSpec()

    @property
    def period_s(self) -> float:
        return self.period_ms / 1000.0


class MotionContext(BaseModel):
    model_config = _MODEL
    source: Name = Field(description="a laser_replay source, e.g. lidar")
    moving_speed: Annotated[float, Field(gt=0)] = 0.2
    turning_rate: Annotated[float, Field(gt=0)] = 0.3
    window_s: Annotated[float, Field(gt=0)] = 0.5


class VoiceContext(BaseModel):
    model_config = _MODEL
    source: Name = Field(description="an audio_replay source, e.g. mic")
    threshold_db: Annotated[float, Field(le=0)] = -35.0
    hangover_s: Annotated[float, Field(ge=0)] = 0.3


class SignContext(BaseModel):
    model_config = _MODEL
    source: Name = Field(description="a camera_replay source, e.g. camera")
    task: Name = Field(description="the task whose results report signs, e.g. signs")
    hold_s: Annotated[float, Field(ge=0)] = 2.0


class ObstacleContext(BaseModel):
    model_config = _MODEL
    source: Name = Field(description="a laser_replay source, e.g. lidar")
    near_m: Annotated[float, Field(gt=0)] = 0.6


class HostContext(BaseModel):
    model_config = _MODEL
    period_s: Annotated[float, Field(gt=0)] = 1.0
    hot_c: Annotated[float, Field(gt=0)] = 80.0


class ContextSpec(BaseModel):
    """Which context signals to derive; an absent section produces no signals."""

    model_config = _MODEL
    motion: MotionContext | None = None
    voice: VoiceContext | None = None
    sign: SignContext | None = None
    obstacle: ObstacleContext | None = None
    host: HostContext | None = None


# The source kind each sensor-driven context section reads.
_CONTEXT_SOURCE_KINDS: Mapping[str, tuple[str, ...]] = {
    "motion": ("laser_replay", "rplidar", "pose_odometry"),
    "voice": ("audio_replay", "microphone"),
    "sign": ("camera_replay", "camera"),
    "obstacle": ("laser_replay", "rplidar"),
}


class ManifestDocument(BaseModel):
    """The manifest YAML as written (paths still relative); ``Manifest`` is the resolved form."""

    model_config = _MODEL
    version: Literal[1] = Field(description="schema version, 1")
    robot: RobotSpec = Field(description="{name: pi-rover, cpus: 2}")
    data_dir: str | None = None
    scenario: str = Field(
        description="scenario file relative to the manifest, e.g. scenarios/default.yaml"
    )
    tasks: Annotated[list[TaskSpec], Field(min_length=1)] = Field(
        description="a list of tasks, e.g. [{name: slam, image: ctxrobot/slam, input: lidar}]"
    )
    scheduler: SchedulerSpec = SchedulerSpec()
    context: ContextSpec = ContextSpec()
    rules: list[RuleSpec] = []


@dataclass(frozen=True)
class Manifest:
    """A validated manifest with everything resolved: absolute paths, bytes, seconds."""

    path: Path
    version: int
    robot: RobotSpec
    data_dir: Path
    scenario: Scenario
    tasks: list[TaskSpec]
    scheduler: SchedulerSpec
    context: ContextSpec
    rules: list[RuleSpec]

    def task(self, name: str) -> TaskSpec:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"no task {name!r}; tasks: {', '.join(t.name for t in self.tasks)}")


# --------------------------------------------------------------------------- error text


def _describe(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"the string {shown!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _dotted(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "the top level"


_EXPECTED = {
    "string_type": 'a string (quote it: "...")',
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "bool_type": "true or false",
    "list_type": "a list (`- item` lines or [a, b])",
    "dict_type": "a mapping (`key: value` lines)",
    "model_type": "a mapping (`key: value` lines)",
}
_BOUNDS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}
_MEANING = {
    "cpu_min": "a fraction of the whole machine",
    "cpu_max": "a fraction of the whole machine",
    "share": "a fraction of the whole machine",
    "weight": "a cgroup weight",
    "miss_boost": "a fraction of the whole machine",
    "slack_release": "a fraction of the whole machine",
}


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional so the model or container type shows."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp


def _step(tp: Any, part: str | int) -> tuple[Any, bool]:
    """Follow one pydantic ``loc`` element; returns the new type and whether it was a
    discriminator tag rather than a data key."""
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(tp):
            kind = getattr(member, "model_fields", {}).get("kind")
            if kind is not None and part in typing.get_args(kind.annotation):
                return member, True
        return None, False
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(str(part))
        return (field.annotation if field else None), False
    if origin in (list, tuple) and isinstance(part, int):
        args = typing.get_args(tp)
        return (args[0] if origin is list else args[min(part, len(args) - 1)]), False
    if origin is dict:
        return typing.get_args(tp)[1], False
    return None, False


class _Locator:
    """Maps pydantic error locations onto YAML positions and schema types."""

    def __init__(self, doc: YamlDoc, root: type[BaseModel]) -> None:
        self.doc = doc
        self.root = root

    def resolve(self, loc: Sequence[str | int]) -> tuple[tuple[str | int, ...], Any, bool]:
        """Data path, the schema type at the *parent* of the last element, and whether the
        last element is a dict key being validated (pydantic's ``[key]``)."""
        path: list[str | int] = []
        data: Any = self.doc.data
        tp: Any = self.root
        parent_tp: Any = self.root
        for i, part in enumerate(loc):
            if part == "[key]":
                return tuple(path), parent_tp, True
            new_tp, is_tag = _step(tp, part) if tp is not None else (None, False)
            if is_tag:
                tp = new_tp
                continue
            parent_tp = tp
            tp = new_tp
            child = _child(data, part)
            if child is _MISSING and i != len(loc) - 1:
                continue  # a pydantic-internal step (e.g. a validator name), not data
            data = child
            path.append(part)
        return tuple(path), parent_tp, False


def _fields(tp: Any) -> list[str]:
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []


def _field_description(tp: Any, name: str) -> str | None:
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel) and name in tp.model_fields:
        return tp.model_fields[name].description
    return None


def _pydantic_problems(
    exc: ValidationError, doc: YamlDoc, file: str, root: type[BaseModel]
) -> list[Problem]:
    locator = _Locator(doc, root)
    problems: list[Problem] = []
    for error in exc.errors(include_url=False):
        path, parent_tp, is_key = locator.resolve(error["loc"])
        if path in doc.tainted:
            continue
        kind = error["type"]
        value = error.get("input")
        ctx = error.get("ctx") or {}
        name = str(path[-1]) if path else ""
        where = _dotted(path)
        pos = doc.pos(path)
        if is_key and ctx.get("pattern") == NAME_PATTERN:  # a source name
            pos = doc.pos(path, key=True)
            message = _bad_name(_dotted(path), name)
        elif is_key:  # `env:` keys become environment variable names
            pos = doc.pos(path, key=True)
            fixed = re.sub(r"\W", "_", name).upper()
            message = (
                f"{name!r} in {_dotted(path[:-1])} is not a valid environment variable name; "
                f"use letters, digits and '_', not starting with a digit (e.g. {fixed!r})"
            )
        elif kind == "missing":
            parent = path[:-1]
            pos = doc.pos(parent, key=True) if parent in doc.key_pos else doc.pos(parent)
            what = _field_description(parent_tp, name)
            example = f" ({what})" if what else ""
            message = (
                f"missing required field '{name}' in {_dotted(parent)}; add `{name}:`{example}"
            )
        elif kind == "extra_forbidden":
            pos = doc.pos(path, key=True)
            allowed = _fields(parent_tp)
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else "remove it; "
            message = (
                f"unknown key '{name}' in {_dotted(path[:-1])}; {hint}"
                f"allowed keys: {', '.join(allowed)}"
            )
        elif kind in _BOUNDS:
            limit = next(iter(ctx.values()))
            meaning = f" ({_MEANING[name]})" if name in _MEANING else ""
            message = (
                f"{where} = {value} is out of range{meaning}: it must be {_BOUNDS[kind]} {limit}"
            )
        elif kind == "literal_error" and path == ("version",):
            message = f"version {value!r} is not supported; this ctxrobot reads `version: 1`"
        elif kind == "literal_error":
            expected = ctx.get("expected", "")
            options = re.findall(r"'([^']*)'|(\d+)", expected)
            choices = [a or b for a, b in options]
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            message = f"{where}: {value!r} is not allowed; {hint}use one of {expected}"
        elif kind == "union_tag_invalid":
            close = difflib.get_close_matches(str(ctx.get("tag")), SOURCE_KINDS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            pos = doc.pos((*path, "kind"))
            message = (
                f"{where}: unknown kind {ctx.get('tag')!r}; {hint}use one of "
                f"{', '.join(SOURCE_KINDS)}"
            )
        elif kind == "union_tag_not_found":
            pos = doc.pos(path, key=True) if path in doc.key_pos else pos
            message = f"{where} has no 'kind'; add `kind:` with one of {', '.join(SOURCE_KINDS)}"
        elif kind == "string_pattern_mismatch":  # every other pattern is NAME_PATTERN
            message = _bad_name(where, str(value))
        elif kind == "too_short":
            message = f"{where} is empty; it needs at least {ctx.get('min_length', 1)} entry"
        elif kind == "too_long":
            message = f"{where} has too many entries; at most {ctx.get('max_length')} allowed"
        elif kind == "value_error":
            cause = ctx.get("error")
            if isinstance(cause, ExpressionError):
                pos = _expression_pos(doc, path, cause)
                message = f"bad condition in {where}: {cause.message}"
            else:
                message = f"{where}: {cause}"
        elif kind in _EXPECTED:
            message = f"{where}: expected {_EXPECTED[kind]}, got {_describe(value)}"
        else:
            message = f"{where}: {error['msg']}"
        problems.append(Problem(file, pos.line, pos.col, message))
    return problems


def _bad_name(where: str, name: str) -> str:
    fixed = re.sub(r"[^a-z0-9_-]", "-", name.lower()).lstrip("-_0123456789")
    return (
        f"{where}: {name!r} is not a valid name; use lowercase letters, digits, '_' and '-', "
        f"starting with a letter (e.g. {fixed or 'slam'!r})"
    )


def _expression_pos(doc: YamlDoc, path: tuple[str | int, ...], error: ExpressionError) -> Pos:
    """Point inside the `when:` value when the column is exact (single line, no escapes)."""
    pos = doc.pos(path)
    if error.line == 1 and path in doc.inline:
        return Pos(pos.line, pos.col + doc.inline[path] + error.col)
    return pos


_MISSING = object()


def _child(data: Any, part: str | int) -> Any:
    if isinstance(data, dict):
        return data.get(part, _MISSING)
    if isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
        return data[part]
    return _MISSING


# --------------------------------------------------------------------------- cross references


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _dict_items(data: object) -> Iterator[tuple[int, dict[str, Any]]]:
    """The mapping entries of a list, with their indices; anything else was already
    reported by the schema layer."""
    if isinstance(data, list):
        for i, item in enumerate(data):
            if isinstance(item, dict):
                yield i, item


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean '{close[0]}'? " if close else ""


class _Checker:
    """Cross-reference checks over the raw YAML data, tolerant of malformed parts."""

    def __init__(self, doc: YamlDoc, file: str) -> None:
        self.doc = doc
        self.file = file
        self.problems: list[Problem] = []

    def add(self, path: tuple[str | int, ...], message: str, *, key: bool = False) -> None:
        if path in self.doc.tainted:
            return
        pos = self.doc.pos(path, key=key)
        self.problems.append(Problem(self.file, pos.line, pos.col, message))

    def unique_names(self, section: str, what: str) -> list[str]:
        """Report repeated `name:` values in a list section; returns the names in order."""
        seen: dict[str, int] = {}
        names: list[str] = []
        for i, item in _dict_items(self.doc.data.get(section)):
            name = item.get("name")
            if not isinstance(name, str):
                continue
            if name in seen:
                first = self.doc.pos((section, seen[name], "name")).line
                self.add(
                    (section, i, "name"),
                    f"duplicate {what} name '{name}' (first used at line {first}); "
                    f"{what} names must be unique, rename one",
                )
            else:
                seen[name] = i
                names.append(name)
        return names

    def scenario(self) -> None:
        data = self.doc.data
        duration = _number(data.get("duration_s"))
        sources = data.get("sources")
        if not isinstance(sources, dict):
            return
        for name, source in sources.items():
            if not isinstance(source, dict):
                continue
            for events in ("show", "play"):
                self._events(("sources", name, events), source.get(events), duration)

    def _events(self, path: tuple[str | int, ...], events: object, duration: float | None) -> None:
        timed: list[tuple[float, float | None, int]] = []
        for i, event in _dict_items(events):
            at = _number(event.get("at_s"))
            if at is None:
                continue
            if duration is not None and at >= duration:
                self.add(
                    (*path, i, "at_s"),
                    f"{_dotted((*path, i))}.at_s = {at:g} is not before the scenario ends "
                    f"(duration_s {duration:g}); move it earlier or lengthen duration_s",
                )
            hold = _number(event.get("hold_s", 2.0)) if "image" in event else None
            timed.append((at, hold, i))
        timed.sort()
        for (at, hold, _), (next_at, _, j) in itertools.pairwise(timed):
            if hold is not None and next_at < at + hold:
                self.add(
                    (*path, j, "at_s"),
                    f"{_dotted((*path, j))} at {next_at:g} s overlaps the image shown at "
                    f"{at:g} s for {hold:g} s; start it at {at + hold:g} s or later, or "
                    "shorten the earlier hold_s",
                )

    def manifest(self, sources: Mapping[str, object] | None, scenario_file: str) -> None:
        data = self.doc.data
        tasks = self.unique_names("tasks", "task")
        self.unique_names("rules", "rule")
        total_min = 0.0
        for i, task in _dict_items(data.get("tasks")):
            name = task.get("input")
            if sources is not None and isinstance(name, str) and name not in sources:
                self.add(
                    ("tasks", i, "input"),
                    f"task input '{name}' is not a source of {scenario_file}; "
                    f"{_did_you_mean(name, list(sources))}sources: {', '.join(sources)}",
                )
            resources = task.get("resources")
            cpu_min = resources.get("cpu_min", 0.05) if isinstance(resources, dict) else 0.05
            total_min += _number(cpu_min) or 0.0
        if total_min > 1.0 + 1e-9:
            self.add(
                ("tasks",),
                f"the tasks' cpu_min add up to {total_min:.2f} of the machine, more than all "
                "of it; lower them so they sum to at most 1",
                key=True,
            )
        self._context(data.get("context"), sources, scenario_file, tasks)
        self._rules(data.get("rules"), data.get("context"), tasks)

    def _context(
        self,
        context: object,
        sources: Mapping[str, object] | None,
        scenario_file: str,
        tasks: list[str],
    ) -> None:
        if not isinstance(context, dict):
            return
        for section, wanted in _CONTEXT_SOURCE_KINDS.items():
            spec = context.get(section)
            source = spec.get("source") if isinstance(spec, dict) else None
            if sources is None or not isinstance(source, str):
                continue
            path = ("context", section, "source")
            if source not in sources:
                self.add(
                    path,
                    f"context.{section}.source '{source}' is not a source of {scenario_file}; "
                    f"{_did_you_mean(source, list(sources))}sources: {', '.join(sources)}",
                )
            elif sources[source] not in wanted:
                fitting = [n for n, k in sources.items() if k in wanted]
                hint = f" such as '{fitting[0]}'" if fitting else ""
                self.add(
                    path,
                    f"context.{section}.source '{source}' is of kind {sources[source]}, but "
                    f"{section} needs a source of kind {' or '.join(wanted)}{hint}",
                )
        sign = context.get("sign")
        task = sign.get("task") if isinstance(sign, dict) else None
        if isinstance(task, str) and task not in tasks:
            self.add(
                ("context", "sign", "task"),
                f"context.sign.task '{task}' is not a task; "
                f"{_did_you_mean(task, tasks)}tasks: {', '.join(tasks)}",
            )

    def _rules(self, rules: object, context: object, tasks: list[str]) -> None:
        configured = {
            section
            for section, spec in (context.items() if isinstance(context, dict) else ())
            if spec is not None
        }
        for i, rule in _dict_items(rules):
            label = rule.get("name", f"rules[{i}]")
            targets = rule.get("set")
            for task in targets if isinstance(targets, dict) else ():
                if isinstance(task, str) and task not in tasks:
                    self.add(
                        ("rules", i, "set", task),
                        f"rule '{label}' sets unknown task '{task}'; "
                        f"{_did_you_mean(task, tasks)}tasks: {', '.join(tasks)}",
                        key=True,
                    )
            when = rule.get("when")
            if not isinstance(when, str):
                continue
            try:
                names = compile_expression(when).names
            except ExpressionError:
                continue  # reported by the schema layer with its column
            for section in sorted({SIGNAL_PROVIDERS[n] for n in names} - configured):
                used = ", ".join(sorted(n for n in names if SIGNAL_PROVIDERS[n] == section))
                self.add(
                    ("rules", i, "when"),
                    f"rule '{label}' uses {used}, which context.{section} produces, but "
                    f"context.{section} is not configured; add a `{section}:` section under "
                    "`context:`",
                )


# --------------------------------------------------------------------------- loaders


def _read(path: Path) -> tuple[YamlDoc | None, list[Problem]]:
    """Parse a YAML file whose top level must be a mapping."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        return None, [Problem(file, 1, 1, f"cannot read {file}: {reason}; check the path")]
    doc, problems = load_yaml(text, file)
    if doc is not None and not isinstance(doc.data, dict):
        pos = doc.pos(())
        problems.append(
            Problem(
                file,
                pos.line,
                pos.col,
                f"the file holds {_describe(doc.data)}; it must be a mapping that starts "
                "with `version: 1`",
            )
        )
        return None, problems
    return doc, problems


def _scenario_stage(
    path: Path, data_dir: Path
) -> tuple[Scenario | None, dict[str, object] | None, list[Problem]]:
    """Validate a scenario; also returns its source names → kinds for cross references,
    known even when other parts of the scenario are invalid."""
    doc, problems = _read(path)
    if doc is None:
        return None, None, problems
    checker = _Checker(doc, str(path))
    checker.scenario()
    problems += checker.problems
    raw_sources = doc.data.get("sources")
    kinds = (
        {name: (s.get("kind") if isinstance(s, dict) else None) for name, s in raw_sources.items()}
        if isinstance(raw_sources, dict)
        else None
    )
    try:
        scenario = Scenario.model_validate(doc.data, context={"data_dir": data_dir})
    except ValidationError as exc:
        problems += _pydantic_problems(exc, doc, str(path), Scenario)
        return None, kinds, problems
    scenario._path = path
    scenario._data_dir = data_dir
    return scenario, kinds, problems


def load_scenario(path: str | Path, data_dir: str | Path | None = None) -> Scenario:
    """Load and validate a scenario; data paths resolve against ``data_dir`` (default: the
    project data root). Raises ``ManifestError`` listing every problem."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    scenario, _, problems = _scenario_stage(Path(path), root)
    if problems or scenario is None:
        raise ManifestError(problems)
    return scenario


def with_scenario(manifest: Manifest, path: str | Path) -> Manifest:
    """The manifest playing another scenario (`run --scenario`, `bench`). Raises
    ``ManifestError`` when the scenario does not load or lacks a source the tasks read."""
    scenario = load_scenario(path, manifest.data_dir)
    missing = sorted({t.input for t in manifest.tasks} - set(scenario.sources))
    if missing:
        raise ManifestError(
            [
                Problem(
                    str(path),
                    1,
                    1,
                    f"the manifest's tasks read source(s) {', '.join(missing)}, which this "
                    f"scenario does not define (it has: {', '.join(scenario.sources)}); add "
                    "them or pick a scenario made for this robot",
                )
            ]
        )
    return dataclasses.replace(manifest, scenario=scenario)


def load_manifest(path: str | Path) -> Manifest:
    """Load and validate a manifest and its scenario. Raises ``ManifestError`` listing
    every problem in both files."""
    path = Path(path)
    doc, problems = _read(path)
    if doc is None:
        raise ManifestError(problems)
    raw = doc.data
    base = path.parent
    # An invalid data_dir is reported by the schema; meanwhile use the default location.
    written = raw.get("data_dir")
    data_dir = (base / written).resolve() if isinstance(written, str) else default_data_dir()

    scenario: Scenario | None = None
    sources: dict[str, object] | None = None
    scenario_file = raw.get("scenario")
    if isinstance(scenario_file, str):
        scenario_path = base / scenario_file
        if scenario_path.is_file():
            scenario, sources, scenario_problems = _scenario_stage(scenario_path, data_dir)
            problems += scenario_problems
        else:
            pos = doc.pos(("scenario",))
            problems.append(
                Problem(
                    str(path),
                    pos.line,
                    pos.col,
                    f"scenario file not found: {scenario_path}; the path is relative to the "
                    f"manifest's folder ({base})",
                )
            )

    document: ManifestDocument | None = None
    try:
        document = ManifestDocument.model_validate(raw, context={"base": base})
    except ValidationError as exc:
        problems += _pydantic_problems(exc, doc, str(path), ManifestDocument)
    checker = _Checker(doc, str(path))
    checker.manifest(sources, str(scenario_file))
    problems += checker.problems

    if problems or document is None or scenario is None:
        raise ManifestError(problems)
    return Manifest(
        path=path,
        version=document.version,
        robot=document.robot,
        data_dir=data_dir,
        scenario=scenario,
        tasks=document.tasks,
        scheduler=document.scheduler,
        context=document.context,
        rules=document.rules,
    )


_MANIFEST_KEYS = {"robot", "tasks", "scenario", "scheduler", "context", "rules", "data_dir"}
_SCENARIO_KEYS = {"sources", "duration_s"}


def validate_file(path: str | Path) -> list[Problem]:
    """Every problem in a manifest (with its scenario) or a standalone scenario file,
    told apart by their top-level keys; an empty list means valid."""
    path = Path(path)
    doc, problems = _read(path)
    if doc is None:
        return problems
    keys = set(doc.data)
    try:
        if keys & _MANIFEST_KEYS:
            load_manifest(path)
        elif keys & _SCENARIO_KEYS:
            load_scenario(path)
        else:
            return sorted(
                [
                    *problems,
                    Problem(
                        str(path),
                        1,
                        1,
                        "neither a manifest (it would have `tasks:` and `scenario:`) nor a "
                        "scenario (it would have `sources:` and `duration_s:`)",
                    ),
                ]
            )
    except ManifestError as exc:
        return exc.problems  # already sorted
    return []
