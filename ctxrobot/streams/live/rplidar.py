"""Slamtec RPLidar A1/A2/A3 over a serial port, written from Slamtec's published interface
protocol (standard scan mode), and the live ``rplidar`` source built on it.

Why not a package: the maintained Python ones (``adafruit-circuitpython-rplidar``, the
``rplidar`` family) read one 5-byte node per Python call, give up on the first corrupted
byte instead of resynchronising, leave stale bytes in the input after a stop, and have no
way to stop a read from another thread. This driver reads whatever bytes are waiting, decodes
all their nodes at once with numpy, resynchronises on garbage and counts it, and every read
times out so the source stops promptly.

Wire format (all little-endian). A request is ``A5 cmd`` or ``A5 cmd size payload checksum``
(XOR of every byte before it). A response starts with a 7-byte descriptor ``A5 5A`` + a 32-bit
word (low 30 bits: response length, high 2 bits: 1 for a stream of responses) + a data type.
A standard-scan measurement node is 5 bytes::

    byte 0: quality << 2 | !S << 1 | S      S: first node of a new revolution
    byte 1: angle_q6[6:0] << 1 | 1          angle in 1/64 degree, clockwise seen from above
    byte 2: angle_q6[14:7]
    byte 3-4: distance_q2                   distance in 1/4 mm; 0: no return
"""

from __future__ import annotations

import errno
import logging
import math
import struct
import time
from dataclasses import dataclass

import numpy as np
import serial

from ctxrobot.manifest.live import Rplidar
from ctxrobot.model.events import LaserScan, Odometry
from ctxrobot.streams.live.device import DeviceError, DeviceSource
from ctxrobot.streams.live.odometry import OdometryFeedReader
from ctxrobot.streams.source import Emit
from ctxtask.protocol import Sample

log = logging.getLogger(__name__)

__all__ = [
    "NODE_BYTES",
    "NO_RETURN_M",
    "Command",
    "RplidarLink",
    "RplidarSource",
    "ScanAssembler",
    "decode_nodes",
    "descriptor",
    "request",
]

SYNC, SYNC2 = 0xA5, 0x5A
NODE_BYTES = 5
DESCRIPTOR_BYTES = 7
SCAN_TYPE, INFO_TYPE, HEALTH_TYPE = 0x81, 0x04, 0x06
# The largest distance a standard-scan node can carry (65535 quarter-millimetres); bins with
# no return are filled with it, and the scan's max_range says "this or more: no return".
NO_RETURN_M = 16.384
READ_TIMEOUT_S = 0.2
SILENT_S = 2.0  # no node for this long while scanning: the lidar is gone or stopped
GARBAGE_LIMIT = 2000  # bytes skipped in a row before the stream counts as garbage
MIN_NODES_PER_REVOLUTION = 8  # fewer: a partial revolution (spin-up), not a scan
HEALTH = {0: "good", 1: "warning", 2: "error"}


class Command:
    STOP = 0x25
    RESET = 0x40
    SCAN = 0x20
    FORCE_SCAN = 0x21
    GET_INFO = 0x50
    GET_HEALTH = 0x52
    SET_MOTOR_PWM = 0xF0


def request(cmd: int, payload: bytes = b"") -> bytes:
    """A request packet; commands with a payload carry its size and a checksum."""
    if not payload:
        return bytes((SYNC, cmd))
    body = bytes((SYNC, cmd, len(payload))) + payload
    checksum = 0
    for byte in body:
        checksum ^= byte
    return body + bytes((checksum,))


def descriptor(length: int, stream: bool, data_type: int) -> bytes:
    """A response descriptor."""
    return (
        bytes((SYNC, SYNC2)) + struct.pack("<I", length | (int(stream) << 30)) + bytes((data_type,))
    )


def decode_nodes(buffer: bytearray) -> tuple[np.ndarray, int]:
    """Decode the whole nodes at the start of ``buffer`` and remove them (and any garbage)
    from it. Returns ``(nodes, skipped)``: an ``(n, 3)`` array of ``[start, angle_q6,
    distance_q2]`` and the number of garbage bytes skipped to resynchronise."""
    chunks: list[np.ndarray] = []
    skipped = 0
    while len(buffer) >= NODE_BYTES:
        usable = len(buffer) - len(buffer) % NODE_BYTES
        raw = np.frombuffer(bytes(buffer[:usable]), dtype=np.uint8).reshape(-1, NODE_BYTES)
        start = raw[:, 0] & 1
        valid = (start != ((raw[:, 0] >> 1) & 1)) & ((raw[:, 1] & 1) == 1)
        bad = np.flatnonzero(~valid)
        good = raw if bad.size == 0 else raw[: bad[0]]
        if good.size:
            angle = (good[:, 1].astype(np.int32) >> 1) | (good[:, 2].astype(np.int32) << 7)
            distance = good[:, 3].astype(np.int32) | (good[:, 4].astype(np.int32) << 8)
            chunks.append(np.stack([good[:, 0] & 1, angle, distance], axis=1))
        if bad.size == 0:
            del buffer[:usable]
            break
        # Out of step (a lost byte, line noise): drop one byte and look again.
        del buffer[: bad[0] * NODE_BYTES + 1]
        skipped += 1
    nodes = np.concatenate(chunks) if chunks else np.empty((0, 3), dtype=np.int32)
    return nodes, skipped


class RplidarLink:
    """The serial link to one lidar: commands, responses and the scan stream."""

    def __init__(self, port: str, baud: int) -> None:
        self.port_name = port
        try:
            # exclusive: a second reader would steal half the bytes of every node.
            self.serial = serial.Serial(port, baud, timeout=READ_TIMEOUT_S, exclusive=True)
        except serial.SerialException as exc:
            raise DeviceError(_serial_problem(port, exc)) from exc
        self.buffer = bytearray()
        self.garbage_bytes = 0

    def close(self) -> None:
        if self.serial.is_open:
            try:
                self.serial.write(request(Command.STOP))
                self.serial.write(request(Command.SET_MOTOR_PWM, struct.pack("<H", 0)))
                self._motor_line(on=False)
            except (serial.SerialException, OSError):
                pass  # unplugged: nothing to stop
            self.serial.close()

    def _motor_line(self, *, on: bool) -> None:
        """The A1's USB adapter drives its motor from DTR (low: on). A port without modem
        lines (a Pi's GPIO UART, a pseudo-terminal) has the motor wired elsewhere."""
        try:
            self.serial.dtr = not on
        except OSError as exc:
            if exc.errno not in (errno.ENOTTY, errno.EINVAL):
                raise

    def _send(self, packet: bytes) -> None:
        try:
            self.serial.write(packet)
        except (serial.SerialException, OSError) as exc:
            raise DeviceError(f"{self.port_name} stopped answering ({exc}): unplugged?") from exc

    def _read_exact(self, n: int, what: str) -> bytes:
        data = self.serial.read(n)
        if len(data) != n:
            raise DeviceError(
                f"{self.port_name} sent no {what} (is it an RPLidar? check the port and "
                "the baud rate: 115200 for A1/A2, 256000 for A3)"
            )
        return data

    def _response(self, data_type: int, length: int, what: str) -> bytes:
        head = self._read_exact(DESCRIPTOR_BYTES, f"{what} descriptor")
        if head[:2] != bytes((SYNC, SYNC2)) or head[6] != data_type:
            raise DeviceError(
                f"{self.port_name} answered {what} with {head.hex(' ')}, not an RPLidar "
                "descriptor: wrong device or baud rate"
            )
        (word,) = struct.unpack("<I", head[2:6])
        if word & 0x3FFFFFFF != length:
            raise DeviceError(
                f"{self.port_name}: {what} of {word & 0x3FFFFFFF} bytes, not {length}"
            )
        return self._read_exact(length, what) if word >> 30 == 0 else b""

    def start_scan(self, motor_pwm: int) -> str:
        """Stop whatever runs, check health, spin the motor, start the standard scan.
        Returns the device's model and firmware for the log."""
        self._send(request(Command.STOP))
        time.sleep(0.01)  # the protocol asks for at least 1 ms before the next request
        self.serial.reset_input_buffer()  # nodes of a previous scan, a reset banner
        self._send(request(Command.GET_INFO))
        info = self._response(INFO_TYPE, 20, "device info")
        self._send(request(Command.GET_HEALTH))
        health = self._response(HEALTH_TYPE, 3, "health")
        status, code = HEALTH.get(health[0], "unknown"), health[1] | health[2] << 8
        if status == "error":
            # Protection stop: a reset clears it when the cause (e.g. a stalled motor) is gone.
            self._send(request(Command.RESET))
            raise DeviceError(f"{self.port_name} reports a hardware error (code {code}); reset it")
        self._motor_line(on=True)
        self._send(request(Command.SET_MOTOR_PWM, struct.pack("<H", motor_pwm)))  # A2/A3
        self._send(request(Command.SCAN))
        self._response(SCAN_TYPE, NODE_BYTES, "scan")
        self.buffer.clear()
        return f"model {info[0]}, firmware {info[2]}.{info[1]:02d}, health {status}"

    def read_nodes(self) -> np.ndarray:
        """The nodes that arrived since the last call (waits up to the read timeout)."""
        try:
            waiting = self.serial.in_waiting
            data = self.serial.read(max(waiting, NODE_BYTES))
        except (serial.SerialException, OSError) as exc:
            raise DeviceError(f"{self.port_name} stopped answering ({exc}): unplugged?") from exc
        self.buffer += data
        nodes, skipped = decode_nodes(self.buffer)
        self.garbage_bytes += skipped
        if skipped >= GARBAGE_LIMIT or (skipped and nodes.size == 0 and len(data) > 1000):
            raise DeviceError(
                f"{self.port_name} sends garbage ({skipped} bytes out of step): wrong baud "
                "rate, or a failing cable"
            )
        return nodes


@dataclass(frozen=True)
class Scan:
    """One revolution binned into equal bearings (counter-clockwise, beam 0 at -180°)."""

    ranges: np.ndarray  # float32, NO_RETURN_M where nothing came back
    t_capture: float  # host monotonic time the revolution's last node arrived
    nodes: int


class ScanAssembler:
    """Cuts the node stream into revolutions at the start flags and bins each one."""

    def __init__(self, beams: int, baud: int) -> None:
        self.beams = beams
        self.increment_deg = 360.0 / beams
        self.node_s = NODE_BYTES * 10 / baud  # a node's time on the wire (8N1: 10 bits a byte)
        self.partial = 0  # revolutions too short to be a scan (spin-up, a resync)
        self._pending: list[np.ndarray] = []
        self._t_last = 0.0
        self._t_scan = -math.inf
        self._started = False

    def push(self, nodes: np.ndarray, t_arrival: float) -> list[Scan]:
        """Add the nodes of one read that returned at ``t_arrival``; return the revolutions
        they completed. A node's arrival is the read's time less the wire time of the nodes
        after it in the read, so revolutions read together still get their own times."""
        scans: list[Scan] = []
        starts = np.flatnonzero(nodes[:, 0] == 1)
        begin = 0
        for cut in starts:
            if cut > begin:
                self._pending.append(nodes[begin:cut])
                self._t_last = t_arrival - (len(nodes) - cut) * self.node_s
            if self._started and (scan := self._complete()) is not None:
                scans.append(scan)
            self._pending = []
            self._started = True  # nodes before the first start flag are half a revolution
            begin = cut
        if begin < len(nodes):
            self._pending.append(nodes[begin:])
            self._t_last = t_arrival
        return scans

    def _complete(self) -> Scan | None:
        nodes = np.concatenate(self._pending) if self._pending else np.empty((0, 3))
        if len(nodes) < MIN_NODES_PER_REVOLUTION:
            self.partial += 1
            return None
        hits = nodes[nodes[:, 2] > 0]
        ranges = np.full(self.beams, NO_RETURN_M, dtype=np.float32)
        # Clockwise angle a is bearing -a; beam k looks at -180° + k·increment.
        relative = (180.0 - hits[:, 1] / 64.0) % 360.0
        index = np.rint(relative / self.increment_deg).astype(np.int64) % self.beams
        # Two returns in one bin: the nearer one, as an obstacle check would want.
        np.minimum.at(ranges, index, (hits[:, 2] / 4000.0).astype(np.float32))
        # Stamps strictly increase, as a laser log's must, even when the wire-time estimate
        # (a pseudo-terminal has no wire) would put a revolution before the previous one.
        self._t_scan = max(self._t_last, self._t_scan + 1e-6)
        return Scan(ranges, self._t_scan, len(nodes))


class RplidarSource(DeviceSource):
    """The live ``rplidar`` source: one ``scan`` sample per revolution, with its summary
    (``LaserScan``) and, when the robot feeds its odometry, the pose at capture
    (``Odometry``), as the laser replay publishes them."""

    def __init__(self, name: str, spec: Rplidar) -> None:
        super().__init__(name)
        self.spec = spec
        self.odometry = OdometryFeedReader(name, spec.odometry) if spec.odometry else None
        self._link: RplidarLink | None = None
        self._assembler = ScanAssembler(spec.beams, spec.baud)
        self._increment = math.radians(360.0 / spec.beams)
        x, y, yaw_deg = spec.mount
        self._mount = [x, y, math.radians(yaw_deg)]  # as the laser replay's samples carry it

    def start(self, emit: Emit, t0: float | None = None) -> None:
        if self.odometry is not None:
            self.odometry.start()
        super().start(emit, t0)

    def stop(self) -> None:
        super().stop()
        if self.odometry is not None:
            self.odometry.stop()

    def _open(self) -> str:
        self._link = RplidarLink(self.spec.port, self.spec.baud)
        info = self._link.start_scan(self.spec.motor_pwm)
        self._assembler = ScanAssembler(self.spec.beams, self.spec.baud)
        return f"{self.spec.port} at {self.spec.baud} baud, {info}, {self.spec.beams} beams"

    def _close(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    def _read(self) -> None:
        assert self._link is not None
        last_node = time.monotonic()
        while not self._halted():
            nodes = self._link.read_nodes()
            now = time.monotonic()
            if nodes.size == 0:
                if now - last_node > SILENT_S:
                    raise DeviceError(
                        f"{self.spec.port} sent no measurement for {SILENT_S:.0f} s: "
                        "unplugged, or its motor stalled"
                    )
                continue
            last_node = now
            for scan in self._assembler.push(nodes, now):
                self._send(scan)

    def _send(self, scan: Scan) -> None:
        t = scan.t_capture
        motion = self.odometry.pose_at(t) if self.odometry is not None else None
        # No feed, or none heard yet: the scan says so, and SLAM matches it from the last motion
        # (zeros would say the robot stands still at the origin).
        pose = motion[0] if motion is not None else None
        valid = scan.ranges[scan.ranges < NO_RETURN_M]
        events: list[tuple[str, object]] = []
        if motion is not None:
            events.append(
                ("sensor.odometry", Odometry(self.name, t, *motion[0], v=motion[1], w=motion[2]))
            )
        events.append(
            ("sensor.scan", LaserScan(self.name, t, float(valid.min()) if valid.size else math.inf))
        )
        meta = {
            "angle_min": -math.pi,
            "angle_increment": self._increment,
            "max_range": NO_RETURN_M,
            "odom": pose,
            "laser_mount": self._mount,
            "t_log": t,
            "beams": self.spec.beams,
        }
        self._fire(events, Sample(0, t, "scan", meta, scan.ranges.astype("<f4").tobytes()))


def _serial_problem(port: str, exc: serial.SerialException) -> str:
    """One line on why a serial port did not open, and what to do about it."""
    text = str(exc)
    if exc.errno == 2 or "No such file" in text:
        return f"{port} is missing: is the lidar plugged in? (ls -l /dev/ttyUSB* /dev/serial/by-id)"
    if exc.errno == 13 or "Permission denied" in text:
        return f"no permission to open {port}: add the user to group dialout (docs/robot.md)"
    if "exclusively lock" in text or exc.errno == 16:
        return f"{port} is busy: another program has it open (fuser -v {port})"
    return f"cannot open {port}: {text}"
