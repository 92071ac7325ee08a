"""A task that breaks the wire protocol is a failed task, never a dead thread or a huge
allocation: a real misbehaving peer on the channel's real Unix socket."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import TaskStateChanged
from ctxrobot.streams.channel import TaskChannel
from ctxtask import protocol
from ctxtask.protocol import Sample


def raw_frame(header: object, payload: bytes = b"") -> bytes:
    """A frame with exactly this header, ``payload_len`` and all (no fixing up)."""
    body = json.dumps(header).encode()
    return struct.pack(">I", len(body)) + body + payload


GOOD_RESULT = {"type": "result", "id": 0, "t_sensor": 1.0, "t_start": 1.0, "t_end": 1.1}

BROKEN = {
    "result without id": (
        raw_frame({k: v for k, v in GOOD_RESULT.items() if k != "id"}),
        "'id'",
    ),
    "negative payload_len": (raw_frame({**GOOD_RESULT, "payload_len": -5}), "payload_len"),
    "payload_len as text": (raw_frame({**GOOD_RESULT, "payload_len": "12"}), "payload_len"),
    "payload_len of 3 GB": (
        raw_frame({**GOOD_RESULT, "payload_len": 3_000_000_000}),
        "exceeds the limit",
    ),
    "id as text": (raw_frame({**GOOD_RESULT, "id": "seven"}), "'id'"),
    "t_end not finite": (raw_frame({**GOOD_RESULT, "t_end": float("nan")}), "finite"),
    "result not an object": (raw_frame({**GOOD_RESULT, "result": [1, 2]}), "'result'"),
    "header not JSON": (struct.pack(">I", 5) + b"oops!", "not JSON"),
    "header not an object": (raw_frame([1, 2, 3]), "string 'type'"),
    "header longer than a frame": (struct.pack(">I", 50_000_000), "exceeds the limit"),
    "unknown message type": (raw_frame({"type": "selfie"}), "'selfie'"),
    "bye with a list summary": (raw_frame({"type": "bye", "summary": [1]}), "'summary'"),
}


class Peer:
    """A task process stand-in that says hello, reads one sample, then sends ``frame``."""

    def __init__(self, path: Path, frame: bytes, hello: dict[str, Any] | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.hello = hello or {"type": "hello", "task": "peer", "pid": 1}
        self.frame = frame
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            protocol.send(self.sock, self.hello)
            protocol.recv(self.sock)  # one sample
            self.sock.sendall(self.frame)
            while self.sock.recv(65536):  # keep the connection until the host ends it
                pass
        except (OSError, protocol.ProtocolError):
            pass  # the host hung up on us: that is what a broken peer gets

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def open_channel(tmp_path: Path) -> tuple[TaskChannel, list[TaskStateChanged]]:
    bus = EventBus()
    states: list[TaskStateChanged] = []
    bus.subscribe("task.state", states.append, name="states", inline=True)
    channel = TaskChannel("peer", tmp_path / "sock", bus)
    channel.listen()
    return channel, states


def scan() -> Sample:
    return Sample(0, time.monotonic(), "scan", payload=np.ones(4, "<f4").tobytes())


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_frame_fails_the_task(tmp_path: Path, case: str) -> None:
    frame, said = BROKEN[case]
    channel, states = open_channel(tmp_path)
    peer = Peer(channel.socket_path, frame)
    rss_before = psutil.Process().memory_info().rss
    try:
        channel.accept(timeout_s=5)
        channel.offer(scan())
        deadline = time.monotonic() + 10
        while channel.error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(channel.error, protocol.ProtocolError), channel.error
        message = str(channel.error)
        assert message.startswith("broke the wire protocol: ") and said in message, message
        assert [s.state for s in states] == ["failed"] and states[0].detail == message
        recv_thread = next(t for t in channel._threads if t.name.endswith(":recv"))
        recv_thread.join(5)
        assert not recv_thread.is_alive(), "the receive thread ended, having said why"
        assert channel.received == 0
        grown_mb = (psutil.Process().memory_info().rss - rss_before) / 2**20
        assert grown_mb < 50, f"the runtime allocated {grown_mb:.0f} MB for a broken frame"
        started = time.monotonic()
        channel.finish(timeout_s=5)
        print(f"\n{case}: {message} (finish took {time.monotonic() - started:.3f} s)")
    finally:
        channel.close()
        peer.close()


def test_a_frame_over_the_tasks_own_limit_fails_it(tmp_path: Path) -> None:
    """The limit is per task: a frame other tasks may send is too long for this one."""
    bus = EventBus()
    channel = TaskChannel("peer", tmp_path / "sock", bus, max_frame_bytes=4096)
    channel.listen()
    big = raw_frame({**GOOD_RESULT, "result": {"text": "x" * 5000}})
    peer = Peer(channel.socket_path, big)
    try:
        channel.accept(timeout_s=5)
        channel.offer(scan())
        deadline = time.monotonic() + 10
        while channel.error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "exceeds the limit of 4096" in str(channel.error)
    finally:
        channel.close()
        peer.close()


@pytest.mark.parametrize(
    "hello",
    [
        {"type": "result", "id": 1},
        {"type": "hello", "task": "peer"},
        {"type": "hello", "task": "peer", "pid": "one"},
    ],
)
def test_a_broken_hello_is_refused(tmp_path: Path, hello: dict[str, Any]) -> None:
    channel, _ = open_channel(tmp_path)
    peer = Peer(channel.socket_path, b"", hello=hello)
    try:
        with pytest.raises(protocol.ProtocolError, match="before its hello"):
            channel.accept(timeout_s=5)
    finally:
        channel.close()
        peer.close()


def test_a_well_formed_result_still_passes(tmp_path: Path) -> None:
    """The checks refuse nothing the real tasks send: a result, then the end."""
    channel, states = open_channel(tmp_path)
    frames = raw_frame({**GOOD_RESULT, "result": {"pose": [0.0, 1.0, 2.0]}})
    peer = Peer(channel.socket_path, frames)
    try:
        channel.accept(timeout_s=5)
        channel.offer(scan())
        assert channel.wait_idle(5)
        assert channel.received == 1 and channel.error is None and not states
    finally:
        channel.close()
        peer.close()
