"""The daemon's control API: the protocol, its roles, and the client.

JSON lines over a Unix socket. One request per line, one reply per line: `{"cmd":
"status"}` → `{"ok": true, "result": {...}}` or `{"ok": false, "error": "..."}`. A
connection may carry many requests (the dashboard polls over one).

`COMMANDS` is the one table of request kinds: each declares the role it needs. Readers may
look (status, ps, context); operators may also act (override, reload, task
start/stop/restart, shutdown). The server (`ctxrobot.service.control_server`) enforces the
roles from the kernel's record of the peer; the client checks each reply's shape, so a
peer that is not a ctxrobot daemon (garbage, `[1,2]`, a wrong-shaped status, silence) gives
one clear ControlError instead of a traceback.
"""

from __future__ import annotations

import contextlib
import enum
import grp
import json
import os
import pwd
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Required

from pydantic import TypeAdapter, ValidationError

# pydantic reads TypedDicts only from typing_extensions before Python 3.12.
from typing_extensions import TypedDict

from ctxrobot.model.errors import UserError

DEFAULT_SOCKET = Path("/run/ctxrobot/ctl.sock")

#: sun_path is 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
#: A status document is tens of kB; anything near this is not a ctxrobot daemon talking.
MAX_REPLY_BYTES = 32 * 1024 * 1024


class ControlError(UserError):
    """A control request or the control socket failed; the message says why and what to do.

    Raised by handlers (the message goes back to the client), by the client (one line for
    the user), and by the server's start (bad --socket, unknown group)."""


class Role(enum.IntEnum):
    """What a peer may do; a higher role includes the lower."""

    READ = 1
    OPERATE = 2


class _CpuStatus(TypedDict, total=False):
    allocated: float | None
    used: float | None
    weight: float | None
    frozen: bool | None


class _RecentResult(TypedDict, total=False):
    latency_ms: float | None


class _TaskStatus(TypedDict, total=False):
    critical: bool | None
    rate_hz: float | None
    cpu: _CpuStatus | None
    latency_ms: dict[str, float | None] | None
    recent_latency_ms: list[float | None] | None
    samples: int | None
    deadline_misses: int | None
    dropped: int | None
    recent: list[_RecentResult] | None


class _ContextStatus(TypedDict, total=False):
    signals: dict[str, Any] | None
    active_rules: list[str] | None
    fired: list[Any] | None


class _StatusDocument(TypedDict, total=False):
    """What `dash` and `ctl status` rely on in the status document (extra keys are fine)."""

    daemon: Required[dict[str, Any]]
    tasks: Required[dict[str, _TaskStatus]]
    context: _ContextStatus | None
    actuation_ms: dict[str, float | int | None] | None


class _PsRow(TypedDict):
    task: str
    name: str
    run: str
    state: str
    weight: int | None
    share_cap: float | None
    frozen: bool | None


@dataclass(frozen=True)
class Command:
    """One request kind: the role it needs, the reply shape a client checks (None: any
    JSON), and how long a client waits for the reply (None: the client's own timeout)."""

    role: Role
    reply: TypeAdapter[Any] | None = None
    wait_s: float | None = None


#: Every request kind the daemon serves. A handler without an entry here is refused at start.
COMMANDS: Mapping[str, Command] = {
    "status": Command(Role.READ, TypeAdapter(_StatusDocument)),
    "ps": Command(Role.READ, TypeAdapter(list[_PsRow])),
    "context": Command(Role.READ),
    "override": Command(Role.OPERATE),
    "reload": Command(Role.OPERATE, wait_s=30.0),
    # start/restart wait for the task's hello, which may take the runtime's connect timeout.
    "task": Command(Role.OPERATE, wait_s=240.0),
    "shutdown": Command(Role.OPERATE),
}


def default_socket() -> Path:
    return Path(os.environ.get("CTXROBOT_CONTROL_SOCKET", str(DEFAULT_SOCKET)))


def check_socket_path(path: Path) -> None:
    """A Unix socket path longer than sun_path cannot be bound or connected to."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise ControlError(
            f"socket path {path} is {size} bytes; a Unix socket path has at most "
            f"{MAX_SOCKET_PATH_BYTES}: choose a shorter --socket (default {DEFAULT_SOCKET})"
        )


def encode_line(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# -- client ---------------------------------------------------------------------------------
class ControlClient:
    """Client side: `ControlClient(path).call("status")`. Every failure is a ControlError
    whose one-line message names the problem and the fix."""

    def __init__(self, path: Path | None = None, timeout_s: float = 5.0) -> None:
        self.path = path or default_socket()
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._reader: Any = None

    def _connect(self) -> None:
        check_socket_path(self.path)
        deadline = time.monotonic() + self.timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(str(self.path))
                break
            except BlockingIOError:
                # The listen backlog is full (a burst of clients): wait our turn.
                sock.close()
                if time.monotonic() >= deadline:
                    raise ControlError(
                        f"the daemon at {self.path} accepted no connection within "
                        f"{self.timeout_s:g} s: it is overloaded or hung (see its log)"
                    ) from None
                time.sleep(0.02)
            except OSError as err:
                sock.close()
                raise ControlError(self._connect_problem(err)) from None
        self._sock = sock
        self._reader = sock.makefile("rb")

    def _connect_problem(self, err: OSError) -> str:
        start = (
            f"start it with `ctxrobot daemon --socket {self.path}` or `systemctl start ctxrobot`"
        )
        if isinstance(err, FileNotFoundError):
            return f"no control socket at {self.path}: is the daemon running? {start}"
        if isinstance(err, ConnectionRefusedError):
            return (
                f"nothing listens on {self.path} (a stale socket): is the daemon running? {start}"
            )
        if isinstance(err, PermissionError):
            user = user_name(os.getuid())
            try:
                group = group_name(self.path.stat().st_gid)
            except OSError:
                return (
                    f"permission denied on {self.path}: its folder is closed to {user}; "
                    "run as root or ask for access to it"
                )
            return (
                f"permission denied on {self.path}: join group {group!r} that may use the "
                f"control socket (usermod -aG {group} {user}, then log in again) or run as root"
            )
        return f"cannot connect to {self.path}: {err.strerror or err}"

    def call(self, cmd: str, **params: Any) -> Any:
        """Send one request and return its result; ControlError for any failure."""
        command = COMMANDS.get(cmd)
        request = encode_line({"cmd": cmd, **params})
        if self._sock is not None:
            # A kept connection (the dashboard's) may have been closed by the daemon as idle;
            # a request whose write fails there was never read, so it is safe to send anew.
            try:
                self._sock.sendall(request)
            except OSError:
                self.close()
        if self._sock is None:
            self._connect()
            self._send(request)
        try:
            return self._receive(cmd, command)
        except ControlError:
            self.close()  # the stream is out of step with our requests now
            raise

    def _send(self, request: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(request)
        except TimeoutError:
            self.close()
            raise ControlError(
                f"the daemon at {self.path} took no request within {self.timeout_s:g} s: it is "
                "overloaded or hung (see its log)"
            ) from None
        except OSError:
            # It closed on us, maybe with a reason (busy, refused): read that.
            pass

    def _receive(self, cmd: str, command: Command | None) -> Any:
        assert self._sock is not None
        wait_s = max(self.timeout_s, (command.wait_s or 0.0) if command else 0.0)
        self._sock.settimeout(wait_s)
        peer = f"the peer at {self.path}"
        try:
            raw = self._reader.readline(MAX_REPLY_BYTES + 1)
        except TimeoutError:
            raise ControlError(
                f"no answer to {cmd!r} from {self.path} within {wait_s:g} s: the daemon is "
                "busy or hung (see its log)"
            ) from None
        except OSError as err:
            raise ControlError(
                f"{peer} dropped the connection ({err.strerror}) before answering {cmd!r}: "
                "see the daemon's log"
            ) from None
        finally:
            with contextlib.suppress(OSError):
                self._sock.settimeout(self.timeout_s)
        if not raw:
            raise ControlError(
                f"{peer} closed the connection without answering {cmd!r}: is it a ctxrobot "
                "daemon's control socket? (see the daemon's log)"
            )
        if len(raw) > MAX_REPLY_BYTES or not raw.endswith(b"\n"):
            raise ControlError(
                f"{peer} sent an unterminated or oversized reply to {cmd!r}: is it a ctxrobot "
                "daemon's control socket?"
            )
        return self._result(raw, cmd, command, peer)

    def _result(self, raw: bytes, cmd: str, command: Command | None, peer: str) -> Any:
        try:
            reply = json.loads(raw)
        except ValueError:
            excerpt = raw[:40].decode(errors="replace").strip()
            raise ControlError(
                f"{peer} sent something that is not JSON ({excerpt!r}): is it a ctxrobot "
                "daemon's control socket?"
            ) from None
        ok = reply.get("ok") if isinstance(reply, dict) else None
        if not isinstance(ok, bool) or (not ok and not isinstance(reply.get("error"), str)):
            raise ControlError(
                f'{peer} sent a reply of the wrong shape (want {{"ok": …}}, got '
                f"{type(reply).__name__}): is it a ctxrobot daemon of this version?"
            )
        if not ok:
            raise ControlError(reply["error"])
        result = reply.get("result")
        if command is not None and command.reply is not None:
            try:
                command.reply.validate_python(result)
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "the document"
                raise ControlError(
                    f"{peer} sent a {cmd!r} reply of the wrong shape ({where}: {first['msg']}): "
                    "is the daemon the same ctxrobot version as this command?"
                ) from None
        return result

    def close(self) -> None:
        if self._sock is not None:
            self._reader.close()
            self._sock.close()
            self._sock = None
            self._reader = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
