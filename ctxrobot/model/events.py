"""Every event that travels on the bus, one frozen dataclass per kind, with its topic.

Times are `time.monotonic()` seconds (the host clock tasks also stamp with), or virtual
seconds under a `VirtualTimeScheduler` in tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Odometry:
    """Robot motion from wheel odometry or an IMU (replay: the log's odometry)."""

    source: str
    t: float
    x: float
    y: float
    theta: float
    v: float  # forward speed, m/s
    w: float  # turn rate, rad/s


@dataclass(frozen=True, slots=True)
class LaserScan:
    """A laser scan's summary on the host; the full scan goes to the SLAM task."""

    source: str
    t: float
    min_range_m: float


@dataclass(frozen=True, slots=True)
class AudioLevel:
    """Energy of one audio chunk, for voice-activity context."""

    source: str
    t: float
    rms_db: float  # dB relative to full scale (0 dBFS = loudest int16)


@dataclass(frozen=True, slots=True)
class CameraFrame:
    """A camera frame's summary: how much the scene changed since the previous frame."""

    source: str
    t: float
    activity: float  # mean absolute difference to the previous frame, 0..1


@dataclass(frozen=True, slots=True)
class HostReading:
    """Host health from psutil: temperature, throttling, battery."""

    t: float
    cpu_temp_c: float | None
    throttled: bool
    battery_pct: float | None
    on_battery: bool


@dataclass(frozen=True, slots=True)
class TaskResult:
    """A task processed one sample."""

    task: str
    sample_id: int
    t_sensor: float
    t_start: float
    t_end: float
    result: Mapping[str, Any] = field(default_factory=dict)

    @property
    def latency_s(self) -> float:
        return self.t_end - self.t_sensor

    def missed(self, deadline_ms: float | None) -> bool:
        """Whether the result came later than ``deadline_ms`` after its sensor sample
        (the one definition of a deadline miss: run database, metrics, dashboard)."""
        return deadline_ms is not None and self.latency_s * 1000.0 > deadline_ms


#: Reasons for not processing a sample that are the context's choice, not a loss: the
#: task's rate limit ("rate") or a sample already past its deadline ("stale"). Everything
#: else ("queue_full") is a drop: work the task wanted and could not get to.
SHED_REASONS = frozenset({"rate", "stale"})


@dataclass(frozen=True, slots=True)
class SampleDropped:
    """A sample was not processed: dropped (its queue was full) or shed (see
    :data:`SHED_REASONS`). ``t_sensor``: when it was sensed (None where unknown)."""

    task: str
    sample_id: int
    t: float
    reason: str
    t_sensor: float | None = None

    @property
    def shed(self) -> bool:
        return self.reason in SHED_REASONS


@dataclass(frozen=True, slots=True)
class ContextChanged:
    """One or more context signals changed value."""

    t: float
    signals: Mapping[str, Any]
    changed: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RuleChanged:
    """A rule became active (`active=True`) or inactive."""

    t: float
    rule: str
    active: bool


@dataclass(frozen=True, slots=True)
class AllocationApplied:
    """The actuator wrote a new allocation; `trigger_t` is when its cause was published."""

    t: float
    trigger_t: float
    policy: str
    reason: str
    allocation: Mapping[str, Any]
    actuation_ms: float


@dataclass(frozen=True, slots=True)
class TaskStateChanged:
    """A task container's lifecycle state changed (starting, running, exited, crashed…)."""

    t: float
    task: str
    state: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class UsageSampled:
    """CPU each task used since the previous reading, as a fraction of the machine the
    policy shares out (cgroup accounting; the one reading every consumer shares)."""

    t: float
    used: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class SourceStateChanged:
    """A sensor source opened, failed, is reopening or closed (live devices come and go)."""

    t: float
    source: str
    state: str  # "open", "failed", "reopening", "closed"
    detail: str = ""


@dataclass(frozen=True, slots=True)
class CoreInput:
    """One input the decision thread handed the scheduler core: ``event`` (a bus event, an
    operator command, ``Start`` or ``Tick``) with the time ``t`` it was handed as ``now``,
    the ``seq``-th of the run. Recorded in run.db so that a run can be replayed through a
    fresh core in virtual time (``ctxrobot.observe.inputs``)."""

    t: float
    seq: int
    event: object


# topic name → event type published on it
TOPICS: dict[str, type] = {
    "sensor.odometry": Odometry,
    "sensor.scan": LaserScan,
    "sensor.audio": AudioLevel,
    "sensor.camera": CameraFrame,
    "host": HostReading,
    "task.result": TaskResult,
    "task.dropped": SampleDropped,
    "task.state": TaskStateChanged,
    "source.state": SourceStateChanged,
    "usage": UsageSampled,
    "context": ContextChanged,
    "rule": RuleChanged,
    "allocation": AllocationApplied,
    "core.input": CoreInput,
}
