"""Sensor events → context signals: small state machines with deadlines instead of timers.

Each signal machine reads one kind of event and answers with new signal values (names as
in :data:`ctxrobot.sched.rules.CONTEXT_SIGNALS`). Behaviour over time — a voice hangover, a
sign held after its last detection, a sensor going quiet — is a *deadline* the machine
reports; when the caller's time passes it, ``on_time`` yields the timed change, stamped
with the deadline itself (the event that armed it plus the delay), never with a clock
reading. So the same code gives the same answers in a run and in a virtual-time test.

:class:`Context` merges the machines' updates into one context and reports a
``ContextChanged`` only when some signal's effective value changes. Continuous signals are
quantised with a dead band (a value must move a whole step from the last published one), so
sensor noise does not become a context change per sample: the scheduler re-plans on every
context change, and a flickering signal would cost CPU exactly when CPU is short. Operators
may pin signals (overrides) for bench tests.

Nothing here does I/O, owns a thread or reads a clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ctxrobot.model.events import (
    AudioLevel,
    ContextChanged,
    HostReading,
    LaserScan,
    Odometry,
    TaskResult,
)
from ctxrobot.sched.rules import CONTEXT_SIGNALS, MOTION_STATES

__all__ = [
    "QUANTA",
    "Context",
    "Host",
    "Motion",
    "Obstacle",
    "Sign",
    "SignalMachine",
    "Update",
    "Voice",
    "check_override",
]

#: Quantisation step (and dead band) of each continuous signal. Speed and turn rate move in
#: steps well under any sensible rule threshold; a tenth of a metre is below a laser's noise
#: at obstacle range; temperature and battery in whole units.
QUANTA: Mapping[str, float] = {
    "speed": 0.05,
    "turn_rate": 0.05,
    "obstacle_distance": 0.1,
    "cpu_temp_c": 1.0,
    "battery_pct": 1.0,
}

#: Hysteresis: a motion state entered at threshold T is left only below EXIT × T.
MOTION_EXIT_RATIO = 0.6
#: An obstacle that came nearer than ``near_m`` is clear again only beyond this × ``near_m``.
OBSTACLE_CLEAR_RATIO = 1.25
#: A motion or laser stream silent for this many motion windows (at least STALE_MIN_S) is
#: dead: its signals become unknown (None) rather than keep their last value forever.
STALE_WINDOWS = 4
STALE_MIN_S = 1.0


@dataclass(frozen=True, slots=True)
class Update:
    """New values of some signals at time ``t`` (None: the signal is unknown)."""

    t: float
    values: Mapping[str, object]


class SignalMachine(Protocol):
    """One context section: reads events, may arm one deadline."""

    #: The event type this machine reads.
    reads: type

    @property
    def deadline(self) -> float | None:
        """When ``on_time`` has something to say without a new event (None: never)."""

    def on_event(self, event: Any) -> Update | None:
        """An event of type ``reads``; the update it causes now, if any."""

    def on_time(self, now: float) -> Update | None:
        """The deadline passed (``now >= deadline``): the timed update."""


@dataclass
class _Timer:
    """A machine's one pending deadline and what it does then."""

    at: float | None = None
    values: Mapping[str, object] = field(default_factory=dict)

    def arm(self, at: float, values: Mapping[str, object]) -> None:
        self.at, self.values = at, values

    def fire(self, now: float) -> Update | None:
        if self.at is None or now < self.at:
            return None
        update = Update(self.at, self.values)
        self.at = None
        return update


class Motion:
    """``speed`` and ``turn_rate`` (magnitudes of the mean forward speed and turn rate over
    the last ``window_s`` of odometry) and ``motion``: "turning" at ``turning_rate`` or more,
    else "moving" at ``moving_speed`` or more, else "stopped", each state left only below
    :data:`MOTION_EXIT_RATIO` of its threshold so it does not flicker. Silent for
    :data:`STALE_WINDOWS` windows (at least :data:`STALE_MIN_S`), all three become unknown."""

    reads = Odometry

    def __init__(
        self, source: str, *, moving_speed: float, turning_rate: float, window_s: float
    ) -> None:
        self.source = source
        self.moving_speed = moving_speed
        self.turning_rate = turning_rate
        self.window_s = window_s
        self.stale_s = max(STALE_MIN_S, STALE_WINDOWS * window_s)
        self.window: deque[tuple[float, float, float]] = deque()
        self.motion = "stopped"
        self._timer = _Timer()

    @property
    def deadline(self) -> float | None:
        return self._timer.at

    def _classify(self, speed: float, turn: float) -> str:
        exit_turn = MOTION_EXIT_RATIO * self.turning_rate
        if turn >= self.turning_rate or (self.motion == "turning" and turn >= exit_turn):
            return "turning"
        exit_speed = MOTION_EXIT_RATIO * self.moving_speed
        if speed >= self.moving_speed or (self.motion != "stopped" and speed >= exit_speed):
            return "moving"
        return "stopped"

    def on_event(self, event: Odometry) -> Update | None:
        if event.source != self.source:
            return None
        self.window.append((event.t, event.v, event.w))
        while self.window[0][0] < event.t - self.window_s:
            self.window.popleft()
        speed = abs(sum(v for _, v, _ in self.window) / len(self.window))
        turn = abs(sum(w for _, _, w in self.window) / len(self.window))
        self.motion = self._classify(speed, turn)
        unknown = {"speed": None, "turn_rate": None, "motion": None}
        self._timer.arm(event.t + self.stale_s, unknown)
        return Update(event.t, {"speed": speed, "turn_rate": turn, "motion": self.motion})

    def on_time(self, now: float) -> Update | None:
        update = self._timer.fire(now)
        if update is not None:
            self.window.clear()
            self.motion = "stopped"
        return update


class Voice:
    """``voice_active``: true from the first chunk at ``threshold_db`` or louder until
    ``hangover_s`` after the last such chunk, so the pauses between words do not end it."""

    reads = AudioLevel

    def __init__(self, source: str, *, threshold_db: float, hangover_s: float) -> None:
        self.source = source
        self.threshold_db = threshold_db
        self.hangover_s = hangover_s
        self.active: bool | None = None  # None until the first chunk
        self._timer = _Timer()

    @property
    def deadline(self) -> float | None:
        return self._timer.at

    def on_event(self, event: AudioLevel) -> Update | None:
        if event.source != self.source:
            return None
        if event.rms_db < self.threshold_db:
            # A pending hangover ends the voice; before any voice, audio flowing means the
            # signal is known false rather than unknown.
            if self.active is None:
                self.active = False
                return Update(event.t, {"voice_active": False})
            return None
        was = self.active
        self.active = True
        self._timer.arm(event.t + self.hangover_s, {"voice_active": False})
        return None if was else Update(event.t, {"voice_active": True})

    def on_time(self, now: float) -> Update | None:
        update = self._timer.fire(now)
        if update is not None:
            self.active = False
        return update


def _has_detections(result: Mapping[str, Any]) -> bool:
    detections = result.get("detections")
    return isinstance(detections, list | tuple) and len(detections) > 0


class Sign:
    """``sign_ahead``: true when ``task`` reports a non-empty ``detections`` list, held
    ``hold_s`` after the last such result (the robot is still approaching the sign when
    the detector loses it at close range). Stamped when the result arrived (``t_end``):
    that is when the host learnt of the sign."""

    reads = TaskResult

    def __init__(self, task: str, *, hold_s: float) -> None:
        self.task = task
        self.hold_s = hold_s
        self.held: bool | None = None  # None until the task's first result
        self._timer = _Timer()

    @property
    def deadline(self) -> float | None:
        return self._timer.at

    def on_event(self, event: TaskResult) -> Update | None:
        if event.task != self.task or "shed" in event.result:
            return None
        if not _has_detections(event.result):
            if self.held is None:
                self.held = False
                return Update(event.t_end, {"sign_ahead": False})
            return None
        was = self.held
        self.held = True
        self._timer.arm(event.t_end + self.hold_s, {"sign_ahead": False})
        return None if was else Update(event.t_end, {"sign_ahead": True})

    def on_time(self, now: float) -> Update | None:
        update = self._timer.fire(now)
        if update is not None:
            self.held = False
        return update


class Obstacle:
    """``obstacle_distance`` (nearest return, m) and ``obstacle_near``: true below
    ``near_m``, false again only beyond :data:`OBSTACLE_CLEAR_RATIO` × ``near_m``. Without a
    scan for :data:`STALE_MIN_S`, both become unknown."""

    reads = LaserScan

    def __init__(self, source: str, *, near_m: float) -> None:
        self.source = source
        self.near_m = near_m
        self.near = False
        self._timer = _Timer()

    @property
    def deadline(self) -> float | None:
        return self._timer.at

    def on_event(self, event: LaserScan) -> Update | None:
        if event.source != self.source:
            return None
        d = event.min_range_m
        self.near = d < self.near_m or (self.near and d <= OBSTACLE_CLEAR_RATIO * self.near_m)
        unknown = {"obstacle_distance": None, "obstacle_near": None}
        self._timer.arm(event.t + STALE_MIN_S, unknown)
        distance = d if math.isfinite(d) else None  # no return in range: distance unknown
        return Update(event.t, {"obstacle_distance": distance, "obstacle_near": self.near})

    def on_time(self, now: float) -> Update | None:
        update = self._timer.fire(now)
        if update is not None:
            self.near = False
        return update


class Host:
    """``cpu_temp_c``, ``battery_pct``, ``on_battery`` as read, and ``throttled``: the
    firmware says so, or the CPU is at ``hot_c`` or more (machines without a throttle report
    are about to throttle there). The readings come from the edge every ``period_s``."""

    reads = HostReading
    deadline = None

    def __init__(self, *, hot_c: float) -> None:
        self.hot_c = hot_c

    def on_event(self, event: HostReading) -> Update:
        hot = event.cpu_temp_c is not None and event.cpu_temp_c >= self.hot_c
        return Update(
            event.t,
            {
                "cpu_temp_c": event.cpu_temp_c,
                "throttled": event.throttled or hot,
                "battery_pct": event.battery_pct,
                "on_battery": event.on_battery,
            },
        )

    def on_time(self, now: float) -> None:
        return None


def _quantise(name: str, value: object, previous: object) -> object:
    """The value to publish for ``name``: discrete values as they are; a continuous one
    rounded to its step, but only once it moved a whole step from ``previous``."""
    step = QUANTA.get(name)
    if step is None or not isinstance(value, float | int) or isinstance(value, bool):
        return value
    if isinstance(previous, float | int) and abs(value - previous) < step:
        return previous
    digits = max(0, -math.floor(math.log10(step)))
    return round(round(value / step) * step, digits)


def check_override(name: str, value: object) -> None:
    """Reject a pin the rules could never read the way the operator meant (ValueError)."""
    if name not in CONTEXT_SIGNALS:
        known = ", ".join(CONTEXT_SIGNALS)
        raise ValueError(f"unknown context signal {name!r}; known signals: {known}")
    if value is None:  # pinned unknown
        return
    kind = CONTEXT_SIGNALS[name]
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ValueError(f"{name} takes a {kind.__name__}, not {value!r}")
    if name == "motion" and value not in MOTION_STATES:
        raise ValueError(f"motion is one of {', '.join(MOTION_STATES)}, not {value!r}")


class Context:
    """The robot's context: the signal machines' updates merged, overrides applied.

    Every method that can change the context returns the ``ContextChanged`` it caused, or
    None when no signal's effective value changed.
    """

    def __init__(self, machines: Sequence[SignalMachine]) -> None:
        self.machines = list(machines)
        self._raw: dict[str, object] = {}  # as the sensors say, quantised
        self._overrides: dict[str, object] = {}

    @property
    def signals(self) -> dict[str, object]:
        """The effective context: sensor values with the pins applied."""
        return {**self._raw, **self._overrides}

    @property
    def overrides(self) -> dict[str, object]:
        return dict(self._overrides)

    @property
    def deadline(self) -> float | None:
        """The earliest time a machine has a timed change pending."""
        return min((d for m in self.machines if (d := m.deadline) is not None), default=None)

    def on_event(self, event: object) -> ContextChanged | None:
        updates = [
            u
            for m in self.machines
            if isinstance(event, m.reads) and (u := m.on_event(event)) is not None
        ]
        return self._merge(updates)

    def on_time(self, now: float) -> list[ContextChanged]:
        """Every timed change due by ``now``, in deadline order."""
        changes = []
        while (due := self.deadline) is not None and due <= now:
            updates = [u for m in self.machines if (u := m.on_time(due)) is not None]
            if (change := self._merge(updates)) is not None:
                changes.append(change)
        return changes

    def override(self, signals: Mapping[str, object], t: float) -> ContextChanged | None:
        """Pin ``signals`` (None pins a signal as unknown); checked first, all or nothing."""
        for name, value in signals.items():
            check_override(name, value)
        before = self.signals
        self._overrides.update(signals)
        return self._diff(before, t)

    def clear_overrides(self, t: float) -> ContextChanged | None:
        before = self.signals
        self._overrides.clear()
        return self._diff(before, t)

    def _merge(self, updates: Sequence[Update]) -> ContextChanged | None:
        if not updates:
            return None
        before = self.signals
        for update in updates:
            for name, raw in update.values.items():
                known = name in self._raw
                previous = self._raw.get(name)
                value = _quantise(name, raw, previous)
                # A never-seen signal that is unknown stays absent: unknown → unknown.
                if (known and value == previous) or (not known and value is None):
                    continue
                self._raw[name] = value
        return self._diff(before, max(u.t for u in updates))

    def _diff(self, before: Mapping[str, object], t: float) -> ContextChanged | None:
        after = self.signals
        changed = tuple(n for n in after if n not in before or before[n] != after[n])
        changed += tuple(n for n in before if n not in after)
        return ContextChanged(t, after, changed) if changed else None
