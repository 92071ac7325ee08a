"""Sensor streams → context signals, and the tracker that publishes context changes.

Each ``*_signals`` function is a reactivex operator from one kind of bus event to a stream
of :class:`SignalUpdate` (a time and some signal values, named as in
:data:`ctxrobot.rules.CONTEXT_SIGNALS`). Behaviour over time (a voice hangover, a sign held
after its last detection, a sensor going quiet) uses timers on the ``scheduler`` passed in,
so the same code runs in real time and under a ``VirtualTimeScheduler``. Updates are stamped
on the *event* clock: a timer-made update carries the time of the event that armed it plus
the delay, never a clock read, so results are deterministic in tests and consistent with
sensor times in a run.

:class:`ContextTracker` merges the update streams and publishes ``ContextChanged`` on the bus
only when a signal's value changes. Continuous signals are quantised with a dead band (a
value must move a whole step from the last published one) so sensor noise does not turn into
a context change per sample; the scheduler re-plans on every context change, so a flickering
signal would cost CPU exactly when CPU is short.

Thread safety: bus events arrive in the publisher's thread (under the bus lock), timers fire
in the scheduler's. A run gives the operators a :class:`SerializedScheduler` holding the bus
lock, so timer work is ordered with inline delivery exactly as another publisher would be:
without it, a hangover's "voice off" computed on the timer thread could be published after
a newer "voice on" from the audio thread. Each operator also guards its own state with a
lock and emits outside it (safe with any scheduler), and timers carry a generation number so
one made stale by a newer event does nothing.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import psutil
import reactivex
from reactivex import Observable
from reactivex import operators as ops
from reactivex import typing as rxtyping
from reactivex.abc import DisposableBase, ObserverBase, SchedulerBase
from reactivex.disposable import CompositeDisposable, SerialDisposable
from reactivex.scheduler.periodicscheduler import PeriodicScheduler

from ctxrobot.manifest.schema import ContextSpec
from ctxrobot.model.bus import EventBus
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
    "ContextTracker",
    "SerializedScheduler",
    "SignalUpdate",
    "host_readings",
    "host_signals",
    "motion_signals",
    "obstacle_signals",
    "read_host",
    "sign_signals",
    "voice_signals",
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

# Raspberry Pi firmware's throttle report; bits 0-3 are the *current* conditions
# (under-voltage, frequency capped, throttled, soft temperature limit).
PI_THROTTLED = Path("/sys/devices/platform/soc/soc:firmware/get_throttled")
_THROTTLED_NOW_MASK = 0xF
# psutil sensor groups that carry the CPU/SoC temperature, best first.
_CPU_SENSORS = ("cpu_thermal", "cpu-thermal", "soc_thermal", "coretemp", "k10temp", "zenpower")


class SerializedScheduler(PeriodicScheduler):
    """Runs every action of ``inner`` while holding ``lock`` (re-entrant, e.g. the bus's).

    Timers then behave like one more publisher on the bus: they never interleave with an
    inline delivery, and take locks in the same order (bus first) as inline subscribers do.
    Nested scheduling from inside an action goes through this wrapper too.
    """

    def __init__(self, inner: SchedulerBase, lock: AbstractContextManager[Any]) -> None:
        super().__init__()
        self.inner = inner
        self._lock = lock

    @property
    def now(self) -> datetime:
        return self.inner.now

    def _wrap(self, action: rxtyping.ScheduledAction[Any]) -> rxtyping.ScheduledAction[Any]:
        def locked(_scheduler: SchedulerBase, state: Any) -> Any:
            with self._lock:
                return action(self, state)

        return locked

    def schedule(self, action: rxtyping.ScheduledAction[Any], state: Any = None) -> DisposableBase:
        return self.inner.schedule(self._wrap(action), state)

    def schedule_relative(
        self,
        duetime: rxtyping.RelativeTime,
        action: rxtyping.ScheduledAction[Any],
        state: Any = None,
    ) -> DisposableBase:
        return self.inner.schedule_relative(duetime, self._wrap(action), state)

    def schedule_absolute(
        self,
        duetime: rxtyping.AbsoluteTime,
        action: rxtyping.ScheduledAction[Any],
        state: Any = None,
    ) -> DisposableBase:
        return self.inner.schedule_absolute(duetime, self._wrap(action), state)


@dataclass(frozen=True, slots=True)
class SignalUpdate:
    """New values of some context signals at time ``t`` (None: the signal is unknown)."""

    t: float
    values: Mapping[str, object]


_Emit = Callable[[SignalUpdate], None]


class _Timed:
    """State shared by an operator's event handler and its one pending timer."""

    def __init__(self, scheduler: SchedulerBase) -> None:
        self.scheduler = scheduler
        self.lock = threading.Lock()
        self.generation = 0
        self.timer = SerialDisposable()

    def arm(
        self,
        delay_s: float,
        fire: Callable[[], SignalUpdate | None],
        emit: _Emit,
    ) -> None:
        """(Re)arm the timer; call with ``lock`` held. ``fire`` runs under the lock and
        its update is emitted after it is released, unless a newer event superseded it."""
        self.generation += 1
        armed = self.generation

        def action(_scheduler: SchedulerBase, _state: object) -> None:
            with self.lock:
                update = fire() if self.generation == armed else None
            if update is not None:
                emit(update)

        self.timer.disposable = self.scheduler.schedule_relative(max(delay_s, 0.0), action)


class _Step(Protocol):
    """One subscription's state machine: handles an event (under the lock), may arm the
    timer, returns the update to emit now (or None)."""

    def __call__(self, event: Any, timed: _Timed, emit: _Emit, /) -> SignalUpdate | None: ...


def _operator(
    source: Observable[Any], scheduler: SchedulerBase, make_step: Callable[[], _Step]
) -> Observable[SignalUpdate]:
    """An Observable of the updates ``make_step()`` derives from ``source``. Each
    subscription gets its own step and timer, so two subscribers never share a window."""

    def subscribe(observer: ObserverBase[SignalUpdate], _: SchedulerBase | None = None) -> Any:
        timed = _Timed(scheduler)
        step = make_step()

        def on_next(event: Any) -> None:
            with timed.lock:
                update = step(event, timed, observer.on_next)
            if update is not None:
                observer.on_next(update)

        sub = source.subscribe(on_next, observer.on_error, observer.on_completed)
        return CompositeDisposable(sub, timed.timer)

    return reactivex.create(subscribe)


class _Motion:
    def __init__(self, moving_speed: float, turning_rate: float, window_s: float) -> None:
        self.moving_speed = moving_speed
        self.turning_rate = turning_rate
        self.window_s = window_s
        self.stale_s = max(STALE_MIN_S, STALE_WINDOWS * window_s)
        self.window: deque[tuple[float, float, float]] = deque()
        self.motion = "stopped"

    def _classify(self, speed: float, turn: float) -> str:
        exit_turn = MOTION_EXIT_RATIO * self.turning_rate
        if turn >= self.turning_rate or (self.motion == "turning" and turn >= exit_turn):
            return "turning"
        exit_speed = MOTION_EXIT_RATIO * self.moving_speed
        if speed >= self.moving_speed or (self.motion != "stopped" and speed >= exit_speed):
            return "moving"
        return "stopped"

    def __call__(self, ev: Odometry, timed: _Timed, emit: _Emit) -> SignalUpdate:
        self.window.append((ev.t, ev.v, ev.w))
        while self.window[0][0] < ev.t - self.window_s:
            self.window.popleft()
        speed = abs(sum(v for _, v, _ in self.window) / len(self.window))
        turn = abs(sum(w for _, _, w in self.window) / len(self.window))
        self.motion = self._classify(speed, turn)

        def dead() -> SignalUpdate:
            self.window.clear()
            self.motion = "stopped"
            unknown = {"speed": None, "turn_rate": None, "motion": None}
            return SignalUpdate(ev.t + self.stale_s, unknown)

        timed.arm(self.stale_s, dead, emit)
        return SignalUpdate(ev.t, {"speed": speed, "turn_rate": turn, "motion": self.motion})


def motion_signals(
    odometry: Observable[Odometry],
    scheduler: SchedulerBase,
    *,
    moving_speed: float,
    turning_rate: float,
    window_s: float,
) -> Observable[SignalUpdate]:
    """``speed`` and ``turn_rate`` (magnitudes of the mean forward speed and turn rate over
    the last ``window_s`` of odometry) and ``motion``: "turning" at ``turning_rate`` or
    more, else "moving" at ``moving_speed`` or more, else "stopped", each state left only
    below :data:`MOTION_EXIT_RATIO` of its threshold so it does not flicker. Silent for
    :data:`STALE_WINDOWS` windows (at least :data:`STALE_MIN_S`), all three become unknown."""
    return _operator(odometry, scheduler, lambda: _Motion(moving_speed, turning_rate, window_s))


class _Voice:
    def __init__(self, threshold_db: float, hangover_s: float) -> None:
        self.threshold_db = threshold_db
        self.hangover_s = hangover_s
        self.active: bool | None = None  # None until the first chunk

    def __call__(self, ev: AudioLevel, timed: _Timed, emit: _Emit) -> SignalUpdate | None:
        if ev.rms_db < self.threshold_db:
            # A pending hangover timer ends the voice; before any voice, audio flowing
            # means the signal is known false rather than unknown.
            if self.active is None:
                self.active = False
                return SignalUpdate(ev.t, {"voice_active": False})
            return None
        was = self.active

        def silence() -> SignalUpdate:
            self.active = False
            return SignalUpdate(ev.t + self.hangover_s, {"voice_active": False})

        self.active = True
        timed.arm(self.hangover_s, silence, emit)
        return None if was else SignalUpdate(ev.t, {"voice_active": True})


def voice_signals(
    audio: Observable[AudioLevel],
    scheduler: SchedulerBase,
    *,
    threshold_db: float,
    hangover_s: float,
) -> Observable[SignalUpdate]:
    """``voice_active``: true from the first chunk at ``threshold_db`` or louder until
    ``hangover_s`` after the last such chunk, so the pauses between words do not end it."""
    return _operator(audio, scheduler, lambda: _Voice(threshold_db, hangover_s))


def _has_detections(result: Mapping[str, Any]) -> bool:
    detections = result.get("detections")
    return isinstance(detections, list | tuple) and len(detections) > 0


class _Sign:
    def __init__(self, task: str, hold_s: float) -> None:
        self.task = task
        self.hold_s = hold_s
        self.held: bool | None = None  # None until the task's first result

    def __call__(self, ev: TaskResult, timed: _Timed, emit: _Emit) -> SignalUpdate | None:
        if ev.task != self.task:
            return None
        if not _has_detections(ev.result):
            if self.held is None:
                self.held = False
                return SignalUpdate(ev.t_end, {"sign_ahead": False})
            return None
        was = self.held

        def release() -> SignalUpdate:
            self.held = False
            return SignalUpdate(ev.t_end + self.hold_s, {"sign_ahead": False})

        self.held = True
        timed.arm(self.hold_s, release, emit)
        return None if was else SignalUpdate(ev.t_end, {"sign_ahead": True})


def sign_signals(
    results: Observable[TaskResult],
    scheduler: SchedulerBase,
    *,
    task: str,
    hold_s: float,
) -> Observable[SignalUpdate]:
    """``sign_ahead``: true when ``task`` reports a non-empty ``detections`` list, held
    ``hold_s`` after the last such result (the robot is still approaching the sign when
    the detector loses it at close range). Stamped when the result arrived (``t_end``):
    that is when the host learnt of the sign."""
    return _operator(results, scheduler, lambda: _Sign(task, hold_s))


class _Obstacle:
    def __init__(self, near_m: float) -> None:
        self.near_m = near_m
        self.near = False

    def __call__(self, ev: LaserScan, timed: _Timed, emit: _Emit) -> SignalUpdate:
        d = ev.min_range_m
        self.near = d < self.near_m or (self.near and d <= OBSTACLE_CLEAR_RATIO * self.near_m)

        def dead() -> SignalUpdate:
            self.near = False
            unknown = {"obstacle_distance": None, "obstacle_near": None}
            return SignalUpdate(ev.t + STALE_MIN_S, unknown)

        timed.arm(STALE_MIN_S, dead, emit)
        distance = d if math.isfinite(d) else None  # no return in range: distance unknown
        return SignalUpdate(ev.t, {"obstacle_distance": distance, "obstacle_near": self.near})


def obstacle_signals(
    scans: Observable[LaserScan],
    scheduler: SchedulerBase,
    *,
    near_m: float,
) -> Observable[SignalUpdate]:
    """``obstacle_distance`` (nearest return, m) and ``obstacle_near``: true below
    ``near_m``, false again only beyond :data:`OBSTACLE_CLEAR_RATIO` × ``near_m``.
    Without a scan for :data:`STALE_MIN_S`, both become unknown."""
    return _operator(scans, scheduler, lambda: _Obstacle(near_m))


def _cpu_temperature() -> float | None:
    read = getattr(psutil, "sensors_temperatures", None)  # absent on macOS and Windows
    if read is None:
        return None
    try:
        groups = read()
    except (OSError, RuntimeError):
        return None
    for name in (*_CPU_SENSORS, *groups):
        readings = [s.current for s in groups.get(name, ()) if s.current is not None]
        if readings:
            return float(max(readings))
    return None


def _pi_throttled(path: Path) -> bool:
    try:
        return bool(int(path.read_text().strip(), 16) & _THROTTLED_NOW_MASK)
    except (OSError, ValueError):
        return False


def read_host(t: float, throttled_path: Path = PI_THROTTLED) -> HostReading:
    """Host health now; a sensor the machine lacks reads as None (or not throttled)."""
    battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
    return HostReading(
        t=t,
        cpu_temp_c=_cpu_temperature(),
        throttled=_pi_throttled(throttled_path),
        battery_pct=None if battery is None else float(battery.percent),
        on_battery=battery is not None and battery.power_plugged is False,
    )


def host_readings(
    scheduler: SchedulerBase,
    *,
    period_s: float,
    clock: Callable[[], float] = time.monotonic,
    reader: Callable[[float], HostReading] = read_host,
) -> Observable[HostReading]:
    """A :class:`HostReading` at once and every ``period_s`` after."""
    return reactivex.timer(0.0, period_s, scheduler=scheduler).pipe(
        ops.map(lambda _: reader(clock()))
    )


def host_signals(readings: Observable[HostReading], *, hot_c: float) -> Observable[SignalUpdate]:
    """``cpu_temp_c``, ``battery_pct``, ``on_battery`` as read, and ``throttled``: the
    firmware says so, or the CPU is at ``hot_c`` or more (machines without a throttle
    report are about to throttle there)."""

    def convert(r: HostReading) -> SignalUpdate:
        hot = r.cpu_temp_c is not None and r.cpu_temp_c >= hot_c
        return SignalUpdate(
            r.t,
            {
                "cpu_temp_c": r.cpu_temp_c,
                "throttled": r.throttled or hot,
                "battery_pct": r.battery_pct,
                "on_battery": r.on_battery,
            },
        )

    return readings.pipe(ops.map(convert))


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


def _check_override(name: str, value: object) -> None:
    """Reject a pin the rules could never read the way the operator meant."""
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


class ContextTracker:
    """Merges signal update streams into one context; publishes ``ContextChanged`` on the
    bus's ``context`` topic when (and only when) some signal's effective value changes.

    ``producers`` start something that feeds the sources (the host reading timer); they
    are started after every source is subscribed, so a first reading is not lost.
    Operators may **override** (pin) signals for bench tests: a pinned signal keeps its
    pinned value whatever the sensors say, until the pins are cleared. ``clock`` stamps
    the context changes overrides cause.
    """

    def __init__(
        self,
        bus: EventBus,
        sources: Iterable[Observable[SignalUpdate]],
        producers: Iterable[Callable[[], DisposableBase]] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bus = bus
        self._sources = list(sources)
        self._producers = list(producers)
        self._clock = clock
        self._lock = threading.Lock()
        self._raw: dict[str, object] = {}  # as the sensors say, quantised
        self._overrides: dict[str, object] = {}
        self._subscription = CompositeDisposable()

    @classmethod
    def from_config(
        cls,
        bus: EventBus,
        config: ContextSpec,
        scheduler: SchedulerBase,
        *,
        clock: Callable[[], float] = time.monotonic,
        host_reader: Callable[[float], HostReading] = read_host,
    ) -> ContextTracker:
        """The signals a manifest's ``context:`` section asks for, from the bus's sensor
        topics (``sign`` from its task's results; its ``source`` is the camera that task
        reads). Host readings are taken every ``host.period_s`` and published on ``host``
        (so the run database sees them too) and read back from there."""

        def of(topic: str, source: str) -> Observable[Any]:
            return bus.stream(topic).pipe(ops.filter(lambda ev: ev.source == source))

        sources: list[Observable[SignalUpdate]] = []
        if config.motion is not None:
            m = config.motion
            sources.append(
                motion_signals(
                    of("sensor.odometry", m.source),
                    scheduler,
                    moving_speed=m.moving_speed,
                    turning_rate=m.turning_rate,
                    window_s=m.window_s,
                )
            )
        if config.voice is not None:
            v = config.voice
            sources.append(
                voice_signals(
                    of("sensor.audio", v.source),
                    scheduler,
                    threshold_db=v.threshold_db,
                    hangover_s=v.hangover_s,
                )
            )
        if config.sign is not None:
            s = config.sign
            sources.append(
                sign_signals(bus.stream("task.result"), scheduler, task=s.task, hold_s=s.hold_s)
            )
        if config.obstacle is not None:
            sources.append(
                obstacle_signals(
                    of("sensor.scan", config.obstacle.source),
                    scheduler,
                    near_m=config.obstacle.near_m,
                )
            )
        producers: list[Callable[[], DisposableBase]] = []
        if config.host is not None:
            h = config.host
            # Sensor files are read off the bus lock (psutil can take milliseconds on some
            # boards); publishing takes the lock like any other source.
            timer = scheduler.inner if isinstance(scheduler, SerializedScheduler) else scheduler
            readings = host_readings(timer, period_s=h.period_s, clock=clock, reader=host_reader)
            sources.append(host_signals(bus.stream("host"), hot_c=h.hot_c))
            producers.append(
                lambda: readings.subscribe(lambda r: bus.publish("host", r), scheduler=timer)
            )
        return cls(bus, sources, producers, clock=clock)

    @property
    def signals(self) -> dict[str, object]:
        """A copy of the current (effective) context: sensor values, pins applied."""
        with self._lock:
            return self._effective()

    @property
    def overrides(self) -> dict[str, object]:
        """A copy of the pinned signals."""
        with self._lock:
            return dict(self._overrides)

    def start(self) -> None:
        for source in self._sources:
            self._subscription.add(source.subscribe(self._on_update))
        for start in self._producers:
            self._subscription.add(start())

    def stop(self) -> None:
        self._subscription.dispose()

    def override(self, signals: Mapping[str, object]) -> None:
        """Pin ``signals`` to these values (None pins a signal as unknown)."""
        for name, value in signals.items():
            _check_override(name, value)
        self._change(lambda: self._overrides.update(signals), None)

    def clear_overrides(self) -> None:
        """Unpin every signal: the sensors' values apply again."""
        self._change(self._overrides.clear, None)

    def _on_update(self, update: SignalUpdate) -> None:
        def merge() -> None:
            for name, raw in update.values.items():
                known = name in self._raw
                previous = self._raw.get(name)
                value = _quantise(name, raw, previous)
                # A never-seen signal that is unknown stays absent: unknown → unknown.
                if (known and value == previous) or (not known and value is None):
                    continue
                self._raw[name] = value

        self._change(merge, update.t)

    def _effective(self) -> dict[str, object]:
        return {**self._raw, **self._overrides}

    def _change(self, mutate: Callable[[], None], t: float | None) -> None:
        """Apply ``mutate`` to the tracker's state and publish what it changed.

        Under the bus lock (already held when called from an inline delivery or a
        serialized timer): context changes are then published in the order they were
        computed, whichever thread computed them.
        """
        with self._bus.delivery_lock:
            with self._lock:
                before = self._effective()
                mutate()
                after = self._effective()
            changed = tuple(n for n in after if n not in before or before[n] != after[n])
            changed += tuple(n for n in before if n not in after)
            if changed:
                when = self._clock() if t is None else t
                self._bus.publish("context", ContextChanged(when, after, changed))
