"""The real devices the live-source and record tests talk to (no tests here).

- an IP camera: MJPEG over HTTP on 127.0.0.1, served from real street photos;
- a sound card that is not there: a private PulseAudio server with a null sink, played into
  with ``paplay`` and recorded from its monitor through PortAudio's ALSA ``pulse`` device;
- an RPLidar: ``ctxrobot.streams.live.emulator`` on a pseudo-terminal, playing the Intel log
  byte for byte, with its odometry over UDP.
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from ctxtask.datasets.signs import camera_frame
from tests.conftest import REPO, skip_unless_ci

# What the runtime runs sources with: a short interpreter switch interval and real-time
# priority (see ctxrobot.service.runtime), so a reading is stamped when it arrives.
SWITCH_INTERVAL_S = 0.0005
RT_PRIORITY = 10
SIGN_IMAGES = Path("signs/road-sign-detection-subset/images")
STOP_IMAGE = SIGN_IMAGES / "road22.png"  # a stop sign the signs task finds (its eval set)
STREET_IMAGES = [SIGN_IMAGES / f"road{k}.png" for k in (101, 102, 104, 105)]  # no stop sign


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def open_fds() -> set[str]:
    """This process's open file descriptors, as the files they point at."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(f"{fd}:{os.readlink(f'/proc/self/fd/{fd}')}")
        except FileNotFoundError:
            continue  # the descriptor listdir itself used
    return found


def live_threads() -> set[str]:
    return {t.name for t in threading.enumerate()}


def wait_until(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# -- an IP camera ----------------------------------------------------------------------------
class MjpegCamera:
    """An HTTP MJPEG stream (``multipart/x-mixed-replace``) of ``frames`` in a loop, as IP
    cameras serve it; ``stop()`` drops every client, as a camera losing power does."""

    def __init__(self, frames: Sequence[np.ndarray], fps: float, port: int = 0) -> None:
        self.jpegs = [
            cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for f in frames
        ]
        self.fps = fps
        self.halt = threading.Event()
        camera = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                k = 0
                try:
                    while not camera.halt.is_set():
                        jpeg = camera.jpegs[k % len(camera.jpegs)]
                        head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}"
                        self.wfile.write(head.encode() + b"\r\n\r\n" + jpeg + b"\r\n")
                        k += 1
                        time.sleep(1.0 / camera.fps)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: object) -> None:
                pass

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/video.mjpg"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.halt.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def street_frames(data: Path, stop_every: int = 0) -> list[np.ndarray]:
    """Street photos without a stop sign, then (``stop_every`` > 0) the stop sign."""
    frames = [camera_frame(data / p, (640, 480)) for p in STREET_IMAGES]
    if stop_every:
        frames += [camera_frame(data / STOP_IMAGE, (640, 480))] * stop_every
    return frames


# -- a sound server without a sound card -------------------------------------------------------
@contextmanager
def pulse_server(folder: Path) -> Iterator[dict[str, str]]:
    """A private PulseAudio server whose default sink is a 16 kHz mono null sink and whose
    default source is that sink's monitor; yields the environment that reaches it."""
    for tool in ("pulseaudio", "paplay", "pactl"):
        if shutil.which(tool) is None:
            skip_unless_ci(f"{tool} is not installed (apt install pulseaudio pulseaudio-utils)")
    folder.mkdir(parents=True, exist_ok=True)
    socket_path = folder / "native"
    env = {
        **os.environ,
        "HOME": str(folder),
        "PULSE_RUNTIME_PATH": str(folder / "run"),
        "PULSE_SERVER": f"unix:{socket_path}",
    }
    proc = subprocess.Popen(
        [
            "pulseaudio",
            "-n",
            "--daemonize=no",
            "--exit-idle-time=-1",
            "--disallow-exit",
            f"--load=module-native-protocol-unix auth-anonymous=1 socket={socket_path}",
            "--load=module-null-sink sink_name=robot rate=16000 channels=1 format=s16le",
            "--log-target=stderr",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(
            lambda: subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode == 0,
            15,
            "PulseAudio to answer",
        )
        yield env
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


def play(wav: Path, env: dict[str, str]) -> None:
    """Play a WAV file into the null sink (what the robot's microphone hears)."""
    subprocess.run(["paplay", "--device=robot", str(wav)], env=env, check=True, timeout=120)


# -- an RPLidar --------------------------------------------------------------------------------
class LidarEmulator:
    """The RPLidar emulator as its own process: killing it is unplugging the lidar."""

    def __init__(
        self, log: Path, link: Path, *, odometry_port: int, speed: float = 1.0, start_s: float = 0
    ) -> None:
        self.log, self.link, self.odometry_port = log, link, odometry_port
        self.speed, self.start_s = speed, start_s
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LidarEmulator:
        self.link.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ctxrobot.streams.live.emulator",
                "--log",
                str(self.log),
                "--link",
                str(self.link),
                "--odometry-udp",
                f"127.0.0.1:{self.odometry_port}",
                "--speed",
                str(self.speed),
                "--start-s",
                str(self.start_s),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
        )
        wait_until(self.link.exists, 30, "the emulated lidar's port")
        return self

    def unplug(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# -- a robot manifest with live sources, run by `ctxrobot run` ----------------------------------
def write_live_manifest(
    folder: Path, data: Path, sources: dict[str, dict[str, object]], tasks: str, **context: str
) -> Path:
    """A manifest and its scenario in ``folder``; ``context`` lines go under ``context:``."""
    import yaml

    scenario = folder / "scenario.yaml"
    scenario.write_text(yaml.safe_dump({"version": 1, "duration_s": 60, "sources": sources}))
    lines = "".join(f"  {section}: {spec}\n" for section, spec in context.items())
    manifest = folder / "robot.yaml"
    manifest.write_text(
        f"version: 1\nrobot: {{name: live-rover, cpus: 2}}\ndata_dir: {data}\n"
        f"scenario: {scenario}\ntasks:\n{tasks}" + (f"context:\n{lines}" if lines else "")
    )
    return manifest


def task_entry(
    name: str, image: str, source: str, depth: int = 2, overflow: str = "drop_oldest"
) -> str:
    return (
        f"  - name: {name}\n    image: {image}\n    input: {source}\n"
        f"    queue: {{depth: {depth}, overflow: {overflow}}}\n"
    )


def start_run(
    manifest: Path, out: Path, duration_s: float, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ctxrobot",
            "run",
            "--config",
            str(manifest),
            "--out",
            str(out),
            "--duration",
            str(duration_s),
            "--json",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def results(out: Path, task: str) -> list[tuple[int, float, dict[str, object]]]:
    """(sample id, t_sensor, result) of every sample ``task`` processed in a run, in order."""
    import json
    import sqlite3

    if not (out / "run.db").exists():
        return []
    with sqlite3.connect(f"file:{out / 'run.db'}?mode=ro", uri=True) as conn:
        if not conn.execute("select 1 from sqlite_master where name = 'samples'").fetchone():
            return []  # the run is still creating its database
        rows = conn.execute(
            "select sample_id, t_sensor, result_json from samples where task = ? "
            "order by sample_id",
            (task,),
        ).fetchall()
    return [(int(i), float(t), json.loads(r) if r else {}) for i, t, r in rows]
