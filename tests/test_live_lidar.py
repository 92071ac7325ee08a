"""The live ``rplidar`` source against an emulator that speaks the RPLidar protocol byte for
byte on a pseudo-terminal and plays the Intel Research Lab log, with its odometry over UDP.

No mock of the serial layer: pyserial opens a real tty, the driver sends real requests and
decodes real descriptors and measurement nodes.
"""

from __future__ import annotations

import math
import os
import pty
import sys
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ctxrobot.manifest.live import Rplidar
from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import SourceStateChanged
from ctxrobot.streams.live.rplidar import NO_RETURN_M, RplidarSource
from ctxrobot.streams.source import Fired
from ctxtask.datasets.laser import (
    LaserDataset,
    load_laser_dataset,
    scan_sample,
)
from ctxtask.se2 import between
from tests.conftest import require_data
from tests.test_live_support import (
    SWITCH_INTERVAL_S,
    LidarEmulator,
    free_port,
    live_threads,
    open_fds,
    wait_until,
)

SPEED = 4.0  # the log plays 4× faster than it was recorded: 20 scans a second


@pytest.fixture(autouse=True)
def runtime_switch_interval() -> Iterator[None]:
    """The interpreter's thread switch interval the runtime runs sources with."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    yield
    sys.setswitchinterval(before)


@pytest.fixture(scope="module")
def intel() -> tuple[Path, LaserDataset]:
    folder = require_data("slam/intel")
    return folder, load_laser_dataset(folder)


def lidar_source(link: Path, odometry_port: int, mount: list[float] | None = None) -> RplidarSource:
    spec: dict[str, object] = {
        "kind": "rplidar",
        "port": str(link),
        "odometry": {"udp": f"127.0.0.1:{odometry_port}"},
    }
    if mount is not None:
        spec["mount"] = mount
    return RplidarSource("lidar", Rplidar.model_validate(spec))


def collect(source: RplidarSource, bus: EventBus) -> tuple[list[Fired], list[SourceStateChanged]]:
    fired: list[Fired] = []
    states: list[SourceStateChanged] = []
    bus.subscribe("source.state", states.append, name="test-states", inline=True)
    source.attach(bus)
    source.start(lambda _name, f: fired.append(f))
    return fired, states


def play_live(
    log: Path, source: RplidarSource, odometry_port: int, scans: int, speed: float, start_s: float
) -> list[Fired]:
    """The first ``scans`` live scans ``source`` reads from the emulator playing ``log`` from
    ``start_s`` on the source's port (the emulator sends its odometry to ``odometry_port``)."""
    link = Path(source.spec.port)
    emulator = LidarEmulator(
        log, link, odometry_port=odometry_port, speed=speed, start_s=start_s
    ).start()
    try:
        fired, _ = collect(source, EventBus())
        # The log runs at ~5 scans a second; three times that, and time to open the port.
        timeout_s = 30.0 + 3.0 * scans / (5.0 * speed)
        wait_until(lambda: len(fired) >= scans, timeout_s, f"{scans} live scans")
    finally:
        source.stop()
        emulator.stop()
    return fired


def what_the_lidar_sees(dataset: LaserDataset, k: int) -> np.ndarray:
    """Scan ``k`` of the log in the live source's 360 one-degree bins: the log's 180 beams
    (-90°…89°) in bins 90…269, beyond a standard-scan node's range or without a return:
    no return."""
    ranges = np.full(360, NO_RETURN_M, dtype=np.float32)
    beams = dataset.ranges[k].copy()
    beams[beams >= min(NO_RETURN_M, dataset.geometry.max_valid_range)] = NO_RETURN_M
    ranges[90:270] = beams
    return ranges


def test_live_scans_are_the_logged_scans(intel: tuple[Path, LaserDataset], tmp_path: Path) -> None:
    folder, dataset = intel
    port = free_port()
    emulator = LidarEmulator(folder, tmp_path / "rplidar", odometry_port=port, speed=SPEED).start()
    # Mounted 12 cm ahead of the base's centre, 3 cm right, turned round (cable forward).
    source = lidar_source(tmp_path / "rplidar", port, mount=[0.12, -0.03, 180.0])
    bus = EventBus()
    try:
        fired, states = collect(source, bus)
        wait_until(lambda: len(fired) >= 60, 60, "60 live scans")
    finally:
        source.stop()
        emulator.stop()
    assert states[0].state == "open" and "model 24" in states[0].detail
    for k, reading in enumerate(fired[:60]):
        sample = reading.sample
        assert sample.id == k and sample.kind == "scan"
        assert np.array_equal(sample.array(), what_the_lidar_sees(dataset, k)), f"scan {k}"
        # The mount reaches the SLAM task as the laser replay's samples carry it.
        assert sample.meta["laser_mount"] == pytest.approx([0.12, -0.03, math.pi])
        topics = [topic for topic, _ in reading.events]
        assert topics == ["sensor.odometry", "sensor.scan"]
    assert source.stats.state == "closed"


def test_unplugged_lidar_is_an_event_then_reconnects(
    intel: tuple[Path, LaserDataset], tmp_path: Path
) -> None:
    folder, _ = intel
    port = free_port()
    link = tmp_path / "rplidar"
    threads_before, fds_before = live_threads(), open_fds()
    emulator = LidarEmulator(folder, link, odometry_port=port, speed=SPEED).start()
    source = lidar_source(link, port)
    bus = EventBus()
    try:
        fired, states = collect(source, bus)
        wait_until(lambda: len(fired) >= 10, 60, "scans before the unplug")
        emulator.unplug()
        wait_until(lambda: any(s.state == "failed" for s in states), 10, "a failed state")
        before = len(fired)
        emulator.start()  # plugged in again: the same name, a new tty behind it
        wait_until(lambda: len(fired) >= before + 10, 60, "scans after the reconnect")
    finally:
        source.stop()
        emulator.stop()
        bus.close()
    sequence = [s.state for s in states]
    assert sequence[0] == "open" and sequence[-1] == "closed"
    reopened = sequence.index("open", sequence.index("failed"))
    assert "reopening" in sequence[sequence.index("failed") : reopened]
    failure = next(s.detail for s in states if s.state == "failed")
    assert "unplugged" in failure or "missing" in failure, failure
    ids = [f.sample.id for f in fired]
    assert ids == list(range(len(ids))), "ids keep counting across the reconnect"
    # Nothing leaks: the source's threads are gone and its tty is closed.
    time.sleep(0.2)
    assert live_threads() - threads_before <= {"bus:test-states"}
    assert open_fds() - fds_before == set()


def test_missing_port_is_one_clear_state(tmp_path: Path) -> None:
    source = lidar_source(tmp_path / "nothing-here", free_port())
    bus = EventBus()
    fired, states = collect(source, bus)
    try:
        wait_until(lambda: len(states) >= 2, 10, "a failed state")
    finally:
        source.stop()
    assert states[0].state == "failed"
    assert states[0].detail.startswith(f"{tmp_path / 'nothing-here'} is missing")
    assert states[1].state == "reopening" and not fired


def test_slam_on_the_live_stream_matches_slam_on_the_replay(
    intel: tuple[Path, LaserDataset], tmp_path: Path
) -> None:
    """The SLAM task's own code on the live samples and on the replay's samples of the same
    log: the trajectories agree within 0.01 m."""
    pytest.importorskip("scipy")
    from slam.mapper import Slam, SlamConfig

    folder, dataset = intel
    scans, start_s = 200, 26.0  # 40 s from where the robot starts driving (the default scenario)
    first = int(np.searchsorted(dataset.stamps, dataset.stamps[0] + start_s))
    port = free_port()
    source = lidar_source(tmp_path / "rplidar", port)
    fired = play_live(folder, source, port, scans, speed=2.0, start_s=start_s)

    def trajectory(samples: list) -> np.ndarray:
        slam = Slam(SlamConfig())
        poses = []
        for s in samples:
            m = s.meta
            estimate = slam.process(
                s.array(),
                np.asarray(m["odom"]),
                m["angle_min"],
                m["angle_increment"],
                m["max_range"],
            )
            poses.append(estimate.pose)
        return np.array(poses)

    live = trajectory([f.sample for f in fired[:scans]])
    replay = trajectory([scan_sample(dataset, first + k) for k in range(scans)])
    error = np.hypot(*(live[:, :2] - replay[:, :2]).T)
    heading = np.abs(np.angle(np.exp(1j * (live[:, 2] - replay[:, 2]))))
    travelled = np.hypot(*np.diff(replay[:, :2], axis=0).T).sum()
    print(
        f"live vs replay over {scans} scans ({travelled:.1f} m travelled): position error "
        f"max {error.max() * 1000:.2f} mm, median {np.median(error) * 1000:.2f} mm; heading "
        f"max {math.degrees(heading.max()):.3f}°"
    )
    assert error.max() <= 0.01


def test_a_device_answering_garbage_is_a_fault(tmp_path: Path) -> None:
    """Something that is not an RPLidar (or one at the wrong baud rate) on the port: random
    bytes instead of descriptors. One failed state that says so; no samples."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    link = tmp_path / "ttyUSB0"
    link.symlink_to(os.ttyname(slave))
    noise = np.random.default_rng(12).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes()
    halt = threading.Event()

    def babble() -> None:
        for k in range(0, len(noise), 64):
            if halt.wait(0.002):
                return
            os.write(master, noise[k : k + 64])

    talker = threading.Thread(target=babble, daemon=True)
    talker.start()
    source = lidar_source(link, free_port())
    try:
        fired, states = collect(source, EventBus())
        wait_until(lambda: any(s.state == "failed" for s in states), 10, "a failed state")
    finally:
        source.stop()
        halt.set()
        talker.join()
        os.close(master)
        os.close(slave)
    failure = next(s.detail for s in states if s.state == "failed")
    print(failure)
    assert "not an RPLidar" in failure or "garbage" in failure
    assert not fired


def test_a_lidar_without_odometry_says_so_and_slam_follows_it(
    intel: tuple[Path, LaserDataset], tmp_path: Path
) -> None:
    """No odometry feed: each scan carries ``odom: None`` and no ``Odometry`` event (zeros
    said the robot stood at the origin, and SLAM shed every scan as standing still). SLAM on
    the live scans then follows the robot: where it ends up relative to where it started is
    where SLAM with the odometry puts it on the same scans replayed, within 0.1 m and 2° (the
    raw odometry itself is 20° off after these 200 scans)."""
    pytest.importorskip("scipy")
    from slam.task import SlamTask

    folder, dataset = intel
    scans, start_s = 200, 26.0
    first = int(np.searchsorted(dataset.stamps, dataset.stamps[0] + start_s))
    spec = Rplidar.model_validate({"kind": "rplidar", "port": str(tmp_path / "rplidar")})
    source = RplidarSource("lidar", spec)
    fired = play_live(folder, source, free_port(), scans, speed=SPEED, start_s=start_s)
    for reading in fired[:scans]:
        assert reading.sample.meta["odom"] is None
        assert [topic for topic, _ in reading.events] == ["sensor.scan"]
    task = SlamTask()
    task.setup({})
    task.initialise()
    results = [task.update(reading.sample) for reading in fired[:scans]]
    task.terminate()
    assert not any("shed" in result for result in results)
    poses = np.array([result["pose"] for result in results])
    with_odometry = SlamTask()
    with_odometry.setup({})
    with_odometry.initialise()
    replayed = [scan_sample(dataset, first + k) for k in range(scans)]
    reference = np.array([with_odometry.update(sample)["pose"] for sample in replayed])
    slam_moved = between(poses[[0]], poses[[-1]])[0]
    reference_moved = between(reference[[0]], reference[[-1]])[0]
    print(f"\nwithout odometry SLAM moved {slam_moved}, with it {reference_moved}")
    assert np.hypot(*reference_moved[:2]) > 2.0
    assert np.hypot(*(slam_moved[:2] - reference_moved[:2])) <= 0.1
    assert abs(math.remainder(slam_moved[2] - reference_moved[2], math.tau)) <= math.radians(2)
