"""The event bus: typed events on named topics, over reactivex Subjects.

Two kinds of subscriber, two delivery policies (stated here because the scheduler's
latency depends on it):

- **inline** (`bus.stream(topic)` and `subscribe(..., inline=True)`): runs in the
  publisher's thread, under the bus lock, in publish order. Used by the context →
  policy → actuator chain, which must react within a millisecond. Inline consumers must
  be fast; the bus serialises publishers so reactivex operators never see concurrent calls.
- **queued** (`subscribe(..., inline=False)`): each subscriber has its own thread and a
  bounded queue (`maxlen`, default 4096). When a slow consumer (the SQLite writer, a
  dashboard) falls behind, the *oldest* events are dropped and counted in
  `bus.dropped[name]`; memory stays bounded and publishers never wait.

A subscriber that raises is logged and counted in `bus.errors[name]`; it stays subscribed,
and neither the bus nor the other subscribers notice.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

import reactivex
from reactivex import Observable
from reactivex.abc import DisposableBase, ObserverBase, SchedulerBase
from reactivex.disposable import Disposable
from reactivex.subject import Subject

from ctxrobot.model.events import TOPICS

log = logging.getLogger(__name__)


class EventBus:
    """Named, typed topics; thread-safe publishing; isolated subscribers."""

    def __init__(self, topics: dict[str, type] | None = None) -> None:
        self._types = dict(TOPICS if topics is None else topics)
        self._subjects: dict[str, Subject[Any]] = {name: Subject() for name in self._types}
        self._lock = threading.RLock()
        self._queued: list[_QueuedSubscriber] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.dropped: collections.Counter[str] = collections.Counter()
        self.published: collections.Counter[str] = collections.Counter()

    @property
    def delivery_lock(self) -> threading.RLock:
        """The re-entrant lock inline deliveries run under.

        Work that does not come from a publish (timers, operator overrides) holds it to be
        ordered with inline deliveries, and so takes locks in the same order they do:
        bus first, then the component's own.
        """
        return self._lock

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
        with self._lock:
            self.published[topic] += 1
            subject.on_next(event)

    def stream(self, topic: str) -> Observable[Any]:
        """The topic as an Observable for inline operator chains.

        Each subscription gets its own guard: an exception that escapes the subscriber's
        `on_next` is logged and counted, and the subscription keeps receiving later
        events. An exception inside a reactivex operator (`map`, `filter`, …) follows Rx
        rules instead: that chain ends with `on_error` (the bus and every other subscriber
        carry on), so long-lived chains must not raise in their operators.
        """
        subject = self._subject(topic)

        def subscribe(observer: ObserverBase[Any], _: SchedulerBase | None = None) -> Any:
            name = f"{topic}:{type(observer).__name__}@{id(observer):x}"

            def on_next(event: Any) -> None:
                try:
                    observer.on_next(event)
                except Exception:
                    self.errors[name] += 1
                    log.exception("subscriber %s failed on %r; it stays subscribed", name, event)

            return subject.subscribe(on_next, observer.on_error, observer.on_completed)

        return reactivex.create(subscribe)

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
                    self.errors[name] += 1
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
        with self._lock:
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
                self._bus.dropped[self._name] += 1
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
                self._bus.errors[self._name] += 1
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
