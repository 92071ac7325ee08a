"""Context signals in virtual time: hangover, hysteresis, holds, staleness, quantisation.

The machines are pure: a test feeds events in time order and lets deadlines fall due
between them, exactly as the decision thread does, with no thread, timer or clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import pytest

from ctxrobot.model.events import (
    AudioLevel,
    ContextChanged,
    HostReading,
    LaserScan,
    Odometry,
    TaskResult,
)
from ctxrobot.sched.signals import Context, Host, Motion, Obstacle, Sign, SignalMachine, Voice
from ctxrobot.service.host import read_host


class Timeline:
    """Events at times; ``run(until)`` plays them and every deadline in between."""

    def __init__(self, *machines: SignalMachine) -> None:
        self.context = Context(machines)
        self.events: list[tuple[float, int, object]] = []
        self.changes: list[ContextChanged] = []

    def at(self, t: float, event: object) -> None:
        self.events.append((t, len(self.events), event))

    def run(self, until: float) -> None:
        for t, _, event in sorted(self.events, key=lambda e: (e[0], e[1])):
            # An event at the very time a deadline falls wins: the loud chunk at 0.4 s
            # extends a hangover armed to end at 0.4 s.
            self._time_passes(math.nextafter(t, -math.inf))
            if isinstance(event, dict):  # an operator's pin (or {} to clear)
                change = (
                    self.context.override(event, t) if event else self.context.clear_overrides(t)
                )
            else:
                change = self.context.on_event(event)
            if change is not None:
                self.changes.append(change)
        self._time_passes(until)
        self.events.clear()

    def _time_passes(self, now: float) -> None:
        self.changes += self.context.on_time(now)

    def history(self, signal: str) -> list[tuple[float, object]]:
        """(time, value) of every change of ``signal``."""
        return [(round(c.t, 6), c.signals[signal]) for c in self.changes if signal in c.changed]


def odometry(line: Timeline, samples: Iterable[tuple[float, float, float]]) -> None:
    for t, v, w in samples:
        line.at(t, Odometry("lidar", t, 0.0, 0.0, 0.0, v, w))


def ticks(start: float, stop: float, hz: float = 10.0) -> list[float]:
    n = round((stop - start) * hz)
    return [round(start + i / hz, 6) for i in range(n)]


def motion(window_s: float) -> Motion:
    return Motion("lidar", moving_speed=0.2, turning_rate=0.3, window_s=window_s)


def test_voice_hangover_bridges_pauses_and_ends_after_the_last_loud_chunk() -> None:
    line = Timeline(Voice("mic", threshold_db=-35, hangover_s=0.3))
    levels = {0.0: -60, 0.1: -20, 0.2: -50, 0.3: -50, 0.4: -20, 0.5: -60, 0.6: -60}
    levels |= {round(0.7 + i / 10, 6): -60 for i in range(5)}
    for t, db in levels.items():
        line.at(t, AudioLevel("mic", t, db))
    line.run(2.0)
    # The 0.2 s pause is inside the hangover; the voice ends 0.3 s after the 0.4 s chunk.
    assert line.history("voice_active") == [(0.0, False), (0.1, True), (0.7, False)]


def test_motion_hysteresis_holds_a_state_through_noise_at_the_threshold() -> None:
    line = Timeline(motion(0.25))
    samples = [(t, 0.0, 0.0) for t in ticks(0.0, 1.0)]
    samples += [(t, 0.25, 0.0) for t in ticks(1.0, 2.0)]
    # Noise around the entry threshold, above the exit threshold (0.6 × 0.2 = 0.12).
    samples += [(t, 0.19 if i % 2 else 0.15, 0.0) for i, t in enumerate(ticks(2.0, 3.0))]
    samples += [(t, 0.05, 0.0) for t in ticks(3.0, 4.0)]
    samples += [(t, 0.05, 0.5) for t in ticks(4.0, 5.0)]
    # Turn rate noise between exit (0.18) and entry (0.3): still turning.
    samples += [(t, 0.05, 0.25) for t in ticks(5.0, 6.0)]
    samples += [(t, 0.0, 0.0) for t in ticks(6.0, 7.0)]
    odometry(line, samples)
    line.run(7.0)
    assert [v for _, v in line.history("motion")] == [
        "stopped",
        "moving",
        "stopped",
        "turning",
        "stopped",
    ]
    moving_at, stopped_at = (t for t, _ in line.history("motion")[1:3])
    assert 1.0 <= moving_at <= 1.2 and 3.0 <= stopped_at <= 3.3


def test_speed_is_quantised_so_sensor_noise_is_not_a_context_change() -> None:
    line = Timeline(motion(0.1))
    noisy = [0.50, 0.52, 0.48, 0.53, 0.47, 0.51, 0.49, 0.52]
    odometry(line, [(i / 10, v, 0.0) for i, v in enumerate(noisy)])
    odometry(line, [(0.8, 0.62, 0.0), (0.9, 0.61, 0.0)])
    line.run(1.0)
    assert line.history("speed") == [(0.0, 0.5), (0.8, 0.6)]
    assert len(line.changes) == 2


def test_a_silent_odometry_stream_makes_motion_unknown() -> None:
    line = Timeline(motion(0.5))
    odometry(line, [(t, 0.4, 0.0) for t in ticks(0.0, 1.0)])
    line.run(5.0)
    assert line.history("motion") == [(0.0, "moving"), (2.9, None)]  # 4 windows = 2 s
    assert line.context.signals["speed"] is None
    assert line.context.deadline is None


def test_another_sources_odometry_is_ignored() -> None:
    line = Timeline(motion(0.5))
    line.at(0.1, Odometry("wheels", 0.1, 0, 0, 0, 0.5, 0.0))
    line.run(5.0)
    assert line.changes == []


def test_sign_ahead_is_held_after_the_last_detection() -> None:
    line = Timeline(Sign("signs", hold_s=2.0))

    def result(t: float, detections: list[object], name: str = "signs") -> None:
        line.at(t, TaskResult(name, 0, t - 0.1, t - 0.05, t, {"detections": detections}))

    result(0.5, [])
    result(1.0, [{"name": "stop"}])
    result(1.5, [{"name": "stop"}])
    result(2.0, [])  # lost at close range: still held
    result(2.5, [{"name": "yield"}], name="slam")  # another task's result: ignored
    line.run(5.0)
    assert line.history("sign_ahead") == [(0.5, False), (1.0, True), (3.5, False)]


def test_a_shed_sample_says_nothing_about_signs() -> None:
    line = Timeline(Sign("signs", hold_s=2.0))
    line.at(0.5, TaskResult("signs", 0, 0.4, 0.45, 0.5, {"shed": "rate"}))
    line.run(1.0)
    assert line.changes == []


def test_obstacle_near_has_hysteresis_and_distance_is_quantised() -> None:
    line = Timeline(Obstacle("lidar", near_m=0.6))
    for i, r in enumerate([2.0, 0.55, 0.65, 0.72, 0.8, 2.0]):
        line.at(i / 10, LaserScan("lidar", i / 10, r))
    line.run(0.55)
    # Near below 0.6 m, clear only beyond 1.25 × 0.6 = 0.75 m.
    assert line.history("obstacle_near") == [(0.0, False), (0.1, True), (0.4, False)]
    assert [d for _, d in line.history("obstacle_distance")] == [2.0, 0.6, 0.7, 0.8, 2.0]


def test_host_signals_flag_throttling_at_hot_c() -> None:
    line = Timeline(Host(hot_c=80.0))
    for t, temp in ((0.0, 60.0), (1.0, 60.4), (2.0, 85.0)):
        line.at(t, HostReading(t, temp, False, 40.0, True))
    line.run(2.5)
    assert line.history("cpu_temp_c") == [(0.0, 60.0), (2.0, 85.0)]
    assert line.history("throttled") == [(0.0, False), (2.0, True)]
    assert line.changes[0].signals == {
        "cpu_temp_c": 60.0,
        "throttled": False,
        "battery_pct": 40.0,
        "on_battery": True,
    }


def test_every_section_together() -> None:
    line = Timeline(
        motion(0.5),
        Voice("mic", threshold_db=-35, hangover_s=0.3),
        Sign("signs", hold_s=1.0),
        Obstacle("lidar", near_m=0.5),
        Host(hot_c=80.0),
    )
    line.at(0.0, HostReading(0.0, None, False, None, False))
    line.at(0.1, Odometry("lidar", 0.1, 0, 0, 0, 0.5, 0.0))
    line.at(0.2, AudioLevel("mic", 0.2, -10.0))
    line.at(0.3, LaserScan("lidar", 0.3, 0.4))
    line.at(0.4, TaskResult("signs", 1, 0.3, 0.35, 0.4, {"detections": [{}]}))
    line.run(0.45)  # before the voice hangover (0.3 s) ends
    assert line.context.signals == {
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
    assert line.context.deadline == pytest.approx(0.5)  # the voice hangover


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


def test_overrides_pin_signals_until_cleared() -> None:
    line = Timeline(Voice("mic", threshold_db=-35, hangover_s=0.2))
    line.at(0.1, AudioLevel("mic", 0.1, -60.0))
    line.at(0.2, {"voice_active": True})
    line.at(0.3, AudioLevel("mic", 0.3, -10.0))  # hidden by the pin
    line.at(0.4, AudioLevel("mic", 0.4, -60.0))
    line.at(0.5, {"motion": "turning", "speed": 1})
    line.at(0.7, {})
    line.run(1.0)
    assert [(round(c.t, 6), c.changed) for c in line.changes] == [
        (0.1, ("voice_active",)),
        (0.2, ("voice_active",)),
        (0.5, ("motion", "speed")),
        (0.7, ("voice_active", "motion", "speed")),  # back to the sensor's voice; no motion
    ]
    assert line.changes[-1].signals == {"voice_active": False}
    assert line.context.overrides == {}


@pytest.mark.parametrize(
    ("signals", "message"),
    [
        ({"voice": True}, "unknown context signal 'voice'"),
        ({"voice_active": 1}, "voice_active takes a bool"),
        ({"speed": True}, "speed takes a float"),
        ({"motion": "parked"}, "motion is one of"),
    ],
)
def test_overrides_are_checked_all_or_nothing(signals: dict[str, object], message: str) -> None:
    context = Context([])
    with pytest.raises(ValueError, match=message):
        context.override({"voice_active": True, **signals}, 0.0)
    assert context.overrides == {}
