"""``ctxrobot record`` on live sources (an emulated RPLidar with odometry, an IP camera, a
microphone behind a real sound server), then the round trip: the recording replays to the same
samples, and ``ctxrobot run`` plays it unchanged."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from ctxrobot.manifest.schema import load_scenario
from ctxrobot.streams.replay import ScenarioPlayer, build_sources
from ctxrobot.streams.source import Fired
from ctxtask.datasets.laser import load_laser_dataset
from ctxtask.datasets.speech import read_wav
from tests.conftest import REPO, require_data, require_image
from tests.test_live_lidar import what_the_lidar_sees
from tests.test_live_support import (
    RT_PRIORITY,
    SWITCH_INTERVAL_S,
    LidarEmulator,
    MjpegCamera,
    free_port,
    play,
    pulse_server,
    street_frames,
    task_entry,
    wait_until,
    write_live_manifest,
)

CTXROBOT = (sys.executable, "-m", "ctxrobot")
SECONDS = 8.0  # recorded
START_S = 26.0  # where the Intel robot starts driving
MOUNT = [0.1, 0.0, 0.0]  # the lidar 10 cm ahead of the base's centre, as the manifest says


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A recorded session: (the manifest it was recorded with, the recording's folder)."""
    data = require_data()
    folder = tmp_path_factory.mktemp("record")
    port = free_port()
    with pulse_server(folder / "pulse") as env:
        emulator = LidarEmulator(
            data / "slam" / "intel", folder / "rplidar", odometry_port=port, start_s=START_S
        ).start()
        ip_camera = MjpegCamera(street_frames(data, stop_every=4), fps=10)
        manifest = write_live_manifest(
            folder,
            data,
            {
                "lidar": {
                    "kind": "rplidar",
                    "port": str(folder / "rplidar"),
                    "odometry": {"udp": f"127.0.0.1:{port}"},
                    "mount": MOUNT,
                },
                "camera": {"kind": "camera", "device": ip_camera.url, "fps": 10},
                "mic": {"kind": "microphone", "device": "pulse", "chunk_ms": 100},
            },
            task_entry("slam", "ctxrobot/slam", "lidar", depth=8)
            + task_entry("signs", "ctxrobot/signs", "camera")
            + task_entry("speech", "ctxrobot/speech", "mic", depth=64, overflow="block"),
            motion="{source: lidar}",
            voice="{source: mic}",
        )
        out = folder / "session"
        recorder = subprocess.Popen(
            [
                *CTXROBOT,
                "record",
                "--config",
                str(manifest),
                "--out",
                str(out),
                "--duration",
                str(SECONDS),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # The session starts once every sensor delivers; its first frame marks it.
            wait_until(lambda: (out / "camera" / "000000.png").exists(), 60, "the session")
            time.sleep(1.0)
            play(data / "speech" / "audio" / "ps_goforward.wav", env)
            stdout, stderr = recorder.communicate(timeout=120)
        finally:
            emulator.stop()
            ip_camera.stop()
            if recorder.poll() is None:
                recorder.kill()
    assert recorder.returncode == 0, stderr
    print(stdout)
    return manifest, out


def test_the_recording_is_what_the_sensors_sent(session: tuple[Path, Path]) -> None:
    _, out = session
    data = require_data()
    intel = load_laser_dataset(data / "slam" / "intel")
    recorded = load_laser_dataset(out / "lidar")
    # The scans are the log's, in order, from where the session started; so are the poses.
    first = next(
        k
        for k in range(len(intel.stamps))
        if np.array_equal(recorded.ranges[0], what_the_lidar_sees(intel, k))
    )
    for k, ranges in enumerate(recorded.ranges):
        assert np.array_equal(ranges, what_the_lidar_sees(intel, first + k)), f"scan {k}"
    poses = intel.odom_at_scans[first : first + len(recorded.ranges)]
    # The odometry feed sends six decimals.
    print(f"recorded poses vs the log's: {np.abs(recorded.odom_at_scans - poses).max():.2e} apart")
    assert np.allclose(recorded.odom_at_scans, poses, atol=1e-5)
    assert recorded.stamps[0] == 0.0 and recorded.duration_s > SECONDS - 1.0
    # Where the lidar sits on the base is part of the recording (laser.yaml's mount_ keys).
    np.testing.assert_allclose(recorded.laser_mount, MOUNT)
    # Frames: one lossless PNG per index row, at increasing offsets.
    with (out / "camera" / "index.csv").open() as handle:
        index = list(csv.DictReader(handle))
    assert [int(r["id"]) for r in index] == list(range(len(index))) and len(index) >= 5 * SECONDS
    offsets = [float(r["offset_s"]) for r in index]
    assert offsets == sorted(offsets)
    assert all(cv2.imread(str(out / "camera" / r["file"])).shape == (480, 640, 3) for r in index)
    # The microphone heard the recording played into the sound server.
    heard = read_wav(out / "mic.wav").astype(np.float64)
    said = read_wav(data / "speech" / "audio" / "ps_goforward.wav").astype(np.float64)
    from scipy.signal import correlate

    lag = int(np.argmax(correlate(heard, said, mode="valid", method="fft")))
    segment = heard[lag : lag + len(said)]
    assert np.dot(segment, said) / np.sqrt(np.dot(segment, segment) * np.dot(said, said)) > 0.99


def replay(scenario_path: Path, data: Path) -> tuple[dict[str, list[Fired]], float]:
    """Play a scenario as the runtime does (the player, then the live sources) and collect
    every reading; returns them per source and the playback's time zero."""
    scenario = load_scenario(scenario_path, data)
    sources = build_sources(scenario, data)
    got: dict[str, list[Fired]] = {name: [] for name in scenario.sources}
    lock = threading.Lock()

    def emit(source: str, fired: Fired) -> None:
        with lock:
            got[source].append(fired)

    player = ScenarioPlayer(sources.replay, scenario.duration_s, emit)
    # As the runtime plays: real-time priority (threads started now inherit it) and a short
    # interpreter switch interval. The machine is shared; without them a tick can be late.
    before = sys.getswitchinterval(), os.sched_getscheduler(0), os.sched_getparam(0)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    with contextlib.suppress(PermissionError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
    try:
        t_play = time.monotonic()
        player.start(t_play)
        for source in sources.live:
            source.start(emit, t_play)
        player.join(scenario.duration_s + 30)
        time.sleep(0.5)
    finally:
        player.stop()
        for source in sources.live:
            source.stop()
        sys.setswitchinterval(before[0])
        os.sched_setscheduler(0, before[1], before[2])
    return got, t_play


def test_a_recorded_session_replays_to_the_same_samples(session: tuple[Path, Path]) -> None:
    _, out = session
    data = require_data()
    got, t_play = replay(out / "scenario.yaml", data)

    recorded = load_laser_dataset(out / "lidar")
    scans = [f.sample for f in got["lidar"]]
    assert [s.id for s in scans] == list(range(len(recorded.stamps)))
    for sample, ranges in zip(scans, recorded.ranges, strict=True):
        assert np.array_equal(sample.array(), ranges)
        assert sample.meta["laser_mount"] == pytest.approx(MOUNT)
    late_lidar = np.array([s.t_sensor - t_play for s in scans]) - recorded.stamps

    with (out / "camera" / "index.csv").open() as handle:
        index = list(csv.DictReader(handle))
    frames = [f.sample for f in got["camera"]]
    assert [s.id for s in frames] == [int(r["id"]) for r in index]
    for sample, row in zip(frames, index, strict=True):
        assert np.array_equal(sample.array(), cv2.imread(str(out / "camera" / row["file"])))
    late_camera = np.array(
        [s.t_sensor - t_play - float(r["offset_s"]) for s, r in zip(frames, index, strict=True)]
    )

    wav = read_wav(out / "mic.wav")
    chunks = [f.sample for f in got["mic"]]
    assert [s.id for s in chunks] == list(range(len(wav) // 1600))
    for k, sample in enumerate(chunks):
        assert np.array_equal(sample.array(), wav[k * 1600 : (k + 1) * 1600])
    late_mic = np.array([s.t_sensor - t_play - 0.1 * (k + 1) for k, s in enumerate(chunks)])

    for name, late in (("lidar", late_lidar), ("camera", late_camera), ("mic", late_mic)):
        print(
            f"{name}: {len(late)} samples, replayed at the recorded offset + "
            f"{np.median(late) * 1e3:.3f} ms (median), {np.quantile(late, 0.9) * 1e3:.3f} ms "
            f"(90th percentile), {late.max() * 1e3:.3f} ms (max)"
        )
        # A replayed sample is stamped when the player fires it. What a replay must not do is
        # play the recording shifted (the camera once played every frame 4.8 ms late): the
        # median holds that, to 1 ms. Single ticks wait behind other work on a shared 2-core
        # machine (the lidar's 90th percentile was 1.015 ms in 1 of 6 runs, its 39 scans
        # put 4 in that tail): printed above, not asserted.
        assert np.all(late > -0.001), f"{name}: a sample came early"
        assert abs(np.median(late)) < 0.001, f"{name}: the recording plays shifted"


def test_ctxrobot_run_plays_the_recording_unchanged(session: tuple[Path, Path]) -> None:
    for image in ("ctxrobot/slam", "ctxrobot/signs", "ctxrobot/speech"):
        require_image(image)
    manifest, out = session
    scenario = out / "scenario.yaml"
    run = Path(tempfile.mkdtemp(prefix="rec-run-", dir="/tmp"))  # task sockets: short paths
    try:
        args = ["run", "--config", str(manifest), "--scenario", str(scenario), "--out", str(run)]
        proc = subprocess.run(
            [*CTXROBOT, *args, "--json"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        shutil.rmtree(run, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for task in ("slam", "signs", "speech"):
        print(task, summary["tasks"][task]["samples"], "samples")
        assert summary["tasks"][task]["samples"] > 0


def test_a_lidar_without_odometry_is_recorded_and_replayed_without_it(tmp_path: Path) -> None:
    """No odometry feed: the recording's odometry file has no rows (zeros would replay as a
    robot parked at the origin), and its scans replay with ``odom: None`` and no
    ``Odometry`` event, as the live lidar sent them."""
    data = require_data()
    emulator = LidarEmulator(
        data / "slam" / "intel", tmp_path / "rplidar", odometry_port=free_port(), start_s=START_S
    ).start()
    manifest = write_live_manifest(
        tmp_path,
        data,
        {"lidar": {"kind": "rplidar", "port": str(tmp_path / "rplidar")}},
        task_entry("slam", "ctxrobot/slam", "lidar"),
    )
    out = tmp_path / "session"
    try:
        proc = subprocess.run(
            [*CTXROBOT, "record", "--config", str(manifest), "--out", str(out), "--duration", "4"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        emulator.stop()
    assert proc.returncode == 0, proc.stderr
    recorded = load_laser_dataset(out / "lidar")
    assert len(recorded.stamps) >= 10
    assert len(recorded.odometry) == 0 and np.isnan(recorded.odom_at_scans).all()
    got, _ = replay(out / "scenario.yaml", data)
    assert len(got["lidar"]) == len(recorded.stamps)
    for fired in got["lidar"]:
        assert fired.sample.meta["odom"] is None
        assert [topic for topic, _ in fired.events] == ["sensor.scan"]
