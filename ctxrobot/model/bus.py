"""The event bus: typed events on named topics, over reactivex Subjects.

Two kinds of subscriber, two delivery policies (stated here because the scheduler's
latency depends on it):

- **inline** (`subscribe(..., inline=True)`): runs in the publisher's thread. The bus does
  not serialise publishers: a publisher never waits for another one's deliveries, so
  inline subscribers must be thread-safe and only hand the event on (the decision
  thread's inbox, the observer pipeline's queue). Each of those keeps one order of its
  own; two publishers racing have no order between them to keep.
- **queued** (`subscribe(..., inline=False)`): each subscriber has its own thread and a
  bounded queue (`maxlen`, default 4096). When a slow consumer falls behind, the *oldest*
  events are dropped and counted in `bus.dropped[name]`; memory stays bounded and
  publishers never wait.

A subscriber that raises is logged and counted in `bus.errors[name]`; it stays subscribed,
and neither the bus nor the other subscribers notice.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

from reactivex.abc import DisposableBase
from reactivex.disposable import Disposable
from reactivex.subject import Subject

from ctxrobot.model.events import TOPICS

log = logging.getLogger(__name__)


class EventBus:
    """Named, typed topics; thread-safe publishing; isolated subscribers."""

    def __init__(self, topics: dict[str, type] | None = None) -> None:
        self._types = dict(TOPICS if topics is None else topics)
        self._subjects: dict[str, Subject[Any]] = {name: Subject() for name in self._types}
        # Guards the counters only: publishers run at once, and `+=` on a Counter is a read
        # and a write.
        self._count_lock = threading.Lock()
        self._queued: list[_QueuedSubscriber] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.dropped: collections.Counter[str] = collections.Counter()
        self.published: collections.Counter[str] = collections.Counter()

    def _subject(self, topic: str) -> Subject[Any]:
        try:
            return self._subjects[topic]
        except KeyError:
            known = ", ".join(sorted(self._subjects))
            raise KeyError(f"unknown topic {topic!r}; known topics: {known}") from None

    def publish(self, topic: str, event: object) -> None:
        """Deliver `event` to every subscriber of `topic`. Safe from any thread."""
        subject = self._subject(topic)
        expected = self._types[topic]
        if not isinstance(event, expected):
            raise TypeError(
                f"topic {topic!r} carries {expected.__name__}, not {type(event).__name__}"
            )
        self._count(self.published, topic)
        # No lock around the delivery: one held here made the real-time decision thread,
        # publishing its actions, wait for whichever sensor thread was delivering.
        subject.on_next(event)

    def _count(self, counter: collections.Counter[str], key: str) -> None:
        with self._count_lock:
            counter[key] += 1

    def subscribe(
        self,
        topic: str,
        callback: Callable[[Any], None],
        *,
        name: str,
        inline: bool = False,
        maxlen: int = 4096,
    ) -> DisposableBase:
        """Call `callback(event)` for each event on `topic` (see the module doc for `inline`)."""
        if inline:

            def guarded(event: Any) -> None:
                try:
                    callback(event)
                except Exception:
                    self._count(self.errors, name)
                    log.exception("subscriber %s failed on %r; it stays subscribed", name, event)

            return self._subject(topic).subscribe(guarded)
        queued = _QueuedSubscriber(self, name, callback, maxlen)
        sub = self._subject(topic).subscribe(queued.offer)
        self._queued.append(queued)

        def dispose() -> None:
            sub.dispose()
            queued.close()

        return Disposable(dispose)

    def drain(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued subscriber has handled what it was given."""
        return all(q.wait_idle(timeout_s) for q in self._queued)

    def close(self) -> None:
        """Complete every topic and stop queued subscribers after they drain."""
        for subject in self._subjects.values():
            subject.on_completed()
        for q in self._queued:
            q.close()


class _QueuedSubscriber:
    """A subscriber with its own thread and a bounded drop-oldest queue."""

    def __init__(
        self, bus: EventBus, name: str, callback: Callable[[Any], None], maxlen: int
    ) -> None:
        self._bus = bus
        self._name = name
        self._callback = callback
        self._queue: collections.deque[Any] = collections.deque(maxlen=maxlen)
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"bus:{name}", daemon=True)
        self._thread.start()

    def offer(self, event: Any) -> None:
        with self._cond:
            if len(self._queue) == self._queue.maxlen:
                self._bus._count(self._bus.dropped, self._name)
            self._queue.append(event)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait()
                if not self._queue and self._closed:
                    self._busy = False
                    self._cond.notify_all()
                    return
                event = self._queue.popleft()
                self._busy = True
            try:
                self._callback(event)
            except Exception:
                self._bus._count(self._bus.errors, self._name)
                log.exception("subscriber %s failed on %r; it stays subscribed", self._name, event)

    def wait_idle(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
