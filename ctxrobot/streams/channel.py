"""The host end of a task's Unix socket: a bounded sample queue and its dispatch gates.

Samples reach a task one at a time (one in flight): a task that falls behind then shows up
as queueing latency and, at its queue's bound, as dropped samples or back-pressure, instead
of as an unbounded socket buffer nobody can see. Every queue is bounded by its ``depth``:

- ``drop_oldest``: a new sample evicts the oldest queued one (counted as dropped);
- ``block``: the source waits until there is room (back-pressure). A replayed source then
  falls behind its schedule; a live device drops at the device (counted by the source).

A sample that goes out is not always processed: the context may make it useless, and it is
then *shed*, counted apart from drops. The scheduler decides (``set_dispatch``): the task's
rate limit ("rate": samples between two slots) and, for tasks whose manifest says
``stale: skip``, a sample already past its deadline ("stale"). Under the stock scheduler
(``cfs``, no intervention) every sample goes out.

Whether the next sample may go out is decided by small gate objects with three verbs,
in the manner of rclpy's executors: `can_execute(now)`, `beginning_execution(sample, now)`
and `ending_execution(result, now)`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import SampleDropped, TaskResult, TaskStateChanged
from ctxtask import protocol
from ctxtask.protocol import Sample

log = logging.getLogger(__name__)

Overflow = Literal["drop_oldest", "block"]

#: Largest frame a task may send (header and payload): results and the end-of-stream
#: summary are small JSON objects. A longer frame is a broken task, not memory to allocate.
DEFAULT_MAX_FRAME_BYTES = 1 << 20


def _bind_anywhere(server: socket.socket, path: Path) -> None:
    """Bind a Unix socket at `path` however deep its folder is.

    A socket address holds at most 107 bytes, and a run folder under a long checkout path
    exceeds it. Binding through the folder's descriptor (`/proc/self/fd/N/name`) keeps the
    address short; the kernel resolves it to the same folder.
    """
    folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        server.bind(f"/proc/self/fd/{folder}/{path.name}")
    finally:
        os.close(folder)


class DispatchGate(Protocol):
    """Decides whether the next sample may be sent to the task now."""

    def can_execute(self, now: float) -> bool: ...
    def beginning_execution(self, sample: Sample, now: float) -> None: ...
    def ending_execution(self, result: TaskResult, now: float) -> None: ...


class InFlightGate:
    """At most `limit` samples in the task at once (1: the task sees the freshest data)."""

    def __init__(self, limit: int = 1) -> None:
        self.limit = limit
        self.in_flight = 0

    def can_execute(self, now: float) -> bool:
        return self.in_flight < self.limit

    def beginning_execution(self, sample: Sample, now: float) -> None:
        self.in_flight += 1

    def ending_execution(self, result: TaskResult, now: float) -> None:
        self.in_flight = max(0, self.in_flight - 1)


class RateGate:
    """At most `rate_hz` samples per second; None means no limit.

    The context sets the rate (e.g. sign detection at 1 Hz while the robot stands
    still); samples arriving between slots are skipped as useless work.
    """

    def __init__(self, rate_hz: float | None = None) -> None:
        self.rate_hz = rate_hz
        self._last_start = -float("inf")

    def can_execute(self, now: float) -> bool:
        return self.rate_hz is None or now - self._last_start >= 1.0 / self.rate_hz

    def beginning_execution(self, sample: Sample, now: float) -> None:
        self._last_start = now

    def ending_execution(self, result: TaskResult, now: float) -> None:
        pass


@dataclass(frozen=True, slots=True)
class _Control:
    """A rate change for the task, sent by the send loop between samples."""

    rate_hz: float | None


class TaskChannel:
    """One task's socket, queue and reader/writer threads."""

    def __init__(
        self,
        task: str,
        socket_dir: Path,
        bus: EventBus,
        *,
        queue_depth: int = 4,
        overflow: Overflow = "drop_oldest",
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_frame_bytes``: the longest frame accepted from the task; a longer one fails
        the task. Until :meth:`set_dispatch` says otherwise every sample goes out."""
        self.task = task
        self.socket_dir = socket_dir
        self.socket_path = socket_dir / "task.sock"
        self._bus = bus
        self._overflow = overflow
        self._clock = clock
        self._queue: collections.deque[Sample] = collections.deque()
        self._depth = queue_depth
        self._stale_after_s: float | None = None
        self._max_frame = max_frame_bytes
        self._cond = threading.Condition()
        self.in_flight = InFlightGate(1)
        self.rate = RateGate(None)
        self._gates: tuple[DispatchGate, ...] = (self.in_flight, self.rate)
        self._control_pending = False  # a rate change the task has not been told yet
        self._server: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._closing = False
        self._ended = threading.Event()
        self._hello = threading.Event()
        self.summary: dict[str, object] = {}
        self.pid: int | None = None
        self.received = 0
        self.dropped = 0
        self.shed = 0
        self.error: BaseException | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------
    def listen(self, uid: int | None = None) -> None:
        """Create the socket the task's container will connect to.

        The container runs as an unprivileged user, so the socket folder is handed to
        that uid (or made world-traversable when no uid is known).
        """
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _bind_anywhere(server, self.socket_path)
        server.listen(1)
        if uid is not None:
            os.chown(self.socket_dir, uid, -1)
            os.chown(self.socket_path, uid, -1)
            os.chmod(self.socket_dir, 0o750)
            os.chmod(self.socket_path, 0o660)
        else:
            os.chmod(self.socket_dir, 0o755)
            os.chmod(self.socket_path, 0o666)
        self._server = server

    def accept(self, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> None:
        """Wait for the task to connect and say hello (it may be loading a model first)."""
        assert self._server is not None, "listen() first"
        deadline = self._clock() + timeout_s
        self._server.settimeout(0.2)
        while True:
            try:
                conn, _ = self._server.accept()
                break
            except TimeoutError:
                if not alive():
                    raise RuntimeError(f"task {self.task!r} exited before connecting") from None
                if self._clock() > deadline:
                    raise TimeoutError(
                        f"task {self.task!r} did not connect to {self.socket_path} within "
                        f"{timeout_s:.0f} s; check its logs with `docker logs`"
                    ) from None
        conn.settimeout(max(1.0, deadline - self._clock()))
        try:
            header, _ = protocol.recv(conn, self._max_frame)
            self.pid = protocol.hello_pid(header)
        except (OSError, protocol.ProtocolError) as exc:
            conn.close()
            raise protocol.ProtocolError(
                f"task {self.task!r} broke the wire protocol before its hello: {exc}"
            ) from exc
        conn.settimeout(None)
        self._conn = conn
        self._hello.set()
        for target, name in ((self._send_loop, "send"), (self._recv_loop, "recv")):
            thread = threading.Thread(target=target, name=f"{self.task}:{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    # -- hot path --------------------------------------------------------------------------
    def offer(self, sample: Sample) -> None:
        """Queue a sample for the task (called by source threads). With ``block`` this
        waits while the queue is full (back-pressure); otherwise it never blocks."""
        dropped = None
        with self._cond:
            if self._overflow == "block":
                self._cond.wait_for(lambda: self._closing or len(self._queue) < self._depth)
            if self._closing:
                return
            if len(self._queue) >= self._depth:
                dropped = self._queue.popleft()
                self.dropped += 1
            self._queue.append(sample)
            self._cond.notify_all()
        if dropped is not None:
            self._publish_unprocessed([(dropped, "queue_full")])

    def set_dispatch(self, rate_hz: float | None, stale_after_s: float | None) -> None:
        """What the scheduler lets out: at most ``rate_hz`` samples a second (None: as fast
        as they come), none older than ``stale_after_s`` (None: however late).

        The host gates samples at once; the task is told its rate through the send loop,
        the socket's only writer (two writers would interleave a frame's bytes), so the
        scheduler's thread never waits on socket I/O.
        """
        with self._cond:
            self._stale_after_s = stale_after_s
            if rate_hz == self.rate.rate_hz:
                return
            self.rate.rate_hz = rate_hz
            self._control_pending = True
            self._cond.notify_all()

    def _publish_unprocessed(self, samples: list[tuple[Sample, str]]) -> None:
        """Tell the bus about dropped and shed samples. Never called with the channel lock
        held: a bus delivery must not wait on this channel."""
        now = self._clock()
        for sample, reason in samples:
            self._bus.publish(
                "task.dropped", SampleDropped(self.task, sample.id, now, reason, sample.t_sensor)
            )

    def _shed_reason(self, sample: Sample, now: float) -> str | None:
        """Why ``sample`` is useless now (it is then shed), or None to send it."""
        if not self.rate.can_execute(now):
            return "rate"
        if self._stale_after_s is not None and now - sample.t_sensor > self._stale_after_s:
            return "stale"
        return None

    def _next_item(self) -> Sample | _Control | None:
        """Block until a control message or a sample may go out (None: end of stream);
        shed samples the context makes useless rather than send them."""
        while True:
            shed: list[tuple[Sample, str]] = []
            with self._cond:
                if self._control_pending:
                    self._control_pending = False
                    return _Control(self.rate.rate_hz)
                if self._closing and not self._queue:
                    return None
                now = self._clock()
                if self._queue and self.in_flight.can_execute(now):
                    sample = self._queue.popleft()
                    self._cond.notify_all()  # a blocked source may offer again
                    reason = self._shed_reason(sample, now)
                    if reason is None:
                        for gate in self._gates:
                            gate.beginning_execution(sample, now)
                        return sample
                    shed.append((sample, reason))
                    self.shed += 1
                else:
                    self._cond.wait()
            self._publish_unprocessed(shed)

    def _send_loop(self) -> None:
        assert self._conn is not None
        try:
            while (item := self._next_item()) is not None:
                if isinstance(item, _Control):
                    protocol.send(self._conn, {"type": "control", "rate_hz": item.rate_hz})
                    continue
                protocol.send(self._conn, item.header(), item.payload)
            protocol.send(self._conn, {"type": "end"})
        except OSError as exc:
            self._fail(exc)

    def _recv_loop(self) -> None:
        assert self._conn is not None
        try:
            while True:
                header, _ = protocol.recv(self._conn, self._max_frame)
                if header["type"] == "result":
                    self._on_result(protocol.result_from(header))
                elif header["type"] == "bye":
                    self.summary = protocol.summary_from(header)
                    self._ended.set()
                    return
                else:
                    raise protocol.ProtocolError(f"unexpected message type {header['type']!r}")
        except (protocol.ConnectionClosed, OSError) as exc:  # the task died, or hung up
            self._fail(exc)
        except protocol.ProtocolError as exc:
            self._fail(protocol.ProtocolError(f"broke the wire protocol: {exc}"))
        except Exception as exc:  # a bug here must fail the task, not silently end the thread
            log.exception("task %s: receive loop failed", self.task)
            self._fail(exc)

    def _on_result(self, answer: protocol.Result) -> None:
        now = self._clock()
        result = TaskResult(
            task=self.task,
            sample_id=answer.id,
            t_sensor=answer.t_sensor,
            t_start=answer.t_start,
            t_end=answer.t_end,
            result=answer.result,
        )
        with self._cond:
            self.received += 1
            for gate in self._gates:
                gate.ending_execution(result, now)
            self._cond.notify_all()
        self._bus.publish("task.result", result)

    def _fail(self, exc: BaseException) -> None:
        """The task died or spoke nonsense: say so once on the bus, wake everyone."""
        with self._cond:
            if self.error is not None or self._ended.is_set():
                return
            self.error = exc
            self._closing = True
            self._queue.clear()
            self._cond.notify_all()
        self._ended.set()
        log.error("task %s failed: %s", self.task, exc)
        self._bus.publish(
            "task.state", TaskStateChanged(self._clock(), self.task, "failed", str(exc))
        )
        # The task may still be alive and writing: stop reading it. The send loop wakes on
        # the closed queue and ends too.
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)

    # -- shutdown --------------------------------------------------------------------------
    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every queued sample has been processed (used by no-drop runs)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: (
                    self.error is not None or (not self._queue and not self.in_flight.in_flight)
                ),
                timeout_s,
            )

    def finish(self, timeout_s: float) -> dict[str, object]:
        """Send `end` after what is queued, wait for the task's summary, close the socket."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._hello.is_set():
            self._ended.wait(timeout_s)
        self.close()
        return self.summary

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._queue.clear()
            self._cond.notify_all()
        for sock in (self._conn, self._server):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self.socket_path.unlink(missing_ok=True)
