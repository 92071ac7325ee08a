"""An RPLidar on a pseudo-terminal that plays a recorded laser log, byte for byte.

For trying a robot manifest with an ``rplidar`` source on a desk, and for the tests: the
emulator opens a pseudo-terminal pair, points ``--link`` at its serial end (a symlink, as a
udev rule names a real lidar), answers the protocol's requests (STOP, RESET, SCAN,
FORCE_SCAN, GET_INFO, GET_HEALTH, SET_MOTOR_PWM) with the real descriptors, and streams one
revolution of standard-scan measurement nodes per scan of the log, at the log's pace.
With ``--odometry-udp`` it also sends the robot's odometry in the ``x y theta`` line protocol,
as a base controller would: with each scan, the pose the laser replay pairs with that scan
(the log's odometry at the scan's time). Sending the raw odometry rows instead would make
live and replay differ by the transport's jitter: this log's rows come milliseconds apart
and jump by centimetres.

The world does not wait for the host: playback starts at the first SCAN request and runs on
from there in real time, whether or not anyone reads. Bytes nobody reads are dropped, as a
UART without flow control drops them.

    python -m ctxrobot.streams.live.emulator --log ../shared/data/slam/intel \\
        --link /tmp/rplidar --odometry-udp 127.0.0.1:5600
"""

from __future__ import annotations

import argparse
import fcntl
import math
import os
import pty
import select
import signal
import socket
import struct
import sys
import time
import tty
from pathlib import Path

import numpy as np

from ctxrobot.streams.live.rplidar import (
    HEALTH_TYPE,
    INFO_TYPE,
    NO_RETURN_M,
    NODE_BYTES,
    SCAN_TYPE,
    SYNC,
    Command,
    descriptor,
)
from ctxtask.datasets.laser import LaserDataset, load_laser_dataset

QUALITY = 47  # what an A1 reports for a good return
# No RPLidar spins faster than 20 Hz. Some logs have scans a millisecond apart (the Intel
# log, a recording artefact); such a scan goes out one revolution time after the previous.
MIN_REVOLUTION_S = 0.05
MODEL_A1M8 = 0x18


def revolution_bytes(ranges: np.ndarray, bearings_rad: np.ndarray, no_return_m: float) -> bytes:
    """One revolution of nodes: every whole clockwise degree from 0, the log's beams at their
    own angles, a no-return node wherever the log has no beam (as a real lidar sends one)."""
    angle_cw = np.rint(np.degrees(-bearings_rad) * 64.0).astype(np.int64) % (360 * 64)
    hits = (ranges > 0) & (ranges < min(no_return_m, NO_RETURN_M))
    distance = np.where(hits, np.rint(ranges * 4000.0), 0).astype(np.int64)
    empty = np.setdiff1d(np.arange(360) * 64, angle_cw)
    angles = np.concatenate([angle_cw, empty])
    distance = np.concatenate([distance, np.zeros(len(empty), dtype=np.int64)])
    order = np.argsort(angles, kind="stable")
    angles, distance = angles[order], distance[order]
    nodes = np.empty((len(angles), NODE_BYTES), dtype=np.uint8)
    quality = np.where(distance > 0, QUALITY, 0)
    start = np.zeros(len(angles), dtype=np.int64)
    start[0] = 1
    nodes[:, 0] = (quality << 2) | ((1 - start) << 1) | start
    nodes[:, 1] = ((angles & 0x7F) << 1) | 1
    nodes[:, 2] = angles >> 7
    nodes[:, 3] = distance & 0xFF
    nodes[:, 4] = distance >> 8
    return nodes.tobytes()


class Emulator:
    """The lidar end of the link: requests in, descriptors and nodes out."""

    def __init__(
        self, dataset: LaserDataset, link: Path, *, speed: float, start_s: float, odometry: str
    ) -> None:
        self.dataset = dataset
        self.speed = speed
        t_first = float(dataset.stamps[0]) + start_s
        self.first = int(np.searchsorted(dataset.stamps, t_first))
        self.t_first = float(dataset.stamps[self.first])
        self.master, self.slave = pty.openpty()
        tty.setraw(self.slave)
        fcntl.fcntl(self.master, fcntl.F_SETFL, os.O_NONBLOCK)
        # Replace the link atomically, as udev does when a device reappears.
        temporary = link.with_name(f".{link.name}.{os.getpid()}")
        temporary.symlink_to(os.ttyname(self.slave))
        temporary.replace(link)
        self.odometry: tuple[socket.socket, tuple[str, int]] | None = None
        if odometry:
            host, _, port = odometry.rpartition(":")
            self.odometry = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM), (host, int(port)))
        self.scanning = False
        self.t0: float | None = None  # monotonic time of the first scan of the playback
        self.next_scan = self.first
        self.last_due = -math.inf
        self.dropped_bytes = 0
        self._requests = bytearray()

    def run(self, duration_s: float | None) -> None:
        while True:
            now = time.monotonic()
            if self.t0 is not None and duration_s is not None and now - self.t0 > duration_s:
                return
            if self.next_scan >= len(self.dataset.stamps):
                return
            timeout = 0.05 if self.t0 is None else max(0.0, self._due(self.next_scan) - now)
            readable, _, _ = select.select([self.master], [], [], min(timeout, 0.05))
            if readable:
                self._serve()
            self._play(time.monotonic())

    def _due(self, scan: int) -> float:
        assert self.t0 is not None
        logged = self.t0 + (float(self.dataset.stamps[scan]) - self.t_first) / self.speed
        return max(logged, self.last_due + MIN_REVOLUTION_S)

    def _play(self, now: float) -> None:
        if self.t0 is None:
            return
        while self.next_scan < len(self.dataset.stamps) and self._due(self.next_scan) <= now:
            self.last_due = self._due(self.next_scan)
            x, y, theta = self.dataset.odom_at_scans[self.next_scan]
            if self.odometry is not None and np.isfinite(x):  # NaN: the log has no odometry
                sock, address = self.odometry
                sock.sendto(f"{x:.6f} {y:.6f} {theta:.6f}\n".encode(), address)
            if self.scanning:
                self._write(self._revolution(self.next_scan))
            self.next_scan += 1

    def _revolution(self, scan: int) -> bytes:
        ds = self.dataset
        bearings = ds.angle_min[scan] + ds.geometry.angle_increment * np.arange(ds.ranges.shape[1])
        return revolution_bytes(ds.ranges[scan], bearings, ds.geometry.max_valid_range)

    def _write(self, data: bytes) -> None:
        try:
            written = os.write(self.master, data)
        except BlockingIOError:
            written = 0
        except OSError:  # EIO: nobody has the serial end open
            written = 0
        self.dropped_bytes += len(data) - written

    def _serve(self) -> None:
        try:
            self._requests += os.read(self.master, 256)
        except OSError:  # EIO while the host has the port closed
            time.sleep(0.01)
            return
        while len(self._requests) >= 2:
            if self._requests[0] != SYNC:
                del self._requests[0]
                continue
            cmd = self._requests[1]
            if cmd >= 0x80:  # a request with a payload: size, payload, checksum
                if len(self._requests) < 3 or len(self._requests) < 4 + self._requests[2]:
                    return
                del self._requests[: 4 + self._requests[2]]
            else:
                del self._requests[:2]
            self._answer(cmd)

    def _answer(self, cmd: int) -> None:
        if cmd in (Command.STOP, Command.RESET):
            self.scanning = False
        elif cmd in (Command.SCAN, Command.FORCE_SCAN):
            self._write(descriptor(NODE_BYTES, True, SCAN_TYPE))
            self.scanning = True
            if self.t0 is None:
                self.t0 = time.monotonic()
        elif cmd == Command.GET_INFO:
            serial_number = bytes(range(16))
            body = struct.pack("<BBBB", MODEL_A1M8, 29, 1, 7) + serial_number
            self._write(descriptor(20, False, INFO_TYPE) + body)
        elif cmd == Command.GET_HEALTH:
            self._write(descriptor(3, False, HEALTH_TYPE) + bytes((0, 0, 0)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ctxrobot.streams.live.emulator",
        description="An RPLidar on a pseudo-terminal that plays a laser log folder.",
    )
    parser.add_argument("--log", required=True, type=Path, help="laser log folder, e.g. slam/intel")
    parser.add_argument("--link", required=True, type=Path, help="symlink to create, the 'port'")
    parser.add_argument("--odometry-udp", default="", metavar="HOST:PORT", help="send odometry")
    parser.add_argument("--speed", type=float, default=1.0, help="playback speed (default 1)")
    parser.add_argument("--start-s", type=float, default=0.0, help="skip this much of the log")
    parser.add_argument("--duration", type=float, help="stop after S seconds of playback")
    args = parser.parse_args(argv)
    emulator = Emulator(
        load_laser_dataset(args.log),
        args.link,
        speed=args.speed,
        start_s=args.start_s,
        odometry=args.odometry_udp,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"rplidar emulator on {args.link} -> {os.ttyname(emulator.slave)}", flush=True)
    try:
        emulator.run(args.duration)
    finally:
        # Unplugged: the name goes away, unless a newer emulator has taken it over already.
        if os.path.realpath(args.link) == os.ttyname(emulator.slave):
            args.link.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
