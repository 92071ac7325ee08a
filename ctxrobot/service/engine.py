"""Whether the Docker engine answers, followed on a thread of its own.

An engine restart kills every task container (unless the engine runs with live-restore)
and, for a while, every Docker API call fails. The runtime must neither die of it nor
blame the tasks: :class:`EngineWatch` holds the engine's event stream open, so it learns
the moment the engine goes away (the stream ends), then asks the engine every
``retry_s`` until it answers again. :attr:`EngineWatch.epoch` counts the losses: a task
started before the latest loss may have died of it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import docker
import docker.errors

from ctxrobot.actuate.docker import DockerBackend, connect
from ctxrobot.model.errors import EngineUnavailableError

__all__ = ["ENGINE_ERRORS", "EngineWatch"]

log = logging.getLogger(__name__)

#: What a Docker API call raises when the engine is gone or going: the SDK's own errors,
#: and the HTTP layer's (requests' errors are OSErrors).
ENGINE_ERRORS: tuple[type[BaseException], ...] = (docker.errors.DockerException, OSError)


class EngineWatch:
    """Follows the engine (see the module doc). Thread-safe readers, one writer thread."""

    def __init__(
        self,
        client_factory: Callable[[], docker.DockerClient] = connect,
        *,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client_factory = client_factory
        self._retry_s = retry_s
        self._clock = clock
        self._up = threading.Event()
        self._up.set()  # the runtime connected before starting the watch
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._stream: Any = None
        self.epoch = 0
        self.down_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    @property
    def available(self) -> bool:
        return self._up.is_set()

    def wait_available(self, timeout_s: float) -> bool:
        """Until the engine answers (True) or ``timeout_s`` passed (False)."""
        return self._up.wait(timeout_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            with contextlib.suppress(*ENGINE_ERRORS):
                stream.close()  # unblocks the thread's read
        if self._thread.is_alive():
            self._thread.join(5.0)

    def _run(self) -> None:
        while not self._halt.is_set():
            try:
                client = self._client_factory()
                client.ping()
                # Only the engine's own events: the stream stays quiet and ends exactly
                # when the engine goes away.
                stream = client.events(decode=True, filters={"type": "daemon"})
            except (*ENGINE_ERRORS, EngineUnavailableError) as err:
                self._lost(err)
                self._halt.wait(self._retry_s)
                continue
            self._answered()
            with self._lock:
                self._stream = stream
            if self._halt.is_set():  # stop() came between the check and the stream
                stream.close()
                return
            # However the stream ends (EOF, a reset, urllib3's protocol error mid-chunk),
            # the engine is gone or going; the next ping says which.
            with contextlib.suppress(Exception):
                for _event in stream:
                    pass
            with self._lock:
                self._stream = None
            client.close()
            if not self._halt.is_set():
                self._lost("its event stream ended")

    def _lost(self, why: object) -> None:
        if not self._up.is_set():
            return
        with self._lock:
            self.epoch += 1
            self.down_since = self._clock()
            self._up.clear()
        log.warning(
            "the Docker engine stopped answering (%s); waiting for it, tasks keep running "
            "where they can",
            why,
        )

    def _answered(self) -> None:
        if self._up.is_set():
            return
        with self._lock:
            since = self.down_since
            self._up.set()
        away = "" if since is None else f" after {self._clock() - since:.1f} s"
        log.warning("the Docker engine answers again%s", away)


def remove_run(backend: DockerBackend, run_id: str, wait_s: float) -> bool:
    """Remove the containers of run ``run_id``, waiting up to ``wait_s`` for an engine that
    does not answer. Returns whether none is left (if not, the run's guard removes them
    when the engine answers again)."""
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            backend.cleanup(run_id)
            return True
        except ENGINE_ERRORS as err:
            if time.monotonic() >= deadline:
                log.error(
                    "cannot remove the containers of run %s: the Docker engine: %s; its guard "
                    "removes them when the engine answers again",
                    run_id,
                    err,
                )
                return False
            if not said:
                log.warning("the Docker engine does not answer (%s); waiting for it", err)
                said = True
            time.sleep(1.0)
