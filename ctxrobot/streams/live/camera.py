"""The live ``camera`` source: frames from a V4L2 device, an IP camera, a video file or a
GStreamer pipeline, as ``frame`` samples (uint8 BGR) with a ``CameraFrame`` summary.

Inputs (``device:`` or ``pipeline:``):

- ``/dev/video0`` or an index: OpenCV's V4L2 backend; size and fps are requested, the
  granted values are logged and reported in the ``open`` state.
- ``rtsp://…``, ``http://…`` (MJPEG): OpenCV's FFmpeg backend, with open and read timeouts
  so a camera that goes offline is a fault, not a hang.
- a video file, or an image sequence such as ``frames/%06d.png``: played at its own pace
  (its timestamps; for an image sequence, the ``index.csv`` beside it that ``ctxrobot
  record`` writes, else ``fps``), once; then the source closes.
- ``pipeline:``: ``gst-launch-1.0`` runs it and hands over raw BGR frames through a pipe
  (works with any OpenCV build; the pip wheels have no GStreamer).

Two threads: the capture thread only reads frames and stamps them; a sender thread computes
the summary and emits. Between them a one-frame mailbox: when the sender falls behind,
the older frame is replaced and counted (``dropped_host``), so capture never waits and the
device's own queue never overflows. Frames the device itself lost show as gaps in the
capture times and are counted too (``dropped_device``). No per-pixel work happens in Python:
the summary is OpenCV's on an 80×60 thumbnail.
"""

from __future__ import annotations

import collections
import csv
import logging
import os
import select
import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ctxrobot.manifest.live import Camera
from ctxrobot.model.events import CameraFrame
from ctxrobot.streams.live.device import DeviceError, DeviceSource, EndOfStream
from ctxrobot.streams.source import Emit
from ctxtask.protocol import Sample

log = logging.getLogger(__name__)

__all__ = ["INDEX_FILE", "CameraSource", "read_index"]

INDEX_FILE = "index.csv"  # offset_s of each frame of a recorded image sequence, in order
OPEN_TIMEOUT_MS = 5000
READ_TIMEOUT_MS = 2000
THUMBNAIL = (80, 60)
GAP_FACTOR = 1.5  # a capture gap this many frame periods long means frames were lost
MIN_INTERVALS = 10  # frame intervals seen before gaps are judged against their median


def read_index(folder: Path) -> list[float]:
    """The frame offsets (s) of a recorded image sequence."""
    with (folder / INDEX_FILE).open(newline="") as handle:
        return [float(row["offset_s"]) for row in csv.DictReader(handle)]


@dataclass(frozen=True)
class _Input:
    """Where frames come from, classified once from the spec."""

    kind: str  # "v4l2", "stream", "file", "sequence", "pipeline"
    target: str | int

    @classmethod
    def of(cls, spec: Camera) -> _Input:
        if spec.pipeline is not None:
            return cls("pipeline", spec.pipeline)
        device = spec.device
        assert device is not None
        if isinstance(device, int) or device.startswith("/dev/"):
            return cls("v4l2", device)
        if "://" in device:
            return cls("stream", device)
        return cls("sequence" if "%" in device else "file", device)

    @property
    def live(self) -> bool:
        return self.kind in ("v4l2", "stream", "pipeline")


class _GstReader:
    """Raw BGR frames of a GStreamer pipeline, read from ``gst-launch-1.0``'s stdout."""

    def __init__(self, pipeline: str, size: tuple[int, int]) -> None:
        launcher = shutil.which("gst-launch-1.0")
        if launcher is None:
            raise DeviceError(
                "gst-launch-1.0 is not installed: apt install gstreamer1.0-tools "
                "(and gstreamer1.0-libcamera for a Pi camera)"
            )
        width, height = size
        self.shape = (height, width, 3)
        self.frame_bytes = width * height * 3
        tail = (
            f"! videoconvert ! videoscale ! video/x-raw,format=BGR,width={width},"
            f"height={height} ! fdsink fd=1 sync=false"
        )
        self.proc = subprocess.Popen(
            [launcher, "-q", *f"{pipeline} {tail}".split()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()

    def read(self) -> np.ndarray:
        buffer = bytearray(self.frame_bytes)
        view = memoryview(buffer)
        got = 0
        while got < self.frame_bytes:
            ready, _, _ = select.select([self._fd], [], [], READ_TIMEOUT_MS / 1000)
            n = os.readv(self._fd, [view[got:]]) if ready else -1
            if n <= 0:
                raise DeviceError(f"GStreamer pipeline stopped: {self._error()}")
            got += n
        return np.frombuffer(buffer, dtype=np.uint8).reshape(self.shape)

    def _error(self) -> str:
        if self.proc.poll() is None:
            return f"no frame for {READ_TIMEOUT_MS / 1000:.0f} s"
        assert self.proc.stderr is not None
        lines = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"gst-launch-1.0 exited with {self.proc.returncode}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class CameraSource(DeviceSource):
    def __init__(self, name: str, spec: Camera) -> None:
        super().__init__(name)
        self.spec = spec
        self.input = _Input.of(spec)
        self._capture: cv2.VideoCapture | None = None
        self._gst: _GstReader | None = None
        self._period_s = 1.0 / spec.fps  # a file's frame spacing when it has no timestamps
        self._intervals: collections.deque[float] = collections.deque(maxlen=31)
        self._offsets: list[float] | None = None  # a recorded sequence's frame times
        # The mailbox between the capture thread and the sender thread.
        self._mail = threading.Condition()
        self._pending: tuple[np.ndarray, float] | None = None
        self._sender: threading.Thread | None = None
        self._previous: np.ndarray | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, emit: Emit, t0: float | None = None) -> None:
        self._sender = threading.Thread(target=self._send_loop, name=f"send:{self.name}")
        self._sender.daemon = True
        self._sender.start()
        super().start(emit, t0)

    def stop(self) -> None:
        super().stop()
        with self._mail:
            self._mail.notify_all()
        if self._sender is not None:
            self._sender.join(2.0)

    # -- the device -------------------------------------------------------------------------
    def _open(self) -> str:
        self._intervals.clear()
        kind, target = self.input.kind, self.input.target
        width, height = self.spec.size
        if kind == "pipeline":
            self._gst = _GstReader(str(target), self.spec.size)
            return f"GStreamer pipeline at {width}x{height}"
        if kind == "v4l2":
            path = f"/dev/video{target}" if isinstance(target, int) else str(target)
            capture = cv2.VideoCapture(path, cv2.CAP_V4L2)
            if not capture.isOpened():
                raise DeviceError(_v4l2_problem(path))
            capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
            capture.set(cv2.CAP_PROP_FPS, self.spec.fps)
        elif kind == "stream":
            timeouts = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                OPEN_TIMEOUT_MS,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                READ_TIMEOUT_MS,
            ]
            capture = cv2.VideoCapture(str(target), cv2.CAP_FFMPEG, timeouts)
            if not capture.isOpened():
                raise DeviceError(
                    f"cannot open {target}: camera offline, or a wrong URL or credentials"
                )
        else:
            capture = self._open_file(str(target))
        self._capture = capture
        granted_fps = capture.get(cv2.CAP_PROP_FPS)
        granted = (
            f"{int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))}x"
            f"{int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))} @ {granted_fps:g} fps"
        )
        return f"{target}: {granted} (asked {width}x{height} @ {self.spec.fps:g} fps)"

    def _open_file(self, path: str) -> cv2.VideoCapture:
        folder = Path(path).parent
        if self.input.kind == "sequence":
            capture = cv2.VideoCapture(path, cv2.CAP_IMAGES)
            self._offsets = read_index(folder) if (folder / INDEX_FILE).is_file() else None
        else:
            if not Path(path).is_file():
                raise DeviceError(f"video file {path} not found")
            capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
        if not capture.isOpened():
            raise DeviceError(f"cannot read {path} as video (is it a video or image sequence?)")
        return capture

    def _close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None
        if self._gst is not None:
            self._gst.close()
            self._gst = None

    # -- capture thread ---------------------------------------------------------------------
    def _read(self) -> None:
        last: float | None = None
        frame_index = 0
        while not self._halted():
            frame, t_capture = self._grab(frame_index)
            frame_index += 1
            if last is not None and self.input.live:
                self._count_gap(t_capture - last)
            last = t_capture
            with self._mail:
                if self._pending is not None:
                    self.stats.dropped_host += 1
                self._pending = (frame, t_capture)
                self._mail.notify()

    def _count_gap(self, gap: float) -> None:
        """Count the frames a capture gap says were lost. The frame period is the median of
        the recent intervals: streams declare a nominal rate at best, and a median is not
        moved by the gaps it is there to find."""
        self._intervals.append(gap)
        if len(self._intervals) < MIN_INTERVALS:
            return
        period = statistics.median(self._intervals)
        if gap > GAP_FACTOR * period:
            self.stats.dropped_device += round(gap / period) - 1

    def _grab(self, frame_index: int) -> tuple[np.ndarray, float]:
        """The next frame and its capture time (host monotonic)."""
        if self._gst is not None:
            frame = self._gst.read()
            return frame, time.monotonic()
        capture = self._capture
        assert capture is not None
        if self._offsets is not None and frame_index >= len(self._offsets):
            # Not one read past the end: OpenCV warns on stderr about the missing file.
            raise EndOfStream(f"{self.input.target}: every frame of {INDEX_FILE} played")
        ok, frame = capture.read()
        now = time.monotonic()
        if not ok or frame is None:
            if not self.input.live:
                raise EndOfStream(f"{self.input.target} ended after {frame_index} frames")
            raise DeviceError(f"{self.input.target} stopped delivering frames: unplugged?")
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise DeviceError(f"{self.input.target} returned a {frame.shape} array, not BGR")
        if self.input.kind == "v4l2":
            # V4L2 stamps its buffers on the monotonic clock at capture; trust it when sane.
            stamp = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            return frame, stamp if 0.0 <= now - stamp < 1.0 else now
        if self.input.live:
            return frame, now
        due = self._t0 + self._file_offset(capture, frame_index)
        if self._wait(max(0.0, due - time.monotonic())):
            raise EndOfStream("stopped")
        return frame, due

    def _file_offset(self, capture: cv2.VideoCapture, frame_index: int) -> float:
        if self._offsets is not None:
            return self._offsets[frame_index]
        if self.input.kind == "file":
            return capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
        return frame_index * self._period_s

    # -- sender thread ----------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            with self._mail:
                while self._pending is None and not self._halted():
                    self._mail.wait(0.5)
                if self._pending is None:
                    return
                frame, t_capture = self._pending
                self._pending = None
            self._send(frame, t_capture)

    def _send(self, frame: np.ndarray, t_capture: float) -> None:
        # Bilinear, not area-averaging: 0.05 ms instead of 0.8 ms a frame, and a scene
        # change shows in a sparse sample as well as in an average.
        thumbnail = cv2.resize(frame, THUMBNAIL, interpolation=cv2.INTER_LINEAR)
        activity = 0.0
        if self._previous is not None:
            activity = float(np.mean(cv2.mean(cv2.absdiff(thumbnail, self._previous))[:3]))
        self._previous = thumbnail
        meta = {"shape": list(frame.shape), "name": f"{self.name}-{self.stats.samples}"}
        sample = Sample(0, t_capture, "frame", meta, frame.tobytes())
        self._fire(
            (("sensor.camera", CameraFrame(self.name, t_capture, activity / 255.0)),), sample
        )


def _v4l2_problem(path: str) -> str:
    """One line on why a V4L2 device did not open, and what to do about it."""
    if not os.path.exists(path):
        return f"{path} is missing: is the camera plugged in? (v4l2-ctl --list-devices)"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"no permission to open {path}: add the user to group video (docs/robot.md)"
    return f"{path} is busy or not a capture device (fuser -v {path}; v4l2-ctl --list-devices)"
