"""Drive a Task from the host's Unix socket: the loop inside every task container."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from typing import Any

from ctxtask import protocol
from ctxtask.task import Task

DEFAULT_SOCKET = "/run/ctxrobot/task.sock"


def _connect(path: str, timeout_s: float) -> socket.socket:
    """Connect, retrying briefly: the container may start before the host listens."""
    deadline = time.monotonic() + timeout_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() > deadline:
                raise SystemExit(f"ctxtask: cannot connect to {path}: {exc}") from exc
            time.sleep(0.05)


def run_stream(task: Task, sock: socket.socket) -> dict[str, Any]:
    """Serve samples until the host sends `end` (or closes); return the task's summary."""
    task.initialise()
    while True:
        try:
            header, payload = protocol.recv(sock)
        except protocol.ConnectionClosed:
            return task.terminate()
        kind = header["type"]
        if kind == "sample":
            sample = protocol.sample_from(header, payload)
            t_start = time.monotonic()
            result = task.update(sample)
            t_end = time.monotonic()
            protocol.send(
                sock,
                {
                    "type": "result",
                    "id": sample.id,
                    "t_sensor": sample.t_sensor,
                    "t_start": t_start,
                    "t_end": t_end,
                    "result": result,
                },
            )
        elif kind == "control":
            task.set_rate(header.get("rate_hz"))
        elif kind == "end":
            summary = task.terminate()
            protocol.send(sock, {"type": "bye", "summary": summary})
            return summary
        else:
            raise protocol.ProtocolError(f"unknown message type {kind!r}")


def serve(task: Task, config: dict[str, Any] | None = None) -> None:
    """Entry point of `python -m <task>`: setup, one stream, shutdown.

    The task's manifest `config` arrives as JSON in `CTXROBOT_TASK_CONFIG`.
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    if config is None:
        config = json.loads(os.environ.get("CTXROBOT_TASK_CONFIG", "{}"))
    task.setup(config)
    path = os.environ.get("CTXROBOT_SOCKET", DEFAULT_SOCKET)
    sock = _connect(path, timeout_s=float(os.environ.get("CTXROBOT_CONNECT_TIMEOUT", "30")))
    try:
        protocol.send(sock, {"type": "hello", "task": task.name, "pid": os.getpid()})
        run_stream(task, sock)
    finally:
        sock.close()
        task.shutdown()
