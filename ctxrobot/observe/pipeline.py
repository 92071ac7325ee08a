"""The one observer pipeline: every observer (run database, status board, metrics) reads
the bus through a single queued consumer.

Why one consumer and not one per observer and topic:

- **One thread, one bounded queue.** The publisher (the context → policy → actuator path,
  the task channels) only appends the event to a deque under a short lock; nothing an
  observer does — JSON, SQLite, Prometheus locks, percentiles — ever runs on its thread.
  When the observers fall behind, the *oldest* queued events are dropped and counted
  (`dropped`), so memory stays bounded and publishers never wait.
- **Batches.** Events gather for up to `GATHER_S` (100 ms) before the consumer takes them
  all at once, so a publisher wakes the consumer once per batch, not once per event; the
  observers run in short bursts instead of competing for the interpreter on every event.
  A live reader (dashboard, metrics scrape) is at most that much behind.
- **One order.** Every observer sees the events in the one order they entered the queue,
  across topics: an event published after another has finished publishing comes after
  it (an allocation before the usage reading taken after it was applied).
- **One table per observer.** Each observer declares, in `handlers()`, which event types
  it reads and which of its methods handles each; the pipeline subscribes to the topics
  those types travel on (`ctxrobot.model.events.TOPICS`) and dispatches by type.

An observer that raises is logged (first failure per observer and event type, with its
traceback) and counted in `errors`; it keeps receiving events, and the other observers
never notice.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from reactivex.abc import DisposableBase

from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import TOPICS

__all__ = ["Handler", "Observer", "ObserverPipeline", "PipelineStats"]

log = logging.getLogger(__name__)

Handler = Callable[[Any], None]

# event type → the topic it travels on
_TOPIC_OF: dict[type, str] = {event_type: topic for topic, event_type in TOPICS.items()}


class Observer(Protocol):
    """Something that reads events off the pipeline's thread."""

    def handlers(self) -> Mapping[type, Handler]:
        """Event type → the method that handles it: everything this observer reads."""
        ...


@dataclass(frozen=True, slots=True)
class PipelineStats:
    """How the pipeline is keeping up (for logs, the status document and tests)."""

    delivered: int  # events taken off the queue and dispatched
    queued: int  # events waiting now
    dropped: int  # oldest events dropped because the queue was full
    errors: Mapping[str, int]  # observer name → events it failed on


class ObserverPipeline:
    """One queued consumer of `bus`, dispatching each event by type to its observers.

    Observers may be added at any time (`add`); each receives the events dispatched from
    then on. `close` stops the feeding, lets the thread finish what is queued, and joins
    it: after it returns no observer method runs again, so observers can be closed.
    """

    #: Events the queue holds before dropping the oldest. At the default robot's rates
    #: (~60 events/s) that is 18 minutes of backlog; the consumer normally keeps it empty.
    MAXLEN = 1 << 16
    #: Events gather this long before the consumer dispatches them, so that publishers wake
    #: it once per batch rather than once per event (observers lag by at most this much: a
    #: person watching does not see 0.1 s, and each wake-up of a sleeping thread costs a
    #: cold start of the interpreter, several times the work of a small batch)...
    GATHER_S = 0.1
    #: ...or until this many are queued.
    WAKE_AT = 512
    #: Least time between two "falling behind" log lines.
    DROP_LOG_INTERVAL_S = 10.0

    def __init__(self, bus: EventBus, *, maxlen: int = MAXLEN, name: str = "observers") -> None:
        self._bus = bus
        self._name = name
        self._maxlen = maxlen
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[Any] = collections.deque(maxlen=maxlen)
        # What the consumer is doing, for `_offer` to know whether to wake it: "idle" (the
        # queue was empty: wake it), "waking", "gathering" (wake it at WAKE_AT), "busy".
        self._state = "busy"
        self._busy = False  # the consumer is dispatching a batch taken off the queue
        self._hurry = 0  # `drain` callers waiting: no gathering meanwhile
        self._closing = False
        self._dropped = 0
        self._delivered = 0
        self._errors: collections.Counter[str] = collections.Counter()
        self._logged_failures: set[tuple[str, type]] = set()
        self._setup_lock = threading.Lock()  # serialises `add` and `close`
        # Replaced (never mutated), so the consumer reads it without holding a lock.
        self._dispatch: dict[type, tuple[tuple[str, Handler], ...]] = {}
        self._subscriptions: dict[str, DisposableBase] = {}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- set-up -----------------------------------------------------------------------------

    def add(self, observer: Observer, name: str | None = None) -> None:
        """Dispatch the events `observer.handlers()` names to it, from now on."""
        label = name or type(observer).__name__
        table = dict(observer.handlers())
        unknown = [t.__name__ for t in table if t not in _TOPIC_OF]
        if unknown:
            raise TypeError(f"observer {label} handles {unknown}, which no bus topic carries")
        with self._setup_lock:
            if self._closing:
                raise RuntimeError(f"pipeline {self._name} is closed")
            dispatch = {t: list(handlers) for t, handlers in self._dispatch.items()}
            for event_type, handler in table.items():
                dispatch.setdefault(event_type, []).append((label, handler))
            with self._cond:
                self._dispatch = {t: tuple(h) for t, h in dispatch.items()}
            for topic in {_TOPIC_OF[t] for t in table} - set(self._subscriptions):
                # Inline: `_offer` runs on the publisher's thread and only appends.
                self._subscriptions[topic] = self._bus.subscribe(
                    topic, self._offer, name=f"{self._name}:{topic}", inline=True
                )

    # -- the publisher's side: as little as possible ----------------------------------------

    def _offer(self, event: Any) -> None:
        with self._cond:
            if len(self._queue) == self._maxlen:
                self._dropped += 1
            self._queue.append(event)
            if self._state == "idle" or (
                self._state == "gathering" and len(self._queue) >= self.WAKE_AT
            ):
                self._state = "waking"
                self._cond.notify()

    # -- the consumer -----------------------------------------------------------------------

    def _next_batch(self) -> collections.deque[Any] | None:
        """The events queued so far, after letting them gather; None once closed and empty."""
        with self._cond:
            self._busy = False
            self._cond.notify_all()  # wakes `drain`
            while not self._queue and not self._closing:
                self._state = "idle"
                self._cond.wait()
            if not self._closing and not self._hurry:
                self._state = "gathering"
                self._cond.wait_for(
                    lambda: self._closing or self._hurry or len(self._queue) >= self.WAKE_AT,
                    self.GATHER_S,
                )
            self._state = "busy"
            if not self._queue:  # closing, and everything is handled
                return None
            batch, self._queue = self._queue, collections.deque(maxlen=self._maxlen)
            self._busy = True
            return batch

    def _run(self) -> None:
        reported_drops, reported_at = 0, 0.0
        while (batch := self._next_batch()) is not None:
            self._deliver(batch)
            delivered = len(batch)
            # Let go before waiting for the next batch: an idle consumer holding the last one
            # kept up to a burst of events (megabytes) alive for as long as the bus was quiet.
            del batch
            with self._cond:
                self._delivered += delivered
                dropped = self._dropped
            now = time.monotonic()
            if dropped > reported_drops and now - reported_at >= self.DROP_LOG_INTERVAL_S:
                log.warning(
                    "observers fell behind: %d oldest event(s) dropped so far (queue of %d); "
                    "the run itself is unaffected",
                    dropped,
                    self._maxlen,
                )
                reported_drops, reported_at = dropped, now
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def _deliver(self, batch: collections.deque[Any]) -> None:
        dispatch = self._dispatch
        for event in batch:
            for label, handler in dispatch.get(type(event), ()):
                try:
                    handler(event)
                except Exception:
                    self._failed(label, event)

    def _failed(self, label: str, event: Any) -> None:
        with self._cond:
            self._errors[label] += 1
        key = (label, type(event))
        if key not in self._logged_failures:
            self._logged_failures.add(key)
            log.exception(
                "observer %s failed on a %s; it keeps receiving events (further failures "
                "are counted, not logged)",
                label,
                type(event).__name__,
            )

    # -- control ----------------------------------------------------------------------------

    def drain(self, timeout_s: float = 5.0) -> bool:
        """Wait until every event queued so far has been dispatched."""
        with self._cond:
            self._hurry += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout_s)
            finally:
                self._hurry -= 1

    def stats(self) -> PipelineStats:
        with self._cond:
            return PipelineStats(
                delivered=self._delivered,
                queued=len(self._queue),
                dropped=self._dropped,
                errors=dict(self._errors),
            )

    def close(self, timeout_s: float = 10.0) -> bool:
        """Unsubscribe, dispatch what is queued, stop the thread. Idempotent.

        Returns whether the thread finished within `timeout_s` (False: an observer is stuck;
        it is a daemon thread and dies with the process).
        """
        with self._setup_lock:
            subscriptions, self._subscriptions = list(self._subscriptions.values()), {}
            for sub in subscriptions:
                sub.dispose()
            with self._cond:
                self._closing = True
                self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        stats = self.stats()
        if stats.dropped or stats.errors:
            log.warning(
                "observers: %d event(s) dropped, failures per observer: %s",
                stats.dropped,
                dict(stats.errors) or "none",
            )
        return not self._thread.is_alive()
