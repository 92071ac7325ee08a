"""TaskChannel against a real task served by ctxtask.runner over a real Unix socket."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import SampleDropped, TaskResult
from ctxrobot.streams.channel import RateGate, TaskChannel
from ctxtask import protocol, runner
from ctxtask.protocol import Sample
from ctxtask.task import Task


class SumTask(Task):
    """Sums a float32 scan; sleeps `delay_s` per sample to emulate work."""

    name = "sum"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.rates: list[float | None] = []
        self.seen = 0

    def update(self, sample: Sample) -> dict[str, Any]:
        time.sleep(self.delay_s)
        self.seen += 1
        return {"sum": float(sample.array().sum())}

    def set_rate(self, rate_hz: float | None) -> None:
        self.rates.append(rate_hz)

    def terminate(self) -> dict[str, Any]:
        return {"seen": self.seen}


def start(tmp_path: Path, task: Task, **kwargs: Any) -> tuple[TaskChannel, EventBus, list[Any]]:
    bus = EventBus()
    events: list[Any] = []
    bus.subscribe("task.result", events.append, name="results", inline=True)
    bus.subscribe("task.dropped", events.append, name="drops", inline=True)
    channel = TaskChannel("sum", tmp_path / "sock", bus, **kwargs)
    channel.listen()

    def serve() -> None:
        # Like a task container: hello, one stream, and the socket closes however it ends.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(channel.socket_path))
            protocol.send(sock, {"type": "hello", "task": "sum", "pid": 1})
            with contextlib.suppress(RuntimeError):
                runner.run_stream(task, sock)

    threading.Thread(target=serve, daemon=True).start()
    channel.accept(timeout_s=5)
    return channel, bus, events


def scan(i: int) -> Sample:
    payload = np.full(4, i, dtype="<f4").tobytes()
    return Sample(id=i, t_sensor=time.monotonic(), kind="scan", payload=payload)


def test_every_sample_processed_in_block_mode(tmp_path: Path) -> None:
    task = SumTask(delay_s=0.002)
    channel, _, events = start(tmp_path, task, overflow="block")
    for i in range(50):
        channel.offer(scan(i))
    assert channel.wait_idle(10)
    summary = channel.finish(5)
    results = [e for e in events if isinstance(e, TaskResult)]
    assert [r.sample_id for r in results] == list(range(50))
    assert results[7].result == {"sum": 28.0}
    assert all(r.t_sensor <= r.t_start <= r.t_end for r in results)
    assert summary == {"seen": 50}


def test_overflow_drops_oldest_and_counts(tmp_path: Path) -> None:
    task = SumTask(delay_s=0.05)
    channel, _, events = start(tmp_path, task, queue_depth=2, overflow="drop_oldest")
    for i in range(10):
        channel.offer(scan(i))
    assert channel.wait_idle(10)
    channel.finish(5)
    done = [e.sample_id for e in events if isinstance(e, TaskResult)]
    dropped = [e.sample_id for e in events if isinstance(e, SampleDropped)]
    assert sorted(done + dropped) == list(range(10))
    assert dropped and channel.dropped == len(dropped)
    assert done[-1] == 9, "the newest sample is always kept"


def test_rate_gate_skips_and_tells_the_task(tmp_path: Path) -> None:
    task = SumTask()
    channel, _, events = start(tmp_path, task, queue_depth=8)
    channel.set_dispatch(5.0, None)
    for i in range(20):
        channel.offer(scan(i))
        time.sleep(0.01)
    assert channel.wait_idle(5)
    channel.finish(5)
    done = [e for e in events if isinstance(e, TaskResult)]
    # 20 samples over ~0.2 s at 5 Hz: the first, plus at most ~2 more slots.
    assert 1 <= len(done) <= 4
    unprocessed = [e for e in events if isinstance(e, SampleDropped)]
    assert all(e.reason == "rate" and e.shed for e in unprocessed)
    assert len(done) + channel.shed == 20 and channel.dropped == 0, "shed, not dropped"
    # Skipped, not held: what is processed was fresh when it went out.
    assert max(r.t_start - r.t_sensor for r in done) < 0.1
    assert task.rates == [5.0]


def test_rate_gate_wait() -> None:
    gate = RateGate(2.0)
    assert gate.can_execute(10.0)
    gate.beginning_execution(scan(0), 10.0)
    assert not gate.can_execute(10.2)
    assert gate.can_execute(10.5)


def test_task_crash_is_reported(tmp_path: Path) -> None:
    class Crashing(SumTask):
        def update(self, sample: Sample) -> dict[str, Any]:
            raise RuntimeError("boom")

    states: list[Any] = []
    channel, bus, _ = start(tmp_path, Crashing())
    bus.subscribe("task.state", states.append, name="states", inline=True)
    channel.offer(scan(0))
    deadline = time.monotonic() + 5
    while channel.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert channel.error is not None
    assert states and states[0].state == "failed"
    channel.close()


def test_rate_changes_during_large_frames_never_corrupt_the_stream(tmp_path: Path) -> None:
    """Regression: the scheduler's thread once wrote control messages on the socket while
    the send loop was half-way through a 900 kB frame, and the task read garbage."""
    frame = np.zeros((480, 640, 3), np.uint8).tobytes()
    task = SumTask()
    channel, _, events = start(tmp_path, task, queue_depth=64, overflow="block")
    stop = threading.Event()

    def flip_rates() -> None:
        rates = [None, 50.0, None, 40.0]
        i = 0
        while not stop.is_set():
            channel.set_dispatch(rates[i % 4], None)
            i += 1

    flipper = threading.Thread(target=flip_rates)
    flipper.start()
    try:
        for i in range(40):
            channel.offer(
                Sample(
                    id=i,
                    t_sensor=time.monotonic(),
                    kind="frame",
                    meta={"shape": [480, 640, 3]},
                    payload=frame,
                )
            )
        assert channel.wait_idle(30)
    finally:
        stop.set()
        flipper.join()
    channel.finish(5)
    assert channel.error is None
    results = [e for e in events if isinstance(e, TaskResult)]
    assert len(results) + channel.shed == 40 and channel.dropped == 0
    assert all(r.result == {"sum": 0.0} for r in results), "every frame arrived whole"
    assert task.rates, "the task was told about rate changes"


def test_block_is_back_pressure_with_a_bound(tmp_path: Path) -> None:
    """A full `block` queue holds the source back: nothing is dropped, and the queue never
    holds more than its depth (the source waits instead)."""
    task = SumTask(delay_s=0.02)
    channel, _, events = start(tmp_path, task, queue_depth=3, overflow="block")
    waits: list[float] = []
    for i in range(12):
        before = time.monotonic()
        channel.offer(scan(i))
        waits.append(time.monotonic() - before)
        assert len(channel._queue) <= 3
    assert channel.wait_idle(10)
    channel.finish(5)
    assert [e.sample_id for e in events if isinstance(e, TaskResult)] == list(range(12))
    assert channel.dropped == channel.shed == 0
    assert sum(waits) > 0.05, "the source waited for room"


def test_stale_samples_are_shed_when_the_task_skips_them(tmp_path: Path) -> None:
    task = SumTask(delay_s=0.05)
    channel, _, events = start(tmp_path, task, queue_depth=8)
    channel.set_dispatch(None, 0.03)
    for i in range(6):  # all at once: the later ones wait > 30 ms behind the first
        channel.offer(scan(i))
    assert channel.wait_idle(10)
    channel.finish(5)
    done = [e.sample_id for e in events if isinstance(e, TaskResult)]
    stale = [e for e in events if isinstance(e, SampleDropped)]
    assert done[0] == 0 and stale and all(e.reason == "stale" and e.shed for e in stale)
    assert sorted(done + [e.sample_id for e in stale]) == list(range(6))
    assert all(e.t_sensor is not None for e in stale)


def test_listens_in_a_folder_deeper_than_a_socket_address(tmp_path: Path) -> None:
    # A checkout under a long path puts run folders beyond sun_path's 108 bytes.
    folder = tmp_path / ("deep-" * 30) / "sockets" / "sum"
    channel = TaskChannel("sum", folder, EventBus())
    channel.listen()
    assert len(str(channel.socket_path)) > 108
    assert channel.socket_path.is_socket()
    # The container connects at a short path of its own; here the folder's descriptor does.
    parent = os.open(folder, os.O_PATH | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(f"/proc/self/fd/{parent}/{channel.socket_path.name}")
    finally:
        os.close(parent)


def test_a_frame_larger_than_the_socket_buffer_arrives_whole() -> None:
    # sendmsg gathers header and payload; a small send buffer makes it send in many parts.
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = np.random.default_rng(7).integers(0, 256, 921_600, dtype=np.uint8).tobytes()
    received: list[tuple[dict[str, Any], bytes]] = []
    reader = threading.Thread(target=lambda: received.append(protocol.recv(right)))
    reader.start()
    with left, right:
        protocol.send(left, {"type": "sample", "id": 3}, payload)
        protocol.send(left, {"type": "stop"})
        reader.join(10)
        header, body = received[0]
        assert header == {"type": "sample", "id": 3, "payload_len": len(payload)}
        assert body == payload
        assert protocol.recv(right) == ({"type": "stop", "payload_len": 0}, b"")
