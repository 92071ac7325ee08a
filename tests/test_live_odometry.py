"""Motion on a live robot: the SLAM task's poses as odometry (``pose_odometry``), and a
robot's own odometry feed in the line protocol, over a real serial line (a pseudo-terminal)."""

from __future__ import annotations

import math
import os
import pty
import socket
import time
import tty

import pytest

from ctxrobot.manifest.live import OdometryFeed, PoseOdometry
from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import Odometry, SourceStateChanged, TaskResult
from ctxrobot.streams.live import build_live_source
from ctxrobot.streams.live.odometry import OdometryFeedReader
from tests.test_live_support import free_port, wait_until


def test_pose_odometry_turns_task_poses_into_motion() -> None:
    bus = EventBus()
    heard: list[Odometry] = []
    states: list[SourceStateChanged] = []
    bus.subscribe("sensor.odometry", heard.append, name="test-odometry", inline=True)
    bus.subscribe("source.state", states.append, name="test-states", inline=True)
    source = build_live_source("slam_pose", PoseOdometry(kind="pose_odometry", task="slam"))
    source.attach(bus)  # type: ignore[attr-defined]
    source.start(lambda _name, _fired: None)
    try:
        # The robot drives straight at 0.5 m/s, poses at 5 Hz, then turns in place.
        for k in range(20):
            pose = [0.1 * k, 0.0, 0.0] if k < 10 else [0.9, 0.0, 0.2 * (k - 9)]
            result = TaskResult("slam", k, 100.0 + 0.2 * k, 0.0, 0.0, {"pose": pose})
            bus.publish("task.result", result)
            bus.publish("task.result", TaskResult("signs", k, 100.0 + 0.2 * k, 0, 0, {}))
        wait_until(lambda: len(heard) == 20, 5, "20 odometry events")
    finally:
        source.stop()
        bus.close()
    assert [e.source for e in heard] == ["slam_pose"] * 20
    assert [e.t for e in heard] == [100.0 + 0.2 * k for k in range(20)]
    assert heard[8].v == pytest.approx(0.5) and heard[8].w == pytest.approx(0.0)
    assert heard[15].v == pytest.approx(0.0) and heard[15].w == pytest.approx(1.0)
    assert [s.state for s in states] == ["open", "closed"]


def test_odometry_feed_over_a_serial_line() -> None:
    master, slave = pty.openpty()
    tty.setraw(slave)
    reader = OdometryFeedReader("lidar", OdometryFeed(serial=os.ttyname(slave), baud=115200))
    reader.start()
    try:
        time.sleep(0.3)  # the port is open
        os.write(master, b"# wheel odometry\n0.0 0.0 0.0\n")
        time.sleep(0.1)
        sent = time.monotonic()
        os.write(master, b"0.5 0.25 3.1 0.4 -0.2\n")
        os.write(master, b"not odometry\n")
        wait_until(lambda: reader.readings == 2 and reader.garbage == 1, 5, "two readings")
    finally:
        reader.stop()
        os.close(master)
        os.close(slave)
    pose, v, w = reader.pose_at(time.monotonic())  # type: ignore[misc]
    assert pose == [0.5, 0.25, pytest.approx(3.1)] and (v, w) == (0.4, -0.2)
    assert reader.pose_at(sent - 0.05)[0] == [0.0, 0.0, 0.0]  # type: ignore[index]
    assert reader.pose_at(sent + 2.0) is None, "a feed silent for a second says nothing"
    assert math.isclose(reader.latest()[3], 3.1)  # type: ignore[index]


def test_a_udp_odometry_feed_is_bound_when_start_returns() -> None:
    """The lidar starts right after its odometry reader, and its first scans need a pose: a
    pose sent the moment ``start`` returns must wait in the socket, not be lost because the
    reader's thread has not run yet."""
    port = free_port()
    reader = OdometryFeedReader("lidar", OdometryFeed(udp=f"127.0.0.1:{port}"))
    reader.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            with pytest.raises(OSError):  # in use: the reader holds the port already
                probe.bind(("127.0.0.1", port))
            probe.sendto(b"1.0 2.0 0.5\n", ("127.0.0.1", port))
        wait_until(lambda: reader.latest() is not None, 5, "the pose sent at once")
    finally:
        reader.stop()
    latest = reader.latest()
    assert latest is not None and latest[1:4] == (1.0, 2.0, 0.5)
