"""``ctxrobot record``: a live session written in the formats the replay and the tasks read.

    ctxrobot record --config config/examples/pi-robot.yaml --out rec/ --duration 60

reads the manifest's live sources (no task runs) and writes, in ``--out``:

- ``<lidar>/``: ``<lidar>_laser.txt.gz`` + ``<lidar>_odom.txt`` + ``laser.yaml``, a laser log
  folder as ``laser_replay`` and the SLAM evaluator read it (stamps in seconds from the start
  of the session; odometry: the pose each scan carried);
- ``<camera>/``: ``000000.png``… (lossless) and ``index.csv`` (``id,offset_s,file``), which a
  ``camera`` source plays at the recorded times (``device: <camera>/%06d.png``);
- ``<microphone>.wav``: 16 kHz mono int16, the chunks one after another;
- ``scenario.yaml``: the manifest's scenario with each live source replaced by its recording,
  so ``ctxrobot run --config MANIFEST --scenario OUT/scenario.yaml`` and ``ctxrobot bench``
  replay the session unchanged.

Sample ids in the recording start at 0 and follow the order the live source emitted them, so
replaying gives the same samples (ids, payloads) at the recorded offsets. The session starts
when every source has delivered: at the first lidar scan then (the laser replay's time zero),
else at the start of the first audio chunk, else at the first frame. The audio replay's chunks
begin at time zero too, so the microphone's first chunk is the one that starts nearest the
session start: within half a chunk. Paths in ``scenario.yaml`` are absolute: move the folder,
edit them.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import logging
import queue
import signal
import sys
import threading
import time
import wave
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from ruamel.yaml import YAML

from ctxrobot.manifest.live import Camera, Microphone, Rplidar
from ctxrobot.model.bus import EventBus
from ctxrobot.model.errors import UserError
from ctxrobot.model.events import Odometry
from ctxrobot.streams.live import build_live_source
from ctxrobot.streams.live.camera import INDEX_FILE
from ctxrobot.streams.live.rplidar import NO_RETURN_M
from ctxrobot.streams.source import Fired, LiveSource

log = logging.getLogger(__name__)

__all__ = ["Recorder", "add_record_parser", "record"]

PREROLL_S = 2.0  # samples kept before the session starts, to choose its first ones
FRAME_QUEUE = 64  # frames waiting for the PNG writer (~60 MB at 640×480)
PNG_LEVEL = 1  # fast, lossless; 640×480 ≈ 5 ms a frame
_YAML = YAML(typ="safe", pure=True)
_YAML.default_flow_style = False
_YAML.sort_base_mapping_type_on_output = False  # type: ignore[assignment]  # keep the order written


@dataclass
class _Track:
    """What one source recorded (after the session start) and where it goes."""

    name: str
    spec: Any
    preroll: deque[Fired] = field(default_factory=deque)
    kept: int = 0
    rows: list[Any] = field(default_factory=list)  # laser rows, audio chunks, frame offsets


class Recorder:
    """An :class:`~ctxrobot.streams.source.Emit` that writes what live sources emit."""

    def __init__(self, out: Path, specs: dict[str, Any]) -> None:
        self.out = out
        self.tracks = {name: _Track(name, spec) for name, spec in specs.items()}
        self.t0: float | None = None
        self.duration_s = 0.0
        self.frames_dropped = 0
        self._lock = threading.Lock()
        self._frames: queue.Queue[tuple[Path, np.ndarray] | None] = queue.Queue(FRAME_QUEUE)
        self._writer = threading.Thread(target=self._write_frames, name="record:png", daemon=True)
        self._writer.start()

    # -- receiving ----------------------------------------------------------------------------
    def __call__(self, source: str, fired: Fired) -> None:
        with self._lock:
            track = self.tracks[source]
            if self.t0 is not None:
                self._keep(track, fired)
                return
            track.preroll.append(fired)
            while fired.sample.t_sensor - track.preroll[0].sample.t_sensor > PREROLL_S:
                track.preroll.popleft()
            if all(t.preroll for t in self.tracks.values()):
                self._begin()

    def _begin(self) -> None:
        """Fix the session start and keep the pre-roll samples that belong to it."""
        lidar = [t for t in self.tracks.values() if isinstance(t.spec, Rplidar)]
        mics = [t for t in self.tracks.values() if isinstance(t.spec, Microphone)]
        if lidar:
            self.t0 = lidar[0].preroll[-1].sample.t_sensor
        elif mics:
            self.t0 = mics[0].preroll[-1].sample.t_sensor - mics[0].spec.chunk_ms / 1000
        else:
            self.t0 = max(t.preroll[-1].sample.t_sensor for t in self.tracks.values())
        for track in self.tracks.values():
            for fired in track.preroll:
                self._keep(track, fired)
            track.preroll.clear()
        log.info("recording: the session starts now")

    def _belongs(self, track: _Track, fired: Fired) -> bool:
        """Whether a sample is part of the session (a chunk: when it starts nearer the
        session start than the chunk before it, since chunks are stamped at their end)."""
        assert self.t0 is not None
        late = track.spec.chunk_ms / 2000 if isinstance(track.spec, Microphone) else 0.0
        return fired.sample.t_sensor - late >= self.t0

    def _keep(self, track: _Track, fired: Fired) -> None:
        assert self.t0 is not None
        sample = fired.sample
        if not self._belongs(track, fired):
            return
        offset = sample.t_sensor - self.t0
        if isinstance(track.spec, Rplidar):
            odometry = next((e for topic, e in fired.events if isinstance(e, Odometry)), None)
            motion = (odometry.v, odometry.w) if odometry is not None else (0.0, 0.0)
            ranges = np.frombuffer(sample.payload, dtype="<f4")
            track.rows.append((offset, ranges, sample.meta["odom"], motion))
        elif isinstance(track.spec, Microphone):
            track.rows.append(sample.payload)
        else:
            name = f"{track.kept:06d}.png"
            frame = sample.array()
            try:
                self._frames.put_nowait((self.out / track.name / name, frame))
            except queue.Full:
                self.frames_dropped += 1
                return
            track.rows.append((track.kept, offset, name))
        track.kept += 1

    def _write_frames(self) -> None:
        while (item := self._frames.get()) is not None:
            path, frame = item
            cv2.imwrite(str(path), frame, [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL])

    # -- writing ------------------------------------------------------------------------------
    def prepare(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for track in self.tracks.values():
            if isinstance(track.spec, Camera | Rplidar):
                (self.out / track.name).mkdir(exist_ok=True)

    def finish(self) -> dict[str, dict[str, Any]]:
        """Write every recording; returns what each source got."""
        self._frames.put(None)
        self._writer.join()
        written: dict[str, dict[str, Any]] = {}
        with self._lock:
            self._trim()
            for track in self.tracks.values():
                written[track.name] = {"samples": track.kept}
                if not track.kept:
                    continue
                if isinstance(track.spec, Rplidar):
                    _write_laser(self.out / track.name, track)
                elif isinstance(track.spec, Microphone):
                    _write_wav(self.out / f"{track.name}.wav", track.rows)
                else:
                    _write_index(self.out / track.name / INDEX_FILE, track.rows)
        return written

    def _trim(self) -> None:
        """End the session where its first stream ended: a replay of it then has exactly
        the recorded samples (past its end the audio replay would add silence)."""
        ends = []
        for track in self.tracks.values():
            if not track.rows:
                continue
            if isinstance(track.spec, Microphone):
                ends.append(len(track.rows) * track.spec.chunk_ms / 1000)
            else:
                ends.append(
                    track.rows[-1][0] if isinstance(track.spec, Rplidar) else track.rows[-1][1]
                )
        if not ends:
            return
        end = min(ends)
        for track in self.tracks.values():
            if isinstance(track.spec, Microphone):
                chunk_s = track.spec.chunk_ms / 1000
                track.rows = track.rows[: int(end / chunk_s + 1e-6)]
                end = len(track.rows) * chunk_s
        # The audio replay cuts chunks up to int(duration × rate) samples: a hair more than
        # the last chunk's end keeps it whole, whatever the float rounding.
        self.duration_s = round(end + 0.0005, 4)
        for track in self.tracks.values():
            if isinstance(track.spec, Camera):
                for _, offset, name in track.rows:
                    if offset > self.duration_s:
                        (self.out / track.name / name).unlink(missing_ok=True)
                track.rows = [r for r in track.rows if r[1] <= self.duration_s]
            elif isinstance(track.spec, Rplidar):
                track.rows = [r for r in track.rows if r[0] <= self.duration_s]
            track.kept = len(track.rows)


def _write_laser(folder: Path, track: _Track) -> None:
    spec: Rplidar = track.spec
    with gzip.open(folder / f"{track.name}_laser.txt.gz", "wt") as laser:
        laser.write(f"# {track.name}: live RPLidar scans recorded by ctxrobot record\n")
        laser.write("# columns: timestamp_s range_0_m ... range_B-1_m\n")
        for offset, ranges, _, _ in track.rows:
            # %.9g writes a float32 exactly: the replay reads back the same payload.
            laser.write(f"{offset:.6f} " + " ".join(f"{r:.9g}" for r in ranges) + "\n")
    with (folder / f"{track.name}_odom.txt").open("w") as odom:
        # A scan without a pose (no feed, or it fell silent) has no row: the reader takes a
        # file without rows as a robot without odometry, and interpolates over a gap.
        odom.write(f"# {track.name}: the pose each scan carried; none: no odometry feed\n")
        odom.write("# columns: timestamp_s x_m y_m theta_rad tv_m_per_s rv_rad_per_s\n")
        for offset, _, pose, (v, w) in track.rows:
            if pose is not None:
                x, y, theta = pose
                odom.write(f"{offset:.6f} {x:.9g} {y:.9g} {theta:.9g} {v:.9g} {w:.9g}\n")
    stamps = [row[0] for row in track.rows]
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    (folder / "laser.yaml").write_text(
        f"# {track.name}: RPLidar on {spec.port}, one scan per revolution, beam 0 behind the "
        "lidar,\n# bearings counter-clockwise. A range of no_return_m means no return.\n"
        f"beams: {spec.beams}\nangle_min_deg: -180.0\nangle_increment_deg: "
        f"{360.0 / spec.beams!r}\nno_return_m: {NO_RETURN_M}\nscan_rate_hz: {rate:.3f}\n"
        "# Where the lidar sits on the robot's base (the manifest's mount): forward, left,\n"
        "# counter-clockwise.\n"
        f"mount_x_m: {spec.mount[0]!r}\nmount_y_m: {spec.mount[1]!r}\n"
        f"mount_yaw_deg: {spec.mount[2]!r}\n"
    )


def _write_wav(path: Path, chunks: list[bytes]) -> None:
    from ctxtask.datasets.speech import SAMPLE_RATE

    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(b"".join(chunks))


def _write_index(path: Path, rows: list[tuple[int, float, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "offset_s", "file"])
        for sample_id, offset, name in rows:
            writer.writerow([sample_id, f"{offset:.6f}", name])


def _scenario(manifest: Any, recorder: Recorder, duration_s: float) -> str:
    """The manifest's scenario with every recorded source replaced by its recording; the
    other sources are copied as written (``${VAR}`` and all)."""
    scenario_path = manifest.scenario.path
    sources: dict[str, Any] = dict(_YAML.load(scenario_path.read_text())["sources"])
    out = recorder.out.resolve()
    for name, track in recorder.tracks.items():
        spec = track.spec
        if not track.kept:
            log.warning("source %s recorded nothing; the scenario keeps it live", name)
            continue
        if isinstance(spec, Rplidar):
            sources[name] = {"kind": "laser_replay", "log": str(out / name)}
        elif isinstance(spec, Microphone):
            play = [{"at_s": 0.0, "file": str(out / f"{name}.wav")}]
            sources[name] = {"kind": "audio_replay", "chunk_ms": spec.chunk_ms, "play": play}
        else:
            width, height = spec.size
            sources[name] = {
                "kind": "camera",
                "device": str(out / name / "%06d.png"),
                "fps": spec.fps,
                "size": [width, height],
            }
    header = (
        f"# Recorded by `ctxrobot record` from {manifest.path} ({scenario_path.name}).\n"
        f"# Replay: ctxrobot run --config {manifest.path} --scenario {out / 'scenario.yaml'}\n"
        "# Paths are absolute: edit them if this folder moves.\n"
    )
    body = {"version": 1, "duration_s": max(duration_s, 0.1), "sources": sources}
    text = io.StringIO()
    _YAML.dump(body, text)
    return header + text.getvalue()


def record(manifest: Any, out: Path, duration_s: float, stop: threading.Event) -> dict[str, Any]:
    """Record the manifest's live sources into ``out`` for ``duration_s`` (or until ``stop``);
    returns a summary per source. Raises ``UserError`` when there is nothing to record."""
    recordable = (Camera, Microphone, Rplidar)
    specs = {n: s for n, s in manifest.scenario.sources.items() if isinstance(s, recordable)}
    if not specs:
        raise UserError(
            f"{manifest.scenario.path} has no live camera, microphone or rplidar source to "
            "record; see config/examples/pi-robot.yaml"
        )
    skipped = sorted(set(manifest.scenario.sources) - set(specs))
    if skipped:
        log.info("not recorded (replays, or derived while tasks run): %s", ", ".join(skipped))
    recorder = Recorder(out, specs)
    recorder.prepare()
    bus = EventBus()
    sources: list[LiveSource] = [build_live_source(name, spec) for name, spec in specs.items()]
    for source in sources:
        source.attach(bus)  # type: ignore[attr-defined]  # every live source has attach
        source.start(recorder)
    started = time.monotonic()
    try:
        while not stop.wait(0.2):
            if recorder.t0 is not None and time.monotonic() - recorder.t0 >= duration_s:
                break
            if recorder.t0 is None and time.monotonic() - started > 60.0:
                waiting = [t.name for t in recorder.tracks.values() if not t.preroll]
                raise UserError(
                    f"no reading from {', '.join(waiting)} within 60 s; the log says why"
                )
    finally:
        for source in sources:
            source.stop()
        bus.close()
        written = recorder.finish()
    stats = {s.name: s.stats.as_dict() for s in sources if hasattr(s, "stats")}
    for name, summary in written.items():
        live = stats.get(name, {})
        summary.update({k: v for k, v in live.items() if k not in ("detail", "samples")})
        summary["delivered"] = live.get("samples", 0)
    if recorder.t0 is not None:
        text = _scenario(manifest, recorder, recorder.duration_s)
        (out / "scenario.yaml").write_text(text)
    return {"out": str(out), "duration_s": recorder.duration_s, "sources": written}


def cmd_record(args: argparse.Namespace) -> int:
    from ctxrobot.manifest.schema import ManifestError, load_manifest

    try:
        manifest = load_manifest(args.config)
    except ManifestError as err:
        print(err, file=sys.stderr)
        return 2
    duration = args.duration or manifest.scenario.duration_s
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    summary = record(manifest, Path(args.out).resolve(), duration, stop)
    for name, got in summary["sources"].items():
        extras = ", ".join(f"{k} {v}" for k, v in got.items() if k != "samples" and v)
        print(f"{name}: {got['samples']} samples" + (f" ({extras})" if extras else ""))
    if summary["duration_s"] > 0:
        print(f"recorded {summary['duration_s']:.1f} s into {summary['out']}")
        print(f"replay: ctxrobot run --config {args.config} --scenario {args.out}/scenario.yaml")
        return 0
    print("nothing was recorded: no source delivered (see the log above)")
    return 1


def add_record_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `record` to the ctxrobot command line."""
    p = subparsers.add_parser(
        "record",
        help="record the robot's live sensors for replay (like `ros2 bag record`)",
        description="Read the manifest's live sources (camera, microphone, rplidar; no task "
        "runs) and write them in the replay formats: a laser log folder, PNG frames with an "
        "index, a WAV file, and a scenario.yaml that replays them with `ctxrobot run "
        "--scenario` or `ctxrobot bench`. Ctrl-C ends the recording early and keeps it.",
    )
    p.add_argument("--config", required=True, metavar="PATH", help="robot manifest")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the session to")
    p.add_argument(
        "--duration", type=float, metavar="S", help="seconds to record (default: the scenario's)"
    )
    p.set_defaults(func=cmd_record)
    return p
