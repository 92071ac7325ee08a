"""The daemon's control API: JSON lines over a Unix socket.

Access control is the kernel's: the socket is mode 0660 and owned by a configurable group,
so only root, the daemon's user and that group's members can connect at all. The server
also checks the peer's credentials (SO_PEERCRED) and refuses anyone else, in case the
socket's folder or mode was loosened by hand.

One request per line, one response per line: `{"cmd": "status"}` →
`{"ok": true, "result": {...}}` or `{"ok": false, "error": "..."}`.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import pwd
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/run/ctxrobot/ctl.sock")
Handler = Callable[[dict[str, Any]], Any]


class ControlError(RuntimeError):
    """A request failed; the message goes back to the client."""


def default_socket() -> Path:
    return Path(os.environ.get("CTXROBOT_CONTROL_SOCKET", str(DEFAULT_SOCKET)))


def _peer_ids(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the connected process, from the kernel."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


class ControlServer:
    """Serves requests from `handlers[cmd]` on a Unix socket, one thread per client."""

    def __init__(self, path: Path, handlers: dict[str, Handler], group: str | None = None) -> None:
        self.path = path
        self.handlers = handlers
        self.gid = grp.getgrnam(group).gr_gid if group else os.getgid()
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = False

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Create the socket with no access at all, then open it to the group: there is no
        # moment where another user could connect.
        old_umask = os.umask(0o177)
        try:
            server.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chown(self.path, -1, self.gid)
        os.chmod(self.path, 0o660)
        server.listen(8)
        self._server = server
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()
        log.info("control API on %s (mode 0660, group gid %d)", self.path, self.gid)

    def _allowed(self, uid: int, gid: int) -> bool:
        if uid in (0, os.getuid()) or gid == self.gid:
            return True
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            return False
        return name in grp.getgrgid(self.gid).gr_mem

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._closing:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            pid, uid, gid = _peer_ids(conn)
            if not self._allowed(uid, gid):
                log.warning("refused control connection from pid %d uid %d", pid, uid)
                with contextlib.suppress(OSError):
                    conn.sendall(_line({"ok": False, "error": "permission denied"}))
                return
            reader = conn.makefile("rb")
            for raw in reader:
                conn.sendall(_line(self._handle(raw)))

    def _handle(self, raw: bytes) -> dict[str, Any]:
        try:
            request = json.loads(raw)
            if not isinstance(request, dict):
                raise ControlError("a request is a JSON object with a 'cmd'")
            cmd = request.get("cmd")
            handler = self.handlers.get(str(cmd))
            if handler is None:
                known = ", ".join(sorted(self.handlers))
                raise ControlError(f"unknown command {cmd!r}; known: {known}")
            return {"ok": True, "result": handler(request)}
        except (ControlError, ValueError, KeyError) as err:
            return {"ok": False, "error": str(err)}
        except Exception as err:  # a bug in a handler must not kill the daemon
            log.exception("control request %r failed", raw[:200])
            return {"ok": False, "error": f"internal error: {err}"}

    def close(self) -> None:
        self._closing = True
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
        self.path.unlink(missing_ok=True)


def _line(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class ControlClient:
    """Client side: `ControlClient(path).call("status")`."""

    def __init__(self, path: Path | None = None, timeout_s: float = 5.0) -> None:
        self.path = path or default_socket()
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._reader: Any = None

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(str(self.path))
        except FileNotFoundError:
            sock.close()
            raise ControlError(
                f"no daemon socket at {self.path}: start one with `ctxrobot daemon` "
                "(or set CTXROBOT_CONTROL_SOCKET)"
            ) from None
        except PermissionError:
            sock.close()
            raise ControlError(
                f"permission denied on {self.path}: run as root or as a member of the "
                "daemon's control group (`ctxrobot daemon --group`)"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise ControlError(f"nothing listens on {self.path}: is the daemon running?") from None
        self._sock = sock
        self._reader = sock.makefile("rb")

    def call(self, cmd: str, **params: Any) -> Any:
        if self._sock is None:
            self._connect()
        assert self._sock is not None
        self._sock.sendall(_line({"cmd": cmd, **params}))
        raw = self._reader.readline()
        if not raw:
            raise ControlError("the daemon closed the connection")
        reply = json.loads(raw)
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "request failed"))
        return reply.get("result")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
