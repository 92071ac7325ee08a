"""The control API against real Unix sockets: roles, abuse, bursts, and bad peers.

No Docker: the server serves small handlers, and the peers that misbehave are real
processes or sockets. Other users are real too (`setpriv` to uid 65534 with chosen groups),
so the kernel's credentials decide the roles exactly as on a robot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from ctxrobot.service.control import COMMANDS, ControlClient, ControlError
from ctxrobot.service.control_server import ControlLimits, ControlServer
from tests.conftest import REPO, require_checkout_open_to_others

NOBODY = 65534
READ_GID, OPERATOR_GID, OTHER_GID = 47001, 47002, 47003  # no group entries needed

STATUS = {
    "daemon": {"pid": 1, "policy": "ctx", "uptime_s": 3.0},
    "tasks": {
        "slam": {
            "state": "running",
            "critical": True,
            "cpu": {"allocated": 0.5, "used": 0.1, "weight": 300, "frozen": False},
            "latency_ms": {"p50": 3.1, "p95": 4.0, "p99": 5.2},
            "recent_latency_ms": [3.0, 3.2],
            "samples": 10,
            "deadline_misses": 0,
            "dropped": 0,
            "recent": [{"id": 9, "latency_ms": 3.2, "result": {"pose": [0, 0, 0]}}],
        }
    },
    "context": {"signals": {"moving": True}, "active_rules": ["r1"], "fired": []},
    "actuation_ms": {"p50": 0.05, "p99": 0.2, "last": 0.04, "count": 12},
}


@pytest.fixture
def folder() -> Iterator[Path]:
    """A socket folder every user may traverse (pytest's tmp_path is closed to others)."""
    path = Path(tempfile.mkdtemp(prefix="ctl-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Served:
    """A running ControlServer with handlers that record what they were asked."""

    def __init__(self, folder: Path, **kwargs: Any) -> None:
        self.path = folder / "ctl.sock"
        self.calls: list[dict[str, Any]] = []
        self.release = threading.Event()
        handlers = {
            "status": lambda _r: STATUS,
            "context": self._slow,
            "override": self._record,
            "task": self._task,
            "shutdown": self._record,
        }
        self.server = ControlServer(self.path, handlers, **kwargs)
        self.server.start()

    def _record(self, request: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(request)
        return {"done": request["cmd"]}

    def _slow(self, _request: dict[str, Any]) -> dict[str, Any]:
        self.release.wait(10)
        return {"signals": {}}

    def _task(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("name") == "crash":
            raise RuntimeError("handler bug")
        raise KeyError(f"no task {request.get('name')!r}; tasks: slam")


@pytest.fixture
def served(folder: Path) -> Iterator[Served]:
    s = Served(folder, limits=ControlLimits(idle_timeout_s=1.0, request_timeout_s=1.0))
    yield s
    s.release.set()
    s.server.close()


def raw_exchange(path: Path, data: bytes, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Send bytes as they are; every reply line until the server closes or goes quiet."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := sock.recv(65536):
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


# -- the protocol ---------------------------------------------------------------------------
def test_requests_replies_and_the_socket_file(served: Served) -> None:
    st = served.path.stat()
    assert oct(st.st_mode & 0o777) == "0o660"
    assert st.st_gid == os.getgid()  # no read group given: the daemon's own
    with ControlClient(served.path) as client:
        assert client.call("status") == STATUS
        assert client.call("override", signals={"moving": True}) == {"done": "override"}
    assert served.calls == [{"cmd": "override", "signals": {"moving": True}}]


def test_bad_requests_get_an_error_and_the_connection_stays(served: Served) -> None:
    lines = b'not json\n[1,2]\n{"cmd": 5}\n{"cmd": "nope"}\n\n{"cmd": "status"}\n'
    replies = raw_exchange(served.path, lines)
    errors = [r.get("error", "") for r in replies[:-1]]
    assert "one JSON object per line" in errors[0]
    assert 'JSON object with a "cmd"' in errors[1]
    assert "unknown command 5" in errors[2]
    assert "unknown command 'nope'; known: context, override, shutdown, status, task" in errors[3]
    assert "one JSON object per line" in errors[4]  # the empty line
    assert replies[-1] == {"ok": True, "result": STATUS}


def test_handler_errors_are_messages(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    with ControlClient(served.path) as client:
        with pytest.raises(ControlError, match=r"^no task 'x'; tasks: slam$"):
            client.call("task", name="x")
        with pytest.raises(ControlError, match="internal error: handler bug"):
            client.call("task", name="crash")
        assert client.call("status") == STATUS  # the daemon is fine
    assert any("handler bug" in r.getMessage() or r.exc_info for r in caplog.records)


def test_every_command_has_a_role() -> None:
    with pytest.raises(ValueError, match="without a role in COMMANDS: frobnicate"):
        ControlServer(Path("/tmp/unused.sock"), {"frobnicate": lambda _r: None})
    assert {c for c, spec in COMMANDS.items() if spec.role.name == "READ"} == {
        "status",
        "ps",
        "context",
    }


# -- abuse ----------------------------------------------------------------------------------
def test_an_oversized_request_is_refused_and_others_are_served(served: Served) -> None:
    replies = raw_exchange(served.path, b'{"cmd": "status", "pad": "' + b"x" * 200_000)
    assert replies == [{"ok": False, "error": "request longer than 65536 bytes; refused"}]
    with ControlClient(served.path) as client:
        assert client.call("status") == STATUS


def test_a_stalled_request_is_cut_off(served: Served) -> None:
    """A request that started must end within request_timeout_s (1 s here)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(served.path))
        sock.sendall(b'{"cmd": "sta')
        reply = json.loads(sock.recv(65536))
        assert reply == {"ok": False, "error": "request not finished within 1 s"}
        assert sock.recv(1) == b""  # and closed


def test_idle_connections_close_and_the_client_reconnects(served: Served) -> None:
    with ControlClient(served.path) as client:
        assert client.call("status") == STATUS
        time.sleep(1.5)  # idle_timeout_s is 1 s: the server closes this connection
        assert client.call("status") == STATUS


def test_clients_that_vanish_leave_no_traceback(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ctxrobot.service.control_server")
    for data in (b"", b'{"cmd": "st', b'{"cmd": "status"}\n' * 200):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(served.path))
            sock.sendall(data)  # and gone without reading
    # One that leaves while its (slow) request is being answered.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(served.path))
        sock.sendall(b'{"cmd": "context"}\n')
        time.sleep(0.2)
    served.release.set()
    time.sleep(0.5)
    with ControlClient(served.path) as client:
        assert client.call("status") == STATUS
    loud = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert loud == [], [r.getMessage() for r in loud]


def burst(path: Path, clients: int) -> list[float]:
    """`clients` parallel status calls, each on its own connection; their latencies (s)."""
    start = threading.Barrier(clients)
    latencies: list[float] = []
    failures: list[str] = []

    def one() -> None:
        start.wait()
        t0 = time.perf_counter()
        try:
            with ControlClient(path, timeout_s=30) as client:
                client.call("status")
            latencies.append(time.perf_counter() - t0)
        except ControlError as err:
            failures.append(str(err))

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    return latencies


@pytest.mark.parametrize("backlog", [512, 1])
def test_a_burst_of_50_status_calls_is_all_answered(folder: Path, backlog: int) -> None:
    """Backlog 1 makes most connects fail with EAGAIN: the client waits its turn."""
    served = Served(folder, limits=ControlLimits(backlog=backlog))
    try:
        latencies = burst(served.path, 50)
    finally:
        served.server.close()
    assert len(latencies) == 50
    q = statistics.quantiles(latencies, n=100)
    print(f"\nburst of 50, backlog {backlog}: p50 {q[49] * 1e3:.1f} ms, p99 {q[98] * 1e3:.1f} ms")


def test_too_many_connections_get_busy(folder: Path) -> None:
    served = Served(folder, limits=ControlLimits(max_connections=3))
    held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    try:
        for sock in held:
            sock.connect(str(served.path))
        time.sleep(0.2)
        with pytest.raises(ControlError, match="busy: too many control connections"):
            ControlClient(served.path).call("status")
        held.pop().close()
        time.sleep(0.2)
        with ControlClient(served.path) as client:
            assert client.call("status") == STATUS
    finally:
        for sock in held:
            sock.close()
        served.server.close()


SERVER_SCRIPT = """
import sys
from pathlib import Path
from ctxrobot.service.control_server import ControlServer
server = ControlServer(Path(sys.argv[1]), {"status": lambda _r: {"daemon": {}, "tasks": {}}})
server.start()
print("ready", flush=True)
sys.stdin.read()
server.close()
"""


def test_40_mb_requests_do_not_grow_the_daemon(folder: Path) -> None:
    """20 clients at once, each sending a 40 MB line with no newline (the issue's attack)."""
    path = folder / "ctl.sock"
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        server = psutil.Process(proc.pid)
        with ControlClient(path) as client:
            client.call("status")
        before = server.memory_info().rss
        peak = before
        garbage = b"x" * (40 * 1024 * 1024)

        def flood() -> None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(30)
                sock.connect(str(path))
                # Refused after the first 64 kB: the point.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(garbage)

        threads = [threading.Thread(target=flood) for _ in range(20)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, server.memory_info().rss)
            time.sleep(0.01)
        time.sleep(0.5)
        after = server.memory_info().rss
        with ControlClient(path) as client:
            assert client.call("status") == {"daemon": {}, "tasks": {}}
    finally:
        proc.communicate("", timeout=30)
    mib = 1024 * 1024
    rss = f"{before / mib:.1f} before, {peak / mib:.1f} peak, {after / mib:.1f} after"
    print(f"\nserver RSS MiB around 20 x 40 MB requests: {rss}")
    assert peak - before < 32 * mib
    assert after - before < 16 * mib


def test_close_lets_a_reply_in_flight_finish(folder: Path) -> None:
    """`shutdown` makes the daemon close the server; the caller still gets its answer."""
    path = folder / "ctl.sock"
    box: list[ControlServer] = []

    def shutdown(_request: dict[str, Any]) -> dict[str, Any]:
        threading.Thread(target=box[0].close).start()  # as the daemon's main loop does
        time.sleep(0.3)
        return {"stopping": True}

    box.append(ControlServer(path, {"shutdown": shutdown}))
    box[0].start()
    with ControlClient(path) as client:
        assert client.call("shutdown") == {"stopping": True}
    time.sleep(0.5)
    assert not path.exists()


# -- roles ----------------------------------------------------------------------------------
CLIENT_SCRIPT = """
import json, sys
from pathlib import Path
from ctxrobot.service.control import ControlClient, ControlError
out = []
client = ControlClient(Path(sys.argv[1]))
for cmd in sys.argv[2:]:
    try:
        out.append({"result": client.call(cmd)})
    except ControlError as err:
        out.append({"error": str(err)})
print(json.dumps(out))
"""


def as_user(path: Path, groups: list[int], *cmds: str) -> list[dict[str, Any]]:
    """Run `cmds` over one connection as uid 65534 with exactly `groups`."""
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    require_checkout_open_to_others()
    group_args = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    user = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", *group_args]
    proc = subprocess.run(
        [*user, sys.executable, "-c", CLIENT_SCRIPT, str(path), *cmds],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def roles(folder: Path) -> Iterator[Served]:
    s = Served(folder, read_group=str(READ_GID), operator_group=str(OPERATOR_GID))
    yield s
    s.server.close()


def test_a_reader_may_look_but_not_act(roles: Served) -> None:
    assert roles.path.stat().st_gid == READ_GID
    out = as_user(roles.path, [READ_GID], "status", "shutdown", "override", "status")
    assert out[0] == {"result": STATUS}
    assert out[1]["error"].startswith(
        "'shutdown' needs the operator role: uid 65534 (nobody), pid "
    )
    assert "is not in group '47002'" in out[1]["error"]
    assert "'override' needs the operator role" in out[2]["error"]
    assert out[3] == {"result": STATUS}  # refused, not disconnected
    assert roles.calls == []


def test_an_operator_may_act(roles: Served) -> None:
    out = as_user(roles.path, [READ_GID, OPERATOR_GID], "status", "shutdown")
    assert out == [{"result": STATUS}, {"result": {"done": "shutdown"}}]
    assert roles.calls == [{"cmd": "shutdown"}]


def test_others_are_stopped_by_the_kernel(roles: Served) -> None:
    for groups in ([], [OTHER_GID], [OPERATOR_GID]):  # operators need the read group too
        (out,) = as_user(roles.path, groups, "status")
        assert out["error"].startswith(f"permission denied on {roles.path}: join group '47001'")


def test_others_are_refused_even_if_the_socket_is_opened_by_hand(roles: Served) -> None:
    roles.path.chmod(0o666)
    (out,) = as_user(roles.path, [OTHER_GID], "status")
    assert out["error"].startswith("permission denied: uid 65534 (nobody), pid ")
    assert "is not in group '47001'" in out["error"]


def test_without_an_operator_group_only_root_acts(folder: Path) -> None:
    served = Served(folder, read_group=str(READ_GID))
    try:
        out = as_user(served.path, [READ_GID], "shutdown")
        assert "this daemon has no operator group" in out[0]["error"]
        with ControlClient(served.path) as client:  # root
            assert client.call("shutdown") == {"done": "shutdown"}
    finally:
        served.server.close()


# -- the client against peers that are not a daemon -----------------------------------------
Peer = Callable[[socket.socket], None]


@pytest.fixture
def fake_daemon(folder: Path) -> Iterator[Callable[[Peer], Path]]:
    """A listening socket whose every connection `behave` handles."""
    listeners: list[socket.socket] = []

    def serve(behave: Peer) -> Path:
        path = folder / f"fake{len(listeners)}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(8)
        listeners.append(listener)

        def loop() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    conn.makefile("rb").readline()
                    behave(conn)

        threading.Thread(target=loop, daemon=True).start()
        return path

    yield serve
    for listener in listeners:
        listener.close()


def send(data: bytes) -> Peer:
    return lambda conn: conn.sendall(data)


@pytest.mark.parametrize(
    ("cmd", "behave", "message"),
    [
        ("status", send(b"garbage\n"), "sent something that is not JSON ('garbage')"),
        ("status", send(b"[1,2]\n"), 'sent a reply of the wrong shape (want {"ok": …}, got list)'),
        ("status", send(b'{"ok": false}\n'), "sent a reply of the wrong shape"),
        (
            "status",
            send(b'{"ok": true, "result": {"daemon": {}, "tasks": [1]}}\n'),
            "sent a 'status' reply of the wrong shape (tasks: Input should be a valid dictionary)",
        ),
        (
            "status",
            send(b'{"ok": true, "result": {"tasks": {}}}\n'),
            "sent a 'status' reply of the wrong shape (daemon: Field required)",
        ),
        (
            "status",
            send(b'{"ok": true, "result": {"daemon": {}, "tasks": {"a": {"cpu": "x"}}}}\n'),
            "(tasks.a.cpu: Input should be a valid dictionary)",
        ),
        (
            "ps",
            send(b'{"ok": true, "result": [{"task": "slam"}]}\n'),
            "sent a 'ps' reply of the wrong shape (0.name: Field required)",
        ),
        ("status", send(b""), "closed the connection without answering 'status'"),
        ("status", send(b'{"ok": true'), "sent an unterminated or oversized reply"),
        ("status", lambda conn: time.sleep(3), "no answer to 'status' from"),
    ],
    ids=[
        "garbage",
        "list",
        "no-error",
        "tasks-list",
        "no-daemon",
        "cpu-str",
        "ps",
        "nothing",
        "unterminated",
        "silent",
    ],
)
def test_a_bad_peer_is_one_clear_error(
    fake_daemon: Callable[[Peer], Path], cmd: str, behave: Peer, message: str
) -> None:
    path = fake_daemon(behave)
    with pytest.raises(ControlError) as caught, ControlClient(path, timeout_s=1.0) as client:
        client.call(cmd)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text


def test_client_errors_name_the_fix(folder: Path) -> None:
    stale = folder / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(stale))  # bound, never listening: what a killed daemon leaves
    long_path = folder / ("x" * 120)
    cases = {
        folder / "missing.sock": f"no control socket at {folder / 'missing.sock'}: is the "
        "daemon running? start it with `ctxrobot daemon --socket",
        stale: f"nothing listens on {stale} (a stale socket): is the daemon running?",
        long_path: f"socket path {long_path} is {len(str(long_path))} bytes; a Unix socket "
        "path has at most 107: choose a shorter --socket",
    }
    for path, message in cases.items():
        with pytest.raises(ControlError) as caught:
            ControlClient(path).call("status")
        assert str(caught.value).startswith(message)


# -- the server's start ---------------------------------------------------------------------
def test_server_start_refuses_bad_sockets(folder: Path) -> None:
    def start(path: Path, **kwargs: Any) -> str:
        with pytest.raises(ControlError) as caught:
            ControlServer(path, {}, **kwargs).start()
        return str(caught.value)

    assert "folder /nonexistent-ctxrobot does not exist" in start(
        Path("/nonexistent-ctxrobot/deeper/ctl.sock")
    )
    assert "a Unix socket path has at most 107" in start(folder / ("y" * 120))
    regular = folder / "file"
    regular.write_text("keep me")
    assert "exists and is not a socket" in start(regular)
    assert regular.read_text() == "keep me"
    unknown = start(folder / "a.sock", read_group="no-such-group-ctx")
    assert unknown.startswith("unknown group 'no-such-group-ctx': create it (groupadd --system")
    live = Served(folder)
    try:
        assert f"another daemon (pid {os.getpid()}) already serves" in start(live.path)
        with ControlClient(live.path) as client:  # and the live one still serves
            assert client.call("status") == STATUS
    finally:
        live.server.close()


def test_server_makes_one_missing_folder_and_replaces_a_stale_socket(folder: Path) -> None:
    path = folder / "run" / "ctl.sock"  # like /run/ctxrobot on a machine without systemd
    first = ControlServer(path, {"status": lambda _r: STATUS})
    first.start()
    assert oct(path.parent.stat().st_mode & 0o777) == "0o755"
    first.close()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))  # a socket nobody listens on: a killed daemon's
    second = ControlServer(path, {"status": lambda _r: STATUS})
    second.start()
    try:
        with ControlClient(path) as client:
            assert client.call("status") == STATUS
    finally:
        second.close()


def test_a_long_running_command_waits_longer(folder: Path) -> None:
    """`task` restarts wait for the task's hello: the client waits COMMANDS' wait_s."""
    path = folder / "ctl.sock"

    def task(_request: dict[str, Any]) -> dict[str, Any]:
        time.sleep(1.5)
        return {"restarted": True}

    server = ControlServer(path, {"task": task})
    server.start()
    try:
        with ControlClient(path, timeout_s=0.5) as client:
            assert client.call("task", action="restart", name="slam") == {"restarted": True}
    finally:
        server.close()
    assert (COMMANDS["task"].wait_s or 0) >= 180  # the runtime's connect timeout
