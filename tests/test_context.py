"""Context signals in virtual time: hangover, hysteresis, holds, staleness, quantisation."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from reactivex.scheduler import VirtualTimeScheduler

from ctxrobot.manifest.schema import (
    ContextSpec,
    HostContext,
    MotionContext,
    ObstacleContext,
    SignContext,
    VoiceContext,
)
from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import (
    AudioLevel,
    ContextChanged,
    HostReading,
    LaserScan,
    Odometry,
    TaskResult,
)
from ctxrobot.sched.context import (
    ContextTracker,
    SerializedScheduler,
    host_readings,
    host_signals,
    motion_signals,
    obstacle_signals,
    read_host,
    sign_signals,
    voice_signals,
)


class Rig:
    """A bus, a virtual clock, and the context changes published on it."""

    def __init__(self) -> None:
        self.bus = EventBus()
        self.vts = VirtualTimeScheduler(0.0)
        self.changes: list[ContextChanged] = []
        self.bus.subscribe("context", self.changes.append, name="test", inline=True)

    def at(self, t: float, topic: str, event: object) -> None:
        self.vts.schedule_absolute(t, lambda _s, _st: self.bus.publish(topic, event))

    def track(self, *sources: object) -> ContextTracker:
        tracker = ContextTracker(self.bus, sources)  # type: ignore[arg-type]
        tracker.start()
        return tracker

    def history(self, signal: str) -> list[tuple[float, object]]:
        """(time, value) of every published change of ``signal``."""
        return [(round(c.t, 6), c.signals[signal]) for c in self.changes if signal in c.changed]


def odometry(rig: Rig, samples: Iterable[tuple[float, float, float]]) -> None:
    for t, v, w in samples:
        rig.at(t, "sensor.odometry", Odometry("lidar", t, 0.0, 0.0, 0.0, v, w))


def ticks(start: float, stop: float, hz: float = 10.0) -> list[float]:
    n = round((stop - start) * hz)
    return [round(start + i / hz, 6) for i in range(n)]


def test_voice_hangover_bridges_pauses_and_ends_after_the_last_loud_chunk() -> None:
    rig = Rig()
    rig.track(
        voice_signals(rig.bus.stream("sensor.audio"), rig.vts, threshold_db=-35, hangover_s=0.3)
    )
    levels = {0.0: -60, 0.1: -20, 0.2: -50, 0.3: -50, 0.4: -20, 0.5: -60, 0.6: -60}
    levels |= {round(0.7 + i / 10, 6): -60 for i in range(5)}
    for t, db in levels.items():
        rig.at(t, "sensor.audio", AudioLevel("mic", t, db))
    rig.vts.advance_to(2.0)
    # The 0.2 s pause is inside the hangover; the voice ends 0.3 s after the 0.4 s chunk.
    assert rig.history("voice_active") == [(0.0, False), (0.1, True), (0.7, False)]


def test_motion_hysteresis_holds_a_state_through_noise_at_the_threshold() -> None:
    rig = Rig()
    rig.track(
        motion_signals(
            rig.bus.stream("sensor.odometry"),
            rig.vts,
            moving_speed=0.2,
            turning_rate=0.3,
            window_s=0.25,
        )
    )
    samples = [(t, 0.0, 0.0) for t in ticks(0.0, 1.0)]
    samples += [(t, 0.25, 0.0) for t in ticks(1.0, 2.0)]
    # Noise around the entry threshold, above the exit threshold (0.6 × 0.2 = 0.12).
    samples += [(t, 0.19 if i % 2 else 0.15, 0.0) for i, t in enumerate(ticks(2.0, 3.0))]
    samples += [(t, 0.05, 0.0) for t in ticks(3.0, 4.0)]
    samples += [(t, 0.05, 0.5) for t in ticks(4.0, 5.0)]
    # Turn rate noise between exit (0.18) and entry (0.3): still turning.
    samples += [(t, 0.05, 0.25) for t in ticks(5.0, 6.0)]
    samples += [(t, 0.0, 0.0) for t in ticks(6.0, 7.0)]
    odometry(rig, samples)
    rig.vts.advance_to(7.0)
    assert [v for _, v in rig.history("motion")] == [
        "stopped",
        "moving",
        "stopped",
        "turning",
        "stopped",
    ]
    moving_at, stopped_at = (t for t, _ in rig.history("motion")[1:3])
    assert 1.0 <= moving_at <= 1.2 and 3.0 <= stopped_at <= 3.3


def test_speed_is_quantised_so_sensor_noise_is_not_a_context_change() -> None:
    rig = Rig()
    rig.track(
        motion_signals(
            rig.bus.stream("sensor.odometry"),
            rig.vts,
            moving_speed=0.2,
            turning_rate=0.3,
            window_s=0.1,
        )
    )
    noisy = [0.50, 0.52, 0.48, 0.53, 0.47, 0.51, 0.49, 0.52]
    odometry(rig, [(i / 10, v, 0.0) for i, v in enumerate(noisy)])
    odometry(rig, [(0.8, 0.62, 0.0), (0.9, 0.61, 0.0)])
    rig.vts.advance_to(1.0)
    assert rig.history("speed") == [(0.0, 0.5), (0.8, 0.6)]
    assert len(rig.changes) == 2


def test_a_silent_odometry_stream_makes_motion_unknown() -> None:
    rig = Rig()
    tracker = rig.track(
        motion_signals(
            rig.bus.stream("sensor.odometry"),
            rig.vts,
            moving_speed=0.2,
            turning_rate=0.3,
            window_s=0.5,
        )
    )
    odometry(rig, [(t, 0.4, 0.0) for t in ticks(0.0, 1.0)])
    rig.vts.advance_to(5.0)
    assert rig.history("motion") == [(0.0, "moving"), (2.9, None)]  # 4 windows = 2 s
    assert tracker.signals["speed"] is None


def test_sign_ahead_is_held_after_the_last_detection() -> None:
    rig = Rig()
    rig.track(sign_signals(rig.bus.stream("task.result"), rig.vts, task="signs", hold_s=2.0))

    def result(t: float, detections: list[object], name: str = "signs") -> None:
        rig.at(
            t, "task.result", TaskResult(name, 0, t - 0.1, t - 0.05, t, {"detections": detections})
        )

    result(0.5, [])
    result(1.0, [{"name": "stop"}])
    result(1.5, [{"name": "stop"}])
    result(2.0, [])  # lost at close range: still held
    result(2.5, [{"name": "yield"}], name="slam")  # another task's result: ignored
    rig.vts.advance_to(5.0)
    assert rig.history("sign_ahead") == [(0.5, False), (1.0, True), (3.5, False)]


def test_obstacle_near_has_hysteresis_and_distance_is_quantised() -> None:
    rig = Rig()
    rig.track(obstacle_signals(rig.bus.stream("sensor.scan"), rig.vts, near_m=0.6))
    ranges = [2.0, 0.55, 0.65, 0.72, 0.8, 2.0]
    for i, r in enumerate(ranges):
        rig.at(i / 10, "sensor.scan", LaserScan("lidar", i / 10, r))
    rig.vts.advance_to(0.55)
    # Near below 0.6 m, clear only beyond 1.25 × 0.6 = 0.75 m.
    assert rig.history("obstacle_near") == [(0.0, False), (0.1, True), (0.4, False)]
    assert [d for _, d in rig.history("obstacle_distance")] == [2.0, 0.6, 0.7, 0.8, 2.0]


def test_host_signals_flag_throttling_at_hot_c() -> None:
    rig = Rig()
    temps = iter([60.0, 60.4, 85.0])

    def reader(t: float) -> HostReading:
        return HostReading(t, next(temps), False, 40.0, True)

    readings = host_readings(rig.vts, period_s=1.0, clock=lambda: rig.vts.clock, reader=reader)
    rig.track(host_signals(readings, hot_c=80.0))
    rig.vts.advance_to(2.5)
    assert rig.history("cpu_temp_c") == [(0.0, 60.0), (2.0, 85.0)]
    assert rig.history("throttled") == [(0.0, False), (2.0, True)]
    assert rig.changes[0].signals == {
        "cpu_temp_c": 60.0,
        "throttled": False,
        "battery_pct": 40.0,
        "on_battery": True,
    }


def test_tracker_from_config_wires_every_section_and_publishes_host_readings() -> None:
    rig = Rig()
    host_events: list[HostReading] = []
    rig.bus.subscribe("host", host_events.append, name="host", inline=True)
    config = ContextSpec(
        motion=MotionContext(source="lidar"),
        voice=VoiceContext(source="mic"),
        sign=SignContext(source="camera", task="signs", hold_s=1.0),
        obstacle=ObstacleContext(source="lidar", near_m=0.5),
        host=HostContext(period_s=1.0),
    )
    tracker = ContextTracker.from_config(
        rig.bus,
        config,
        rig.vts,
        clock=lambda: rig.vts.clock,
        host_reader=lambda t: HostReading(t, None, False, None, False),
    )
    tracker.start()
    rig.at(0.1, "sensor.odometry", Odometry("lidar", 0.1, 0, 0, 0, 0.5, 0.0))
    rig.at(0.1, "sensor.odometry", Odometry("other", 0.1, 0, 0, 0, 0.0, 0.0))  # other source
    rig.at(0.2, "sensor.audio", AudioLevel("mic", 0.2, -10.0))
    rig.at(0.3, "sensor.scan", LaserScan("lidar", 0.3, 0.4))
    rig.at(0.4, "task.result", TaskResult("signs", 1, 0.3, 0.35, 0.4, {"detections": [{}]}))
    rig.vts.advance_to(0.45)  # before the voice hangover (0.3 s) ends
    assert tracker.signals == {
        "throttled": False,
        "on_battery": False,
        "speed": 0.5,
        "turn_rate": 0.0,
        "motion": "moving",
        "voice_active": True,
        "obstacle_distance": 0.4,
        "obstacle_near": True,
        "sign_ahead": True,
    }
    assert len(host_events) == 1  # published on the bus at start; next one at 1.0 s
    tracker.stop()
    rig.vts.advance_to(3.0)
    assert len(host_events) == 1


@pytest.mark.parametrize(
    ("text", "throttled"), [("0x50005\n", True), ("0x50000\n", False), ("garbage", False)]
)
def test_read_host_on_this_machine(tmp_path: Path, text: str, throttled: bool) -> None:
    path = tmp_path / "get_throttled"
    path.write_text(text)
    reading = read_host(12.5, throttled_path=path)
    assert reading.t == 12.5 and reading.throttled is throttled
    assert reading.cpu_temp_c is None or -40.0 < reading.cpu_temp_c < 150.0
    assert reading.battery_pct is None or 0.0 <= reading.battery_pct <= 100.0


def test_read_host_without_a_throttle_report(tmp_path: Path) -> None:
    assert read_host(0.0, throttled_path=tmp_path / "absent").throttled is False


class DepthLock:
    """A context manager that records how deeply it is held."""

    def __init__(self) -> None:
        self.depth = 0

    def __enter__(self) -> None:
        self.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1


def test_serialized_scheduler_runs_every_timer_action_under_the_lock() -> None:
    vts = VirtualTimeScheduler(0.0)
    lock = DepthLock()
    wrapped = SerializedScheduler(vts, lock)
    seen: list[tuple[str, int]] = []

    def nested(_s: object, _st: object) -> None:
        seen.append(("nested", lock.depth))

    def once(scheduler: SerializedScheduler, _st: object) -> None:
        seen.append(("once", lock.depth))
        scheduler.schedule_relative(0.5, nested)  # goes through the wrapper too

    wrapped.schedule_relative(1.0, once)
    wrapped.schedule_periodic(0.4, lambda st: seen.append(("periodic", lock.depth)))
    vts.advance_to(1.7)
    # periodic at 0.4, 0.8, 1.2, 1.6; once at 1.0; nested at 1.5
    assert seen == [
        ("periodic", 1),
        ("periodic", 1),
        ("once", 1),
        ("periodic", 1),
        ("nested", 1),
        ("periodic", 1),
    ]
    assert lock.depth == 0


def test_each_subscription_has_its_own_state() -> None:
    rig = Rig()
    voice = voice_signals(rig.bus.stream("sensor.audio"), rig.vts, threshold_db=-35, hangover_s=1)
    first: list[object] = []
    second: list[object] = []
    voice.subscribe(lambda u: first.append(u.values["voice_active"]))
    rig.at(0.1, "sensor.audio", AudioLevel("mic", 0.1, -10.0))
    rig.vts.schedule_absolute(
        0.2, lambda _s, _st: voice.subscribe(lambda u: second.append(u.values["voice_active"]))
    )
    rig.at(0.3, "sensor.audio", AudioLevel("mic", 0.3, -60.0))
    rig.vts.advance_to(0.5)
    assert first == [True]  # still inside its hangover
    assert second == [False]  # a fresh subscriber has seen only silence


def test_overrides_pin_signals_until_cleared() -> None:
    rig = Rig()
    tracker = ContextTracker(
        rig.bus,
        [voice_signals(rig.bus.stream("sensor.audio"), rig.vts, threshold_db=-35, hangover_s=0.2)],
        clock=lambda: rig.vts.clock,
    )
    tracker.start()
    rig.at(0.1, "sensor.audio", AudioLevel("mic", 0.1, -60.0))
    rig.vts.schedule_absolute(0.2, lambda _s, _st: tracker.override({"voice_active": True}))
    rig.at(0.3, "sensor.audio", AudioLevel("mic", 0.3, -10.0))  # hidden by the pin
    rig.at(0.4, "sensor.audio", AudioLevel("mic", 0.4, -60.0))
    rig.vts.schedule_absolute(
        0.5, lambda _s, _st: tracker.override({"motion": "turning", "speed": 1})
    )
    rig.vts.schedule_absolute(0.7, lambda _s, _st: tracker.clear_overrides())
    rig.vts.advance_to(1.0)
    assert [(round(c.t, 6), c.changed) for c in rig.changes] == [
        (0.1, ("voice_active",)),
        (0.2, ("voice_active",)),
        (0.5, ("motion", "speed")),
        (0.7, ("voice_active", "motion", "speed")),  # back to the sensor's voice; no motion
    ]
    assert rig.changes[-1].signals == {"voice_active": False}
    assert tracker.overrides == {}


@pytest.mark.parametrize(
    ("signals", "message"),
    [
        ({"voice": True}, "unknown context signal 'voice'"),
        ({"voice_active": 1}, "voice_active takes a bool"),
        ({"speed": True}, "speed takes a float"),
        ({"motion": "parked"}, "motion is one of"),
    ],
)
def test_overrides_are_checked(signals: dict[str, object], message: str) -> None:
    tracker = ContextTracker(EventBus(), [])
    with pytest.raises(ValueError, match=message):
        tracker.override(signals)
    assert tracker.overrides == {}
