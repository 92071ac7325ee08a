"""Manifest schema above the tasks: the robot, scheduler, context signals, rules, the
document as written (:class:`ManifestDocument`) and its resolved form (:class:`Manifest`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from ctxrobot.manifest.fields import MAX_PATH, MODEL, Fraction, Name
from ctxrobot.manifest.problems import Problem
from ctxrobot.manifest.scenario import Scenario
from ctxrobot.manifest.task import TaskSpec
from ctxrobot.sched.rules import RuleSpec, TaskSetting

#: Longest rule condition. It also bounds how deeply a condition can nest (`not not …`,
#: parentheses) far below what the rule compiler's recursion could not take.
MAX_CONDITION = 500


class RobotSpec(BaseModel):
    model_config = MODEL
    name: Name = Field(description="robot name, e.g. pi-rover")
    cpus: Annotated[int, Field(ge=1, le=1024)] = Field(default_factory=lambda: os.cpu_count() or 1)


class FeedbackSpec(BaseModel):
    model_config = MODEL
    window_s: Annotated[float, Field(ge=0.1, le=600)] = 2.0
    miss_boost: Annotated[float, Field(ge=0, le=1)] = 0.1
    slack_release: Annotated[float, Field(ge=0, le=1)] = 0.05


class SchedulerSpec(BaseModel):
    model_config = MODEL
    policy: Literal["cfs", "static", "weights", "ctx"] = "ctx"
    period_ms: Annotated[float, Field(ge=10, le=10_000)] = Field(
        100.0, description="how often the weights policy re-applies its allocation"
    )
    feedback: FeedbackSpec = FeedbackSpec()

    @property
    def period_s(self) -> float:
        return self.period_ms / 1000.0


class MotionContext(BaseModel):
    model_config = MODEL
    source: Name = Field(description="a laser_replay source, e.g. lidar")
    moving_speed: Annotated[float, Field(ge=0.01, le=20)] = 0.2
    turning_rate: Annotated[float, Field(ge=0.01, le=20)] = 0.3
    window_s: Annotated[float, Field(ge=0.05, le=60)] = 0.5


class VoiceContext(BaseModel):
    model_config = MODEL
    source: Name = Field(description="an audio_replay source, e.g. mic")
    threshold_db: Annotated[float, Field(ge=-120, le=0)] = -35.0
    hangover_s: Annotated[float, Field(ge=0, le=60)] = 0.3


class SignContext(BaseModel):
    model_config = MODEL
    source: Name = Field(description="a camera_replay source, e.g. camera")
    task: Name = Field(description="the task whose results report signs, e.g. signs")
    hold_s: Annotated[float, Field(ge=0, le=3600)] = 2.0


class ObstacleContext(BaseModel):
    model_config = MODEL
    source: Name = Field(description="a laser_replay source, e.g. lidar")
    near_m: Annotated[float, Field(ge=0.01, le=100)] = 0.6


class HostContext(BaseModel):
    model_config = MODEL
    period_s: Annotated[float, Field(ge=0.1, le=3600)] = Field(
        1.0, description="how often the host's temperature and power are read"
    )
    hot_c: Annotated[float, Field(ge=20, le=150)] = 80.0


class ContextSpec(BaseModel):
    """Which context signals to derive; an absent section produces no signals."""

    model_config = MODEL
    motion: MotionContext | None = None
    voice: VoiceContext | None = None
    sign: SignContext | None = None
    obstacle: ObstacleContext | None = None
    host: HostContext | None = None


# The source kinds each sensor-driven context section reads.
CONTEXT_SOURCE_KINDS: Mapping[str, tuple[str, ...]] = {
    "motion": ("laser_replay", "rplidar", "pose_odometry"),
    "voice": ("audio_replay", "microphone"),
    "sign": ("camera_replay", "camera"),
    "obstacle": ("laser_replay", "rplidar"),
}


class BoundedTaskSetting(TaskSetting):
    """A rule's `set:` entry with the manifest's ranges (the rule language leaves them open)."""

    model_config = MODEL
    share: Fraction | None = None
    cpu_max: Fraction | None = None
    rate_hz: Annotated[float, Field(ge=0.01, le=1000)] | None = None


class BoundedRuleSpec(RuleSpec):
    """A `rules:` entry with the manifest's ranges; still a ``RuleSpec`` for the rule book."""

    model_config = MODEL
    when: Annotated[str, Field(max_length=MAX_CONDITION)]
    hold_s: Annotated[float, Field(ge=0, le=3600)] = 0.0
    set: Annotated[dict[str, BoundedTaskSetting], Field(min_length=1)]


class ManifestDocument(BaseModel):
    """The manifest YAML as written (paths still relative); ``Manifest`` is the resolved form."""

    model_config = MODEL
    version: Literal[1] = Field(description="schema version, 1")
    robot: RobotSpec = Field(description="{name: pi-rover, cpus: 2}")
    data_dir: Annotated[str, Field(min_length=1, max_length=MAX_PATH)] | None = None
    scenario: Annotated[str, Field(min_length=1, max_length=MAX_PATH)] = Field(
        description="scenario file relative to the manifest, e.g. scenarios/default.yaml"
    )
    tasks: Annotated[list[TaskSpec], Field(min_length=1, max_length=64)] = Field(
        description="a list of tasks, e.g. [{name: slam, image: ctxrobot/slam, input: lidar}]"
    )
    scheduler: SchedulerSpec = SchedulerSpec()
    context: ContextSpec = ContextSpec()
    rules: Annotated[list[BoundedRuleSpec], Field(max_length=256)] = []


@dataclass(frozen=True)
class Manifest:
    """A validated manifest with everything resolved: absolute paths, bytes, seconds.

    ``warnings`` lists each way a task is less confined than the defaults (see
    ``TaskSpec.privileges``); they do not make the manifest invalid.
    """

    path: Path
    version: int
    robot: RobotSpec
    data_dir: Path
    scenario: Scenario
    tasks: list[TaskSpec]
    scheduler: SchedulerSpec
    context: ContextSpec
    rules: list[RuleSpec]
    warnings: tuple[Problem, ...] = ()

    def task(self, name: str) -> TaskSpec:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"no task {name!r}; tasks: {', '.join(t.name for t in self.tasks)}")
