"""Replay sources on the real shared data: timelines, samples, bus events, pacing."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from ctxrobot.model.events import AudioLevel, CameraFrame, LaserScan, Odometry
from ctxrobot.streams.replay import (
    AudioReplay,
    CameraReplay,
    LaserReplay,
    ScenarioPlayer,
    pose_velocities,
)
from ctxrobot.streams.source import Fired
from ctxtask.protocol import Sample
from tests.conftest import require_data


def test_pose_velocities_of_a_straight_drive_and_a_turn() -> None:
    t = np.arange(0.0, 10.0, 0.1)
    # 0.5 m/s along x for 5 s, then turning in place at 1 rad/s across the ±π wrap.
    x = np.where(t < 5, 0.5 * t, 2.5)
    theta = np.where(t < 5, 3.0, 3.0 + (t - 5))
    theta = (theta + np.pi) % (2 * np.pi) - np.pi
    odom = np.column_stack([t, x, np.zeros_like(t), theta])
    v, w = pose_velocities(odom, np.array([3.0, 8.0]))
    assert v == pytest.approx([0.5, 0.0], abs=1e-9)
    assert w == pytest.approx([0.0, 1.0], abs=1e-9)


def test_laser_replay_timeline_on_intel() -> None:
    intel = require_data("slam/intel")
    source = LaserReplay("lidar", intel, start_s=26.0, speed=1.0)
    ticks = list(source.timeline(10.0))
    # The log runs at ~5.1 Hz.
    assert 45 <= len(ticks) <= 56
    offsets = [tick.offset_s for tick in ticks]
    assert offsets == sorted(offsets) and offsets[0] >= 0 and offsets[-1] <= 10.0
    fired = ticks[3].fire(100.0, 3)
    topics = [topic for topic, _ in fired.events]
    assert topics == ["sensor.odometry", "sensor.scan"]
    odom, scan = (event for _, event in fired.events)
    assert isinstance(odom, Odometry) and isinstance(scan, LaserScan)
    assert odom.t == scan.t == fired.sample.t_sensor == 100.0
    ranges = fired.sample.array()
    assert ranges.shape == (180,) and ranges.dtype == np.float32
    assert scan.min_range_m == pytest.approx(float(ranges[ranges < 81.0].min()))
    assert fired.sample.meta["angle_increment"] == pytest.approx(np.radians(1.0))
    # Motion comes from the poses: the Intel log's velocity columns are all zero.
    speeds = [tick.fire(0.0, 0).events[0][1].v for tick in ticks]
    assert max(speeds) > 0.2


def test_a_laser_log_without_odometry_replays_scans_that_say_so(tmp_path: Path) -> None:
    """A recording of a lidar without an odometry feed has an odometry file without rows: the
    replayed scans carry ``odom: None`` and no ``Odometry`` event, as the live source sent."""
    intel = require_data("slam/intel")
    folder = tmp_path / "no-odometry"
    folder.mkdir()
    for name in ("intel_laser.txt.gz", "laser.yaml"):
        (folder / name).write_bytes((intel / name).read_bytes())
    (folder / "intel_odom.txt").write_text("# the pose each scan carried; none: no feed\n")
    ticks = list(LaserReplay("lidar", folder, start_s=26.0).timeline(2.0))
    assert len(ticks) >= 5
    for tick in ticks:
        fired = tick.fire(100.0, 0)
        assert [topic for topic, _ in fired.events] == ["sensor.scan"]
        assert fired.sample.meta["odom"] is None


def test_camera_replay_shows_scheduled_signs_between_idle_scenes() -> None:
    images = require_data("signs/road-sign-detection-subset/images")
    idle = sorted(images.glob("road1*.png"))[:3]
    stop = images / "road52.png"
    source = CameraReplay("camera", 5.0, (640, 480), idle, [(2.0, stop, 1.0)])
    ticks = list(source.timeline(4.0))
    assert len(ticks) == 21  # 0.0, 0.2, … 4.0 s
    names = [tick.fire(0.0, i).sample.meta["name"] for i, tick in enumerate(ticks)]
    assert names[10:15] == ["road52.png"] * 5  # 2.0 ≤ t < 3.0
    assert "road52.png" not in names[:10] + names[15:]
    frame = ticks[10].fire(0.0, 10)
    assert frame.sample.array().shape == (480, 640, 3)
    activity = [tick.fire(0.0, 0).events[0][1].activity for tick in ticks]
    assert activity[10] > 0.01, "the scene changes when the sign appears"
    assert activity[11] == 0.0, "a held scene does not change"
    assert isinstance(ticks[0].fire(0.0, 0).events[0][1], CameraFrame)


def test_audio_replay_places_utterances_in_silence() -> None:
    wav = require_data("speech/audio/ps_goforward.wav")
    source = AudioReplay("mic", 100, [(1.0, wav)])
    ticks = list(source.timeline(5.0))
    assert len(ticks) == 50
    assert ticks[0].offset_s == pytest.approx(0.1), "a chunk exists once it is recorded"
    levels = [tick.fire(0.0, i).events[0][1].rms_db for i, tick in enumerate(ticks)]
    assert max(levels[:10]) < -80, "silence before the utterance"
    assert max(levels[10:38]) > -40, "speech in the 2.8 s utterance"
    sample = ticks[15].fire(0.0, 15).sample
    assert sample.meta == {"rate": 16000, "utterance": "ps_goforward.wav"}
    assert sample.array().shape == (1600,) and sample.array().dtype == np.int16
    assert isinstance(ticks[0].fire(0.0, 0).events[0][1], AudioLevel)


def test_player_fires_on_time_and_in_order(tmp_path: Path) -> None:
    wav = require_data("speech/audio/ps_cards_001.wav")
    levels: list[AudioLevel] = []
    delivered: list[tuple[str, Sample]] = []

    def emit(source: str, fired: Fired) -> None:
        levels.extend(event for _, event in fired.events if isinstance(event, AudioLevel))
        delivered.append((source, fired.sample))

    player = ScenarioPlayer([AudioReplay("mic", 100, [(0.2, wav)])], 1.5, emit)
    t0 = time.monotonic()
    player.start(t0)
    assert player.join(10)
    assert player.fired == len(delivered) == 15
    assert [s.id for _, s in delivered] == list(range(15))
    stamps = [s.t_sensor for _, s in delivered]
    assert stamps == sorted(stamps)
    assert stamps[-1] - t0 >= 1.5, "never early"
    assert [e.t for e in levels] == stamps
    print(f"\nplayer: worst lateness {player.late_ms_max:.2f} ms")


def test_player_loops_for_the_daemon() -> None:
    wav = require_data("speech/audio/ps_cards_001.wav")
    delivered: list[Sample] = []
    player = ScenarioPlayer(
        [AudioReplay("mic", 100, [(0.0, wav)])],
        0.3,
        lambda _src, fired: delivered.append(fired.sample),
        loop=True,
    )
    player.start(time.monotonic())
    time.sleep(1.0)
    player.stop()
    assert player.join(5)
    assert len(delivered) >= 6, "the 0.3 s scenario played more than once"
    assert [s.id for s in delivered] == list(range(len(delivered)))
