"""Wire protocol between the host runtime and a task container.

A frame is a 4-byte big-endian header length, a UTF-8 JSON header, then `payload_len` raw
bytes. JSON keeps the header debuggable with `socat`; the raw payload keeps a 640x480
frame or a laser scan free of encoding cost.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_HEADER_LEN = struct.Struct(">I")
# A header is a small JSON object; anything larger means a corrupted stream.
MAX_HEADER_BYTES = 1 << 20

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


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """One frame as bytes."""
    body = json.dumps({**header, "payload_len": len(payload)}, separators=(",", ":")).encode()
    return _HEADER_LEN.pack(len(body)) + body + payload


def send(sock: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
    sock.sendall(encode(header, payload))


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


def recv(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """Read one frame: (header, payload). Raises ConnectionClosed at a clean end."""
    (length,) = _HEADER_LEN.unpack(_recv_exact(sock, 4, at_boundary=True))
    if length > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {length} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(_recv_exact(sock, length, at_boundary=False))
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict) or "type" not in header:
        raise ProtocolError(f"header must be an object with a 'type': {header!r}")
    payload_len = int(header.get("payload_len", 0))
    payload = _recv_exact(sock, payload_len, at_boundary=False) if payload_len else b""
    return header, payload


def sample_from(header: dict[str, Any], payload: bytes) -> Sample:
    return Sample(
        id=int(header["id"]),
        t_sensor=float(header["t_sensor"]),
        kind=str(header["kind"]),
        meta=dict(header.get("meta") or {}),
        payload=payload,
    )
