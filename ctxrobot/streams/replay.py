"""Replay sources: recorded sensor logs played back on the monotonic clock.

Each source turns its part of a scenario into a *timeline* of ticks before the clock
starts (all file reading and decoding happens up front, so playback has no disk jitter).
A `ScenarioPlayer` fires each source's ticks at their times, on one thread per source
(so back-pressure from one task holds up only its own source): each tick's sensor summary
is published on the bus (for context) and the full sample handed to the tasks that read
that source. A sample's `t_sensor` is the moment it was fired, which
is what a live driver would stamp.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctxrobot.model.events import AudioLevel, CameraFrame, LaserScan, Odometry
from ctxrobot.streams.live import build_live_source
from ctxrobot.streams.source import Emit, Fired, LiveSource
from ctxtask.datasets.laser import LaserDataset, load_laser_dataset, scan_sample
from ctxtask.datasets.signs import camera_frame
from ctxtask.datasets.speech import read_wav
from ctxtask.protocol import Sample

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Tick:
    """One sensor reading due `offset_s` after the start of playback."""

    offset_s: float
    source: str
    fire: Callable[[float, int], Fired]
    # fire(t_now, sample_id) -> what to publish on the bus and the sample for the tasks


VELOCITY_WINDOW_S = 0.5


def pose_velocities(
    odometry: np.ndarray, stamps: np.ndarray, window_s: float = VELOCITY_WINDOW_S
) -> tuple[np.ndarray, np.ndarray]:
    """Forward speed (m/s) and turn rate (rad/s) at `stamps`, from odometry poses.

    Derived from the poses over the last `window_s`, not from the logs' velocity columns:
    not every log fills them (the Intel log's tv/rv are all zero), while every log has
    poses. Columns of `odometry`: t, x, y, theta, …
    """
    if len(odometry) == 0:  # a log without odometry (a lidar recorded without a feed)
        return np.zeros(len(stamps)), np.zeros(len(stamps))
    t, x, y = odometry[:, 0], odometry[:, 1], odometry[:, 2]
    theta = np.unwrap(odometry[:, 3])
    before = stamps - window_s
    dx = np.interp(stamps, t, x) - np.interp(before, t, x)
    dy = np.interp(stamps, t, y) - np.interp(before, t, y)
    dtheta = np.interp(stamps, t, theta) - np.interp(before, t, theta)
    return np.hypot(dx, dy) / window_s, dtheta / window_s


class LaserReplay:
    """A laser + odometry log (`slam/intel` layout) replayed at its recorded rate × speed."""

    def __init__(self, name: str, folder: Path, start_s: float = 0.0, speed: float = 1.0) -> None:
        self.name = name
        self.folder = folder
        self.start_s = start_s
        self.speed = speed
        self.dataset: LaserDataset | None = None

    def timeline(self, duration_s: float) -> Iterator[Tick]:
        ds = self.dataset = load_laser_dataset(self.folder)
        geo = ds.geometry
        t_first = float(ds.stamps[0]) + self.start_s
        v, w = pose_velocities(ds.odometry, ds.stamps)
        for i in np.flatnonzero(ds.stamps >= t_first):
            offset = (float(ds.stamps[i]) - t_first) / self.speed
            if offset > duration_s:
                break
            ranges = ds.ranges[i]
            valid = ranges[(ranges > 0.0) & (ranges < geo.max_valid_range)]
            min_range = float(valid.min()) if valid.size else math.inf
            # Built once here; firing only stamps the id and time.
            template = scan_sample(ds, int(i), sample_id=0, t_sensor=0.0)
            odom = template.meta["odom"]
            vi, wi = float(v[i]), float(w[i])

            def fire(
                now: float,
                sid: int,
                odom: list[float] | None = odom,
                vi: float = vi,
                wi: float = wi,
                template: Sample = template,
                min_range: float = min_range,
            ) -> Fired:
                # Odometry feeds the motion context, the scan summary the obstacle context.
                scan = ("sensor.scan", LaserScan(self.name, now, min_range))
                events: tuple[tuple[str, object], ...] = (scan,)
                if odom is not None:
                    odometry = Odometry(self.name, now, *odom, v=vi, w=wi)
                    events = (("sensor.odometry", odometry), scan)
                return Fired(events, dataclasses.replace(template, id=sid, t_sensor=now))

            yield Tick(offset, self.name, fire)


class CameraReplay:
    """Still photos played as a camera stream: idle street scenes, scheduled signs."""

    def __init__(
        self,
        name: str,
        fps: float,
        size: tuple[int, int],
        idle_images: Sequence[Path],
        shows: Sequence[tuple[float, Path, float]],
    ) -> None:
        self.name = name
        self.fps = fps
        self.size = size
        self.idle_images = list(idle_images)
        self.shows = sorted(shows)  # (at_s, image, hold_s)
        if not self.idle_images and not self.shows:
            raise ValueError(f"camera source {name!r} has neither idle images nor shows")

    def shown(self, duration_s: float) -> list[Path]:
        """The photo each frame of a ``duration_s`` run shows, by frame (= sample id)."""
        return [self._image_at(k / self.fps, k) for k in range(int(duration_s * self.fps) + 1)]

    def _image_at(self, t: float, frame_index: int) -> Path:
        for at_s, image, hold_s in self.shows:
            if at_s <= t < at_s + hold_s:
                return image
        if self.idle_images:
            # Hold each idle scene for a second, like a robot driving past it.
            per_scene = max(1, round(self.fps))
            return self.idle_images[(frame_index // per_scene) % len(self.idle_images)]
        return self.shows[0][1]

    def timeline(self, duration_s: float) -> Iterator[Tick]:
        frames: dict[Path, np.ndarray] = {}
        payloads: dict[Path, bytes] = {}
        activity: dict[tuple[Path, Path], float] = {}
        previous: Path | None = None
        n = int(duration_s * self.fps)
        for k in range(n + 1):
            offset = k / self.fps
            path = self._image_at(offset, k)
            if path not in frames:
                frames[path] = camera_frame(path, self.size)
                payloads[path] = frames[path].tobytes()
            key = (previous or path, path)
            if key not in activity:
                diff = np.abs(frames[key[0]].astype(np.int16) - frames[path].astype(np.int16))
                activity[key] = float(diff.mean() / 255.0)
            act = activity[key]
            meta = {"shape": list(frames[path].shape), "name": path.name}

            def fire(
                now: float,
                sid: int,
                act: float = act,
                meta: dict[str, Any] = meta,
                payload: bytes = payloads[path],
            ) -> Fired:
                return Fired(
                    (("sensor.camera", CameraFrame(self.name, now, act)),),
                    Sample(sid, now, "frame", meta, payload),
                )

            yield Tick(offset, self.name, fire)
            previous = path


class AudioReplay:
    """Recorded utterances played into a microphone stream of fixed-size chunks.

    Between utterances the stream carries silence, as a quiet room would: speech
    recognisers and voice-activity detection must see the gaps, not only the speech.
    """

    def __init__(
        self, name: str, chunk_ms: int, plays: Sequence[tuple[float, Path]], rate: int = 16000
    ) -> None:
        self.name = name
        self.chunk_ms = chunk_ms
        self.plays = sorted(plays)
        self.rate = rate

    def timeline(self, duration_s: float) -> Iterator[Tick]:
        total = int(duration_s * self.rate)
        stream = np.zeros(total, dtype=np.int16)
        labels: list[tuple[int, int, str]] = []
        for at_s, path in self.plays:
            pcm = read_wav(path)
            start = int(at_s * self.rate)
            end = min(total, start + len(pcm))
            if start >= total:
                continue
            stream[start:end] = pcm[: end - start]
            labels.append((start, end, path.name))
        chunk = int(self.rate * self.chunk_ms / 1000)
        for begin in range(0, total - chunk + 1, chunk):
            pcm = stream[begin : begin + chunk]
            rms = float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))
            rms_db = 20.0 * math.log10(max(rms, 1.0) / 32768.0)
            utterance = next((name for s, e, name in labels if s <= begin < e), None)
            meta = {"rate": self.rate, "utterance": utterance}
            payload = pcm.astype("<i2").tobytes()

            def fire(
                now: float,
                sid: int,
                rms_db: float = rms_db,
                meta: dict[str, Any] = meta,
                payload: bytes = payload,
            ) -> Fired:
                return Fired(
                    (("sensor.audio", AudioLevel(self.name, now, rms_db)),),
                    Sample(sid, now, "audio", meta, payload),
                )

            # A chunk exists once its last sample was recorded.
            yield Tick((begin + chunk) / self.rate, self.name, fire)


ReplaySource = LaserReplay | CameraReplay | AudioReplay


@dataclass(frozen=True)
class Sources:
    """A scenario's sources: replays the player fires, live devices that run themselves."""

    replay: list[ReplaySource]
    live: list[LiveSource]


def build_sources(scenario: Any, data_dir: Path) -> Sources:
    """The sources of a validated scenario (see `ctxrobot.manifest.Scenario`)."""

    def resolve(path: str | Path) -> Path:
        return Path(data_dir, path)

    sources: list[ReplaySource] = []
    live: list[LiveSource] = []
    for name, spec in scenario.sources.items():
        if spec.kind == "laser_replay":
            sources.append(LaserReplay(name, resolve(spec.log), spec.start_s, spec.speed))
        elif spec.kind == "camera_replay":
            idle: list[Path] = []
            if spec.idle is not None:
                idle = sorted(resolve(spec.idle.dir).glob(spec.idle.pattern))
            shows = [(s.at_s, resolve(s.image), s.hold_s) for s in spec.show]
            sources.append(CameraReplay(name, spec.fps, tuple(spec.size), idle, shows))
        elif spec.kind == "audio_replay":
            plays = [(p.at_s, resolve(p.file)) for p in spec.play]
            sources.append(AudioReplay(name, spec.chunk_ms, plays))
        else:
            live.append(build_live_source(name, spec))
    return Sources(sources, live)


class ScenarioPlayer:
    """Fires each source's ticks at their times, one thread per source: a task applying
    back-pressure (``overflow: block``) holds up its own source, never another one."""

    def __init__(
        self,
        sources: Sequence[ReplaySource],
        duration_s: float,
        emit: Emit,
        *,
        loop: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`loop`: play the scenario again and again (the daemon replays until stopped)."""
        self.duration_s = duration_s
        self.loop = loop
        self._emit = emit
        self._clock = clock
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._timelines = {s.name: list(s.timeline(duration_s)) for s in sources}
        self.counts: dict[str, int] = {name: len(t) for name, t in self._timelines.items()}
        self._fired: dict[str, int] = dict.fromkeys(self._timelines, 0)
        self._late_ms: dict[str, float] = dict.fromkeys(self._timelines, 0.0)

    @property
    def fired(self) -> int:
        return sum(self._fired.values())

    @property
    def late_ms_max(self) -> float:
        """How late the latest-fired tick was (back-pressure or a busy machine)."""
        return max(self._late_ms.values(), default=0.0)

    def start(self, t0: float) -> None:
        if not self._timelines:
            # Live sources only: the scenario is a duration to run for (forever in a loop).
            self._threads.append(threading.Thread(target=self._wait_out, name="player"))
        for name, ticks in self._timelines.items():
            self._threads.append(
                threading.Thread(target=self._play, args=(name, ticks, t0), name=f"play:{name}")
            )
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    def _wait_out(self) -> None:
        self._stop.wait(None if self.loop else self.duration_s)

    def _play(self, source: str, ticks: Sequence[Tick], t0: float) -> None:
        # Sample ids keep counting across loops: every sample of a run has its own id.
        sid = 0
        while True:
            for tick in ticks:
                due = t0 + tick.offset_s
                # One wait to the tick's time: `stop` ends it early. Every extra wake-up of a
                # thread that sleeps most of the time costs a cold start of the interpreter.
                while (wait := due - self._clock()) > 0:
                    if self._stop.wait(wait):
                        return
                if self._stop.is_set():
                    return
                now = self._clock()
                self._late_ms[source] = max(self._late_ms[source], (now - due) * 1000.0)
                self._emit(source, tick.fire(now, sid))
                sid += 1
                self._fired[source] += 1
            if not self.loop:
                return
            t0 += self.duration_s

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the end of playback; True when it finished (or was stopped)."""
        deadline = None if timeout_s is None else self._clock() + timeout_s
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - self._clock()))
        return not any(thread.is_alive() for thread in self._threads)
