"""The daemon's end of the control API (protocol and roles: `ctxrobot.service.control`).

**Who may do what.** Each request kind needs the role `COMMANDS` gives it. Root and the
daemon's own user are always operators; the read and operator groups decide the rest. Roles
come from the kernel's record of the peer (SO_PEERCRED for uid and primary gid,
SO_PEERGROUPS for the supplementary groups, Linux ≥ 4.13), never from anything the client
says. A reader asking for an operator command gets a refusal naming the group to join; the
connection stays open.

**The socket file** is mode 0660, owned by the read group. A user in neither group is
stopped by the kernel at connect() and never reaches the parser or holds a connection
slot; the price is that operators must be members of the read group too (the server warns
at start about operators who are not, and the client's refusal names the group).

**Abuse limits** (`ControlLimits`): a request line has a size cap (a longer one gets an
error and the connection is closed: its buffer stays bounded, so a 40 MB line costs
nothing); a connection idle too long is closed, and a request that has begun must end
within a few seconds; at most `max_connections` are served at once (more get "busy"); the
listen backlog absorbs bursts. Clients that vanish mid-request are logged at debug level.

One asyncio loop in a thread serves every connection; handlers are plain functions run in a
small thread pool, so a slow one (a task restart) does not hold up `status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import json
import logging
import os
import pwd
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctxrobot.service.control import (
    COMMANDS,
    ControlError,
    Role,
    check_socket_path,
    encode_line,
    group_name,
    user_name,
)

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Any]
#: The Linux value on every architecture a robot runs (asm-generic); Python 3.11 lacks it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: Python caps getsockopt's buffer at 1024 bytes: 256 gids.
_PEERGROUPS_BUFLEN = 1024


@dataclass(frozen=True)
class ControlLimits:
    """Bounds that keep one client from hurting the daemon or the other clients."""

    max_request_bytes: int = 64 * 1024
    # Between requests on one connection (the dashboard polls every 0.25 s).
    idle_timeout_s: float = 60.0
    # From a request's first byte to its newline, and for writing the reply.
    request_timeout_s: float = 5.0
    max_connections: int = 128
    # Waiting connections the kernel holds while the loop is busy (capped by somaxconn).
    backlog: int = 512
    # Handler threads: status calls go on while a restart waits for its task.
    handler_threads: int = 4
    # On close, how long requests already being answered get to finish.
    close_grace_s: float = 2.0


def _resolve_group(group: str, option: str) -> int:
    """A group name or a numeric gid (as chown takes them)."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ControlError(
            f"unknown group {group!r}: create it (groupadd --system {group}) or pass "
            f"another {option}"
        ) from None


@dataclass(frozen=True)
class Peer:
    """The connected process as the kernel knows it."""

    pid: int
    uid: int
    gids: frozenset[int]  # primary and supplementary

    @classmethod
    def of(cls, sock: Any) -> Peer:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _PEERGROUPS_BUFLEN)
            groups: tuple[int, ...] = struct.unpack(f"{len(raw) // 4}I", raw)
        except OSError as err:
            if err.errno != errno.ERANGE:
                raise
            # More groups than Python's getsockopt buffer holds: ask the group database.
            groups = tuple(os.getgrouplist(user_name(uid), gid))
        return cls(pid, uid, frozenset((gid, *groups)))

    def describe(self) -> str:
        return f"uid {self.uid} ({user_name(self.uid)}), pid {self.pid}"


@dataclass(frozen=True)
class Access:
    """Who gets which role: root and `owner_uid` operate; the groups decide the rest."""

    read_gid: int
    operator_gid: int | None
    owner_uid: int

    def role_of(self, peer: Peer) -> Role | None:
        if peer.uid in (0, self.owner_uid):
            return Role.OPERATE
        if self.operator_gid is not None and self.operator_gid in peer.gids:
            return Role.OPERATE
        return Role.READ if self.read_gid in peer.gids else None

    def refusal(self, peer: Peer, cmd: str, needed: Role) -> str:
        who = f"{peer.describe()}"
        if needed is Role.READ:
            return (
                f"permission denied: {who} is not in group {group_name(self.read_gid)!r}; "
                f"add it: usermod -aG {group_name(self.read_gid)} {user_name(peer.uid)}"
            )
        if self.operator_gid is None:
            return (
                f"{cmd!r} needs the operator role, and this daemon has no operator group: "
                "run as root, or restart the daemon with an operator group"
            )
        group = group_name(self.operator_gid)
        return (
            f"{cmd!r} needs the operator role: {who} is not in group {group!r}; "
            f"add it (usermod -aG {group} {user_name(peer.uid)}, then log in again) "
            "or run as root"
        )


class ControlServer:
    """Serves `handlers[cmd]` on a Unix socket under the roles of `COMMANDS`.

    `read_group`, `operator_group`: group names or numeric gids. The socket belongs to the
    read group (default: the daemon's own group); without an operator group only root and
    the daemon's user may act. Raises ControlError for an unknown group or a handler whose
    command has no role in `COMMANDS`.
    """

    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        *,
        read_group: str | None = None,
        operator_group: str | None = None,
        limits: ControlLimits = ControlLimits(),
    ) -> None:
        unlisted = sorted(set(handlers) - set(COMMANDS))
        if unlisted:
            raise ValueError(f"commands without a role in COMMANDS: {', '.join(unlisted)}")
        self.path = path
        self.handlers = dict(handlers)
        self.limits = limits
        self.access = Access(
            read_gid=_resolve_group(read_group, "--read-group") if read_group else os.getgid(),
            operator_gid=(
                _resolve_group(operator_group, "--operator-group") if operator_group else None
            ),
            owner_uid=os.getuid(),
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._inode: int | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._answering = 0  # requests read whose reply is not written yet

    # -- start and stop ------------------------------------------------------------------
    def start(self) -> None:
        """Bind the socket and serve in a background thread. ControlError when the path is
        unusable or another daemon serves it."""
        sock = self._bind()
        self._executor = ThreadPoolExecutor(self.limits.handler_threads, "control-handler")
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._open(sock))
            except BaseException as err:  # handed to start()'s caller
                failure.append(err)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="control", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        log.info(
            "control API on %s (mode 0660, read group %s, operator group %s)",
            self.path,
            group_name(self.access.read_gid),
            "-" if self.access.operator_gid is None else group_name(self.access.operator_gid),
        )
        self._warn_operators_outside_read_group()

    def _bind(self) -> socket.socket:
        check_socket_path(self.path)
        self._prepare_folder()
        self._remove_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Create the socket with no access at all, then open it to the group: there is no
        # moment where another user could connect.
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(self.path))
            os.chown(self.path, -1, self.access.read_gid)
            os.chmod(self.path, 0o660)
        except OSError as err:
            sock.close()
            raise ControlError(
                f"cannot create the control socket {self.path}: {err.strerror}; run as root "
                "or choose a --socket in a folder you own"
            ) from None
        finally:
            os.umask(old_umask)
        self._inode = self.path.stat().st_ino
        return sock

    def _prepare_folder(self) -> None:
        """Create the socket's folder (e.g. /run/ctxrobot) but never a chain of them: a
        mistyped --socket must not make folders all over the filesystem."""
        folder = self.path.parent
        if folder.is_dir():
            return
        if not folder.parent.is_dir():
            raise ControlError(
                f"cannot create the control socket {self.path}: folder {folder.parent} does "
                "not exist; create it or choose another --socket"
            )
        try:
            folder.mkdir(mode=0o755)
        except OSError as err:
            raise ControlError(
                f"cannot create folder {folder} for the control socket: {err.strerror}; run as "
                "root or choose another --socket"
            ) from None

    def _remove_stale_socket(self) -> None:
        """Remove a socket a dead daemon left; refuse to take a live daemon's socket or to
        delete anything that is not a socket."""
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ControlError(
                f"{self.path} exists and is not a socket: remove it or choose another --socket"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(str(self.path))
            pid = Peer.of(probe).pid
            raise ControlError(
                f"another daemon (pid {pid}) already serves {self.path}: stop it first or "
                "choose another --socket"
            )
        except (ConnectionRefusedError, FileNotFoundError):
            self.path.unlink(missing_ok=True)  # nobody listens: a dead daemon's leftover
        except (BlockingIOError, TimeoutError):
            raise ControlError(
                f"a live process holds {self.path} but does not accept connections: stop it "
                "or choose another --socket"
            ) from None
        finally:
            probe.close()

    async def _open(self, sock: socket.socket) -> None:
        # asyncio listens again with its own backlog argument, so it is passed here too.
        self._server = await asyncio.start_unix_server(
            self._connection,
            sock=sock,
            limit=self.limits.max_request_bytes,
            backlog=self.limits.backlog,
        )

    def _warn_operators_outside_read_group(self) -> None:
        """Operators connect through the read group's socket: say who cannot."""
        if self.access.operator_gid is None or self.access.operator_gid == self.access.read_gid:
            return
        try:
            operators = grp.getgrgid(self.access.operator_gid).gr_mem
            readers = set(grp.getgrgid(self.access.read_gid).gr_mem)
        except KeyError:
            return  # numeric gids without a group entry: nothing to compare
        outside = [
            name
            for name in operators
            if name not in readers and pwd.getpwnam(name).pw_gid != self.access.read_gid
        ]
        if outside:
            group = group_name(self.access.read_gid)
            log.warning(
                "operator(s) %s cannot connect: the socket belongs to read group %s; add them: "
                "usermod -aG %s NAME",
                ", ".join(outside),
                group,
                group,
            )

    def close(self) -> None:
        """Stop accepting, let replies being written finish (briefly), drop the rest."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError, TimeoutError):  # the loop is already gone
            asyncio.run_coroutine_threadsafe(self._shut(), loop).result(
                self.limits.close_grace_s + 5.0
            )
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5.0)
        self._loop = self._thread = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        # Only our own socket: a daemon started meanwhile may have replaced it.
        with contextlib.suppress(FileNotFoundError):
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()

    async def _shut(self) -> None:
        assert self._server is not None
        self._server.close()
        deadline = time.monotonic() + self.limits.close_grace_s
        while self._answering and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    # -- one connection ------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._converse(reader, writer)
        except (OSError, asyncio.IncompleteReadError) as err:
            # A client that vanished or stalled is its own problem, not the daemon's.
            log.debug("control client gone: %s", err)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer.of(writer.get_extra_info("socket"))
        if len(self._connections) > self.limits.max_connections:
            log.warning(
                "control: %d connections open; refused %s",
                len(self._connections) - 1,
                peer.describe(),
            )
            busy = "busy: too many control connections open; try again in a moment"
            await self._reply(writer, {"ok": False, "error": busy})
            return
        if self.access.role_of(peer) is None:
            log.warning("refused control connection from %s", peer.describe())
            await self._reply(
                writer, {"ok": False, "error": self.access.refusal(peer, "", Role.READ)}
            )
            return
        while True:
            raw = await self._read_request(reader, writer)
            if raw is None:
                return
            self._answering += 1
            try:
                await self._reply(writer, await self._answer(raw, peer))
            finally:
                self._answering -= 1

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes | None:
        """The next request line, or None when the connection is to end."""
        try:
            first = await asyncio.wait_for(reader.read(1), self.limits.idle_timeout_s)
        except TimeoutError:
            log.debug("control connection idle for %.0f s; closed", self.limits.idle_timeout_s)
            return None
        if first in (b"", b"\n"):
            return None if not first else b""
        try:
            rest = await asyncio.wait_for(reader.readuntil(b"\n"), self.limits.request_timeout_s)
        except asyncio.LimitOverrunError:
            error = f"request longer than {self.limits.max_request_bytes} bytes; refused"
        except TimeoutError:
            error = f"request not finished within {self.limits.request_timeout_s:g} s"
        else:
            return first + rest
        log.warning("control: %s; connection closed", error)
        await self._reply(writer, {"ok": False, "error": error})
        return None

    async def _answer(self, raw: bytes, peer: Peer) -> dict[str, Any]:
        try:
            request = json.loads(raw)
        except ValueError:
            return {"ok": False, "error": "a request is one JSON object per line"}
        if not isinstance(request, dict):
            return {"ok": False, "error": 'a request is a JSON object with a "cmd"'}
        cmd = request.get("cmd")
        handler = self.handlers.get(cmd) if isinstance(cmd, str) else None
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return {"ok": False, "error": f"unknown command {cmd!r}; known: {known}"}
        needed = COMMANDS[cmd].role
        if (self.access.role_of(peer) or 0) < needed:
            log.warning("control: refused %r from %s", cmd, peer.describe())
            return {"ok": False, "error": self.access.refusal(peer, cmd, needed)}
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, handler, request)
            return {"ok": True, "result": result}
        except (ControlError, ValueError) as err:
            return {"ok": False, "error": str(err)}
        except KeyError as err:  # e.g. an unknown task name; str() would add quotes
            return {"ok": False, "error": str(err.args[0]) if err.args else "not found"}
        except Exception as err:  # a bug in a handler must not kill the daemon
            log.exception("control request %r failed", raw[:200])
            return {"ok": False, "error": f"internal error: {err}"}

    async def _reply(self, writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        try:
            data = encode_line(reply)
        except (TypeError, ValueError) as err:  # a handler returned something not JSON-able
            log.error("control reply not JSON-serialisable: %s", err)
            data = encode_line({"ok": False, "error": f"internal error: {err}"})
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self.limits.request_timeout_s)
