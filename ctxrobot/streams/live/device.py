"""The life of a live device source: open, read until a fault, report it, back off, reopen.

A robot's devices come and go: a USB camera is unplugged, a lidar is still spinning up, a
microphone is held by another program. None of that may stop the run. A
:class:`DeviceSource` turns every such fault into one log line and a
:class:`~ctxrobot.model.events.SourceStateChanged` on the bus (topic ``source.state``), and
reopens the device with exponential back-off while the other sources and tasks carry on.

States: ``open`` (reading), ``failed`` (a fault, with its reason), ``reopening`` (waiting to
retry), ``closed`` (stopped, or a finite input such as a video file ended).
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import SourceStateChanged
from ctxrobot.streams.source import Emit, Fired
from ctxtask.protocol import Sample

log = logging.getLogger(__name__)

__all__ = ["Backoff", "DeviceError", "DeviceSource", "EndOfStream", "SourceStats"]

STOP_TIMEOUT_S = 5.0


class DeviceError(Exception):
    """A fault the source recovers from by reopening: the message says what is wrong and
    how to fix it, in one line (it is what the log and the dashboard show)."""


class EndOfStream(Exception):
    """A finite input (a video file, a recording) ended: the source closes for good."""


@dataclass
class Backoff:
    """Exponential back-off between reopen attempts: ``initial_s``, doubling, capped."""

    initial_s: float = 0.5
    max_s: float = 10.0
    _next_s: float = field(default=0.0, init=False)

    def next(self) -> float:
        delay = self._next_s or self.initial_s
        self._next_s = min(delay * 2.0, self.max_s)
        return delay

    def reset(self) -> None:
        self._next_s = 0.0


@dataclass
class SourceStats:
    """Counters of one source, for the run summary and the dashboard."""

    state: str = "closed"
    detail: str = ""
    samples: int = 0
    faults: int = 0
    dropped_device: int = 0  # lost before they reached the host (gaps in the device's stream)
    dropped_host: int = 0  # captured, but replaced by a newer one before it could be sent

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class DeviceSource(abc.ABC):
    """A live source read on its own thread (implements
    :class:`~ctxrobot.streams.source.LiveSource`).

    Subclasses implement :meth:`_open` (raise :class:`DeviceError` with a one-line reason),
    :meth:`_read` (deliver samples with :meth:`_fire` until :meth:`_halted`; raise
    :class:`DeviceError` on a fault) and :meth:`_close` (release everything; called after
    every open, whatever happened). Blocking reads must time out (≤ 0.5 s) so ``stop`` is
    prompt.
    """

    def __init__(self, name: str, backoff: Backoff | None = None) -> None:
        self.name = name
        self.stats = SourceStats()
        self._backoff = backoff or Backoff()
        self._bus: EventBus | None = None
        self._emit: Emit | None = None
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_id = 0
        self._t0 = 0.0  # the run's time zero (monotonic), set by start

    # -- lifecycle (the runtime's side) ------------------------------------------------------
    def attach(self, bus: EventBus) -> None:
        """Publish state changes on ``bus``; the runtime calls it before :meth:`start`."""
        self._bus = bus

    def start(self, emit: Emit, t0: float | None = None) -> None:
        if self._thread is not None:
            raise RuntimeError(f"source {self.name!r} was already started")
        self._emit = emit
        self._t0 = time.monotonic() if t0 is None else t0
        self._thread = threading.Thread(target=self._run, name=f"source:{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("source %s: its thread did not stop within %.0f s", self.name, 5.0)

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait until the source has closed for good; True when it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # -- for subclasses ----------------------------------------------------------------------
    @abc.abstractmethod
    def _open(self) -> str:
        """Open the device; return what was granted, e.g. ``640x480 @ 30 fps``."""

    @abc.abstractmethod
    def _read(self) -> None:
        """Read and :meth:`_fire` until :meth:`_halted`; raise on a fault or the end."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the device (idempotent; also after a failed open)."""

    def _halted(self) -> bool:
        return self._halt.is_set()

    def _wait(self, seconds: float) -> bool:
        """Sleep unless stopped first; True when stopped."""
        return self._halt.wait(seconds)

    def _fire(self, events: Sequence[tuple[str, object]], sample: Sample) -> None:
        """Deliver one reading; ``sample.id`` is replaced by the source's next id."""
        assert self._emit is not None
        sample_id = self._next_id
        self._next_id += 1
        self.stats.samples += 1
        self._emit(self.name, Fired(tuple(events), _with_id(sample, sample_id)))

    # -- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        failing: str | None = None  # the reason already logged, until the device works again
        ended = ""
        try:
            while not self._halted():
                delivered = self.stats.samples
                try:
                    reason = self._attempt()
                except EndOfStream as end:
                    ended = str(end)
                    log.info("source %s: %s", self.name, end)
                    return
                if self.stats.samples > delivered:
                    # The device worked: a new fault starts a fresh back-off and log line.
                    self._backoff.reset()
                    failing = None
                if reason is None or self._halted():
                    return
                self.stats.faults += 1
                if failing is None:
                    log.warning("source %s: %s; reopening with back-off", self.name, reason)
                elif reason != failing:  # the same outage, a new reason: worth a quieter line
                    log.info("source %s: still failing: %s", self.name, reason)
                failing = reason
                self._set_state("failed", reason)
                delay = self._backoff.next()
                self._set_state("reopening", f"next attempt in {delay:.1f} s")
                if self._wait(delay):
                    return
        finally:
            self._set_state("closed", ended)

    def _attempt(self) -> str | None:
        """Open and read once; the fault's reason, or None when stopped."""
        try:
            granted = self._open()
            self._set_state("open", granted)
            self._read()
            return None
        except DeviceError as exc:
            return str(exc)
        except EndOfStream:
            raise
        except Exception as exc:  # a driver bug must not take the run down either
            log.debug("source %s: unexpected error", self.name, exc_info=True)
            return f"unexpected {type(exc).__name__}: {exc}"
        finally:
            self._close()

    def _set_state(self, state: str, detail: str = "") -> None:
        if state == "open":
            if self.stats.faults:
                log.info("source %s: open again (%s)", self.name, detail)
            else:
                log.info("source %s: open (%s)", self.name, detail)
        self.stats.state = state
        self.stats.detail = detail
        if self._bus is not None:
            self._bus.publish(
                "source.state", SourceStateChanged(time.monotonic(), self.name, state, detail)
            )


def _with_id(sample: Sample, sample_id: int) -> Sample:
    return Sample(sample_id, sample.t_sensor, sample.kind, sample.meta, sample.payload)
