"""Wire protocol between the host runtime and a task container.

A frame is a 4-byte big-endian header length, a UTF-8 JSON header, then `payload_len` raw
bytes. JSON keeps the header debuggable with `socat`; the raw payload keeps a 640x480
frame or a laser scan free of encoding cost.
"""

from __future__ import annotations

import json
import math
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_HEADER_LEN = struct.Struct(">I")
# A header is a small JSON object; anything larger means a corrupted stream.
MAX_HEADER_BYTES = 1 << 20
#: Largest frame (header + payload) a reader accepts unless told otherwise: a 1080p BGR
#: camera frame fits. The reader allocates a frame's bytes before reading them, so a
#: corrupted or hostile length must be refused before it becomes memory.
MAX_FRAME_BYTES = 64 << 20

SAMPLE_DTYPES: dict[str, np.dtype] = {
    "scan": np.dtype("<f4"),
    "frame": np.dtype("u1"),
    "audio": np.dtype("<i2"),
}


class ProtocolError(RuntimeError):
    """The peer sent something that is not a valid frame."""


class ConnectionClosed(ProtocolError):
    """The peer closed the connection (cleanly, between frames)."""


@dataclass(frozen=True)
class Sample:
    """One sensor sample sent to a task."""

    id: int
    t_sensor: float
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    def array(self) -> np.ndarray:
        """The payload as a numpy array (read-only view, no copy)."""
        dtype = SAMPLE_DTYPES.get(self.kind)
        if dtype is None:
            raise ProtocolError(f"sample kind {self.kind!r} has no array form")
        arr = np.frombuffer(self.payload, dtype=dtype)
        shape = self.meta.get("shape")
        return arr.reshape(shape) if shape else arr

    def header(self) -> dict[str, Any]:
        return {
            "type": "sample",
            "id": self.id,
            "t_sensor": self.t_sensor,
            "kind": self.kind,
            "meta": self.meta,
        }


def send(sock: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
    """Send one frame. The payload (a 921 kB camera frame) goes out from where it is: gathered
    with the header by ``sendmsg``, never copied into one buffer with it."""
    body = json.dumps({**header, "payload_len": len(payload)}, separators=(",", ":")).encode()
    parts = [memoryview(_HEADER_LEN.pack(len(body)) + body)]
    if payload:
        parts.append(memoryview(payload))
    while parts:
        sent = sock.sendmsg(parts)  # may send less than all: go on from where it stopped
        while parts and sent >= len(parts[0]):
            sent -= len(parts.pop(0))
        if parts:
            parts[0] = parts[0][sent:]


def _recv_exact(sock: socket.socket, n: int, *, at_boundary: bool) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            if at_boundary and got == 0:
                raise ConnectionClosed("peer closed the connection")
            raise ProtocolError(f"connection closed mid-frame ({got} of {n} bytes)")
        got += k
    return bytes(buf)


def recv(sock: socket.socket, max_frame: int = MAX_FRAME_BYTES) -> tuple[dict[str, Any], bytes]:
    """Read one frame: (header, payload). Raises ConnectionClosed at a clean end, and
    ProtocolError for anything that is not a frame of at most ``max_frame`` bytes (header
    and payload) whose header is a JSON object with a string ``type`` and, when present, a
    non-negative integer ``payload_len``."""
    (length,) = _HEADER_LEN.unpack(_recv_exact(sock, 4, at_boundary=True))
    limit = min(MAX_HEADER_BYTES, max_frame)
    if length > limit:
        raise ProtocolError(f"header of {length} bytes exceeds the limit of {limit}")
    try:
        header = json.loads(_recv_exact(sock, length, at_boundary=False))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError(f"header must be an object with a string 'type': {_clip(header)}")
    payload_len = header.get("payload_len", 0)
    if type(payload_len) is not int or payload_len < 0:
        raise ProtocolError(f"payload_len must be a non-negative integer, got {_clip(payload_len)}")
    if length + payload_len > max_frame:
        raise ProtocolError(
            f"frame of {length + payload_len} bytes (payload_len {payload_len}) exceeds the "
            f"limit of {max_frame}"
        )
    payload = _recv_exact(sock, payload_len, at_boundary=False) if payload_len else b""
    return header, payload


def _clip(value: object, limit: int = 200) -> str:
    """A peer's value for an error message: short, whatever it sent."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _field(header: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = header.get(name)
    # bool is an int to Python, never a valid id or time on the wire.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(
            f"{header.get('type')} needs {name!r} as {_kind_name(kind)}, got {_clip(value)}"
        )
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _time(header: dict[str, Any], name: str) -> float:
    value = float(_field(header, name, (int, float)))
    if not math.isfinite(value):
        raise ProtocolError(f"{header.get('type')} needs a finite {name!r}, got {value}")
    return value


@dataclass(frozen=True)
class Result:
    """A task's answer to one sample (a validated ``result`` header)."""

    id: int
    t_sensor: float
    t_start: float
    t_end: float
    result: dict[str, Any]


def result_from(header: dict[str, Any]) -> Result:
    """The ``result`` header as a :class:`Result`; ProtocolError names the bad field."""
    body = header.get("result")
    if body is not None and not isinstance(body, dict):
        raise ProtocolError(f"result needs 'result' as an object, got {_clip(body)}")
    return Result(
        id=_field(header, "id", int),
        t_sensor=_time(header, "t_sensor"),
        t_start=_time(header, "t_start"),
        t_end=_time(header, "t_end"),
        result=body or {},
    )


def summary_from(header: dict[str, Any]) -> dict[str, Any]:
    """The ``summary`` of a ``bye`` header ({} when absent)."""
    summary = header.get("summary")
    if summary is not None and not isinstance(summary, dict):
        raise ProtocolError(f"bye needs 'summary' as an object, got {_clip(summary)}")
    return summary or {}


def hello_pid(header: dict[str, Any]) -> int:
    """The task's pid from its ``hello`` header."""
    if header.get("type") != "hello":
        raise ProtocolError(f"expected hello first, got {_clip(header)}")
    return int(_field(header, "pid", int))


def sample_from(header: dict[str, Any], payload: bytes) -> Sample:
    return Sample(
        id=int(header["id"]),
        t_sensor=float(header["t_sensor"]),
        kind=str(header["kind"]),
        meta=dict(header.get("meta") or {}),
        payload=payload,
    )
