"""Robot motion on a live robot: the robot's own odometry feed, or the SLAM task's poses.

- :class:`OdometryFeedReader` listens to a feed in the line protocol of
  :class:`ctxrobot.manifest.live.OdometryFeed` (UDP or serial) and keeps the recent poses,
  so a lidar scan can carry the pose at its capture time (the SLAM prior) and the motion
  context hears the speed.
- :class:`PoseOdometrySource` (``{kind: pose_odometry, task: slam}``) turns the poses a task
  returns into ``Odometry`` events: motion context with no extra sensor.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import socket
import struct
import threading
import time
from typing import Any

import serial
from reactivex.abc import DisposableBase

from ctxrobot.manifest.live import OdometryFeed
from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import Odometry, SourceStateChanged, TaskResult
from ctxrobot.streams.source import Emit

log = logging.getLogger(__name__)

__all__ = ["OdometryFeedReader", "PoseOdometrySource", "Velocity"]

VELOCITY_WINDOW_S = 0.5  # as the replay derives speed from logged poses
HISTORY = 64  # readings kept: the newest one before a scan's capture is looked up
# Linux's SO_TIMESTAMPNS (asm-generic/socket.h), which Python's socket module does not name.
SO_TIMESTAMPNS = 35
STALE_S = 1.0  # a feed silent this long no longer says how the robot moves
POLL_S = 0.2


class Velocity:
    """Forward speed and turn rate from a pose stream: the pose change over the last
    ``window_s`` divided by ``window_s``, as the replay derives them from logged poses."""

    def __init__(self, window_s: float = VELOCITY_WINDOW_S) -> None:
        self.window_s = window_s
        # (t, x, y, unwrapped theta), one pose at or before the window's start kept.
        self._poses: collections.deque[tuple[float, float, float, float]] = collections.deque()
        self.theta_unwrapped = 0.0

    def update(self, t: float, x: float, y: float, theta: float) -> tuple[float, float]:
        if self._poses:
            last = self._poses[-1][3]
            theta = last + math.remainder(theta - last, math.tau)
        self.theta_unwrapped = theta
        self._poses.append((t, x, y, theta))
        before = t - self.window_s
        while len(self._poses) > 2 and self._poses[1][0] <= before:
            self._poses.popleft()
        (ta, *a), (tb, *b) = self._poses[0], self._poses[min(1, len(self._poses) - 1)]
        k = 0.0 if tb <= ta or before <= ta else min(1.0, (before - ta) / (tb - ta))
        x0, y0, th0 = (va + k * (vb - va) for va, vb in zip(a, b, strict=True))
        return math.hypot(x - x0, y - y0) / self.window_s, (theta - th0) / self.window_s


class OdometryFeedReader:
    """Reads an odometry feed on its own thread; :meth:`pose_at` interpolates its poses."""

    def __init__(self, owner: str, spec: OdometryFeed) -> None:
        self.owner = owner
        self.spec = spec
        self.readings = 0
        self.garbage = 0
        self._lock = threading.Lock()
        # (t, x, y, theta unwrapped, v, w)
        self._history: collections.deque[tuple[float, ...]] = collections.deque(maxlen=HISTORY)
        self._velocity = Velocity()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._udp: socket.socket | None = None  # bound by start, read by the thread

    @property
    def where(self) -> str:
        return f"udp {self.spec.udp}" if self.spec.udp else f"serial {self.spec.serial}"

    def start(self) -> None:
        if self.spec.udp is not None:
            # Bound before the caller starts the lidar: a pose sent from now on waits in the
            # socket's buffer instead of being lost while the thread is not yet scheduled
            # (the first scans of a loaded machine had no odometry).
            with contextlib.suppress(OSError):  # the thread retries, and says why
                self._udp = self._bind_udp()
        self._thread = threading.Thread(
            target=self._run, name=f"odometry:{self.owner}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self._udp is not None:  # stopped before the thread took it
            self._udp.close()
            self._udp = None

    def latest(self) -> tuple[float, ...] | None:
        """The newest reading ``(t, x, y, theta, v, w)``, or None before the first."""
        with self._lock:
            return self._history[-1] if self._history else None

    def pose_at(self, t: float) -> tuple[list[float], float, float] | None:
        """``([x, y, theta], v, w)`` of the newest reading that had arrived at monotonic time
        ``t``, or None when there is none from the last second.

        The newest reading, not one interpolated between readings: a scan's capture stamp
        and a datagram's arrival stamp each jitter by milliseconds, and this ordering holds
        where an interpolation would move by the robot's speed times that jitter.
        """
        with self._lock:
            newest = next((r for r in reversed(self._history) if r[0] <= t), None)
        if newest is None or t - newest[0] > STALE_S:
            return None
        _, x, y, theta, v, w = newest
        return [x, y, math.remainder(theta, math.tau)], v, w

    # -- reading -------------------------------------------------------------------------------
    def _run(self) -> None:
        warned = False
        while not self._halt.is_set():
            try:
                if self.spec.udp is not None:
                    self._read_udp()
                else:
                    self._read_serial()
            except (OSError, ValueError, serial.SerialException) as exc:
                if not warned:
                    log.warning(
                        "source %s: odometry feed on %s failed: %s; retrying every second",
                        self.owner,
                        self.where,
                        exc,
                    )
                    warned = True
                self._halt.wait(1.0)

    def _bind_udp(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # The kernel stamps each datagram on arrival: a reading's time then does not
            # depend on when this thread gets the interpreter.
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.bind(self.spec.udp_address)
            sock.settimeout(POLL_S)
        except OSError:
            sock.close()
            raise
        return sock

    def _read_udp(self) -> None:
        # The socket start bound, once; a retry after a failure binds anew.
        sock = self._udp if self._udp is not None else self._bind_udp()
        self._udp = None
        with sock:
            while not self._halt.is_set():
                try:
                    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(16))
                except TimeoutError:
                    continue
                t = _arrival(ancillary)
                for line in data.decode("ascii", "replace").splitlines():
                    self._parse(line, t)

    def _read_serial(self) -> None:
        assert self.spec.serial is not None
        with serial.Serial(self.spec.serial, self.spec.baud, timeout=POLL_S) as port:
            while not self._halt.is_set():
                line = port.readline()
                if line:
                    self._parse(line.decode("ascii", "replace"), time.monotonic())

    def _parse(self, line: str, t: float) -> None:
        text = line.split("#", 1)[0].strip()
        if not text:
            return
        try:
            values = [float(v) for v in text.split()]
        except ValueError:
            values = []
        if len(values) not in (3, 5) or not all(math.isfinite(v) for v in values):
            self.garbage += 1
            if self.garbage == 1:
                log.warning(
                    "source %s: odometry feed on %s sent %r; expected `x y theta [v w]` "
                    "(m, m, rad, m/s, rad/s)",
                    self.owner,
                    self.where,
                    text[:80],
                )
            return
        x, y, theta = values[:3]
        v, w = self._velocity.update(t, x, y, theta)
        if len(values) == 5:
            v, w = values[3], values[4]
        with self._lock:
            self._history.append((t, x, y, self._velocity.theta_unwrapped, v, w))
            self.readings += 1


def _arrival(ancillary: list[tuple[int, int, bytes]]) -> float:
    """A datagram's kernel arrival stamp (wall clock) on the monotonic clock; now, without."""
    now = time.monotonic()
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            return now - (time.time() - (seconds + nanoseconds * 1e-9))
    return now


class PoseOdometrySource:
    """``Odometry`` events from a task's result poses (``{"pose": [x, y, theta]}``).

    It has no samples of its own: :meth:`attach` subscribes to ``task.result`` on the bus
    (the runtime calls it before :meth:`start`), and each pose of ``task`` becomes an
    ``Odometry`` on ``sensor.odometry`` stamped with the pose's sensor time.
    """

    def __init__(self, name: str, task: str) -> None:
        self.name = name
        self.task = task
        self.poses = 0
        self._bus: EventBus | None = None
        self._subscription: DisposableBase | None = None
        self._velocity = Velocity()
        self._last_t = -math.inf

    def attach(self, bus: EventBus) -> None:
        self._bus = bus

    def start(self, emit: Emit, t0: float | None = None) -> None:
        if self._bus is None:
            log.warning(
                "source %s: not attached to the bus, so it cannot hear task %r's poses",
                self.name,
                self.task,
            )
            return
        self._subscription = self._bus.subscribe(
            "task.result", self._on_result, name=f"source:{self.name}", inline=False
        )
        self._bus.publish(
            "source.state",
            SourceStateChanged(time.monotonic(), self.name, "open", f"poses of task {self.task}"),
        )

    def stop(self) -> None:
        if self._subscription is not None:
            self._subscription.dispose()
            self._subscription = None
            assert self._bus is not None
            self._bus.publish(
                "source.state", SourceStateChanged(time.monotonic(), self.name, "closed", "")
            )

    def _on_result(self, result: TaskResult) -> None:
        pose: Any = result.result.get("pose") if result.task == self.task else None
        # Results can arrive out of sensor order (a restarted task); motion needs time order.
        if not isinstance(pose, list | tuple) or len(pose) != 3 or result.t_sensor <= self._last_t:
            return
        self._last_t = result.t_sensor
        x, y, theta = (float(v) for v in pose)
        v, w = self._velocity.update(result.t_sensor, x, y, theta)
        assert self._bus is not None
        self._bus.publish(
            "sensor.odometry", Odometry(self.name, result.t_sensor, x, y, theta, v, w)
        )
        self.poses += 1
