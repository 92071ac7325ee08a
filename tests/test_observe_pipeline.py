"""The observer pipeline: one queued consumer of a real EventBus dispatching by event type.

What is asserted: each observer receives exactly the types it declares, in publish order
across topics, on the pipeline's thread (never the publisher's); a full queue drops the
oldest events and counts them; a failing observer neither stops itself nor the others;
after `close` no observer method runs again.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

import pytest

from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import (
    ContextChanged,
    HostReading,
    RuleChanged,
    SampleDropped,
    TaskResult,
    UsageSampled,
)
from ctxrobot.observe.pipeline import Handler, ObserverPipeline


class Recorder:
    """Records what it is handed and on which thread."""

    def __init__(self, *types: type) -> None:
        self.types = types
        self.events: list[Any] = []
        self.threads: set[int] = set()

    def handlers(self) -> Mapping[type, Handler]:
        return dict.fromkeys(self.types, self._on)

    def _on(self, event: Any) -> None:
        self.threads.add(threading.get_ident())
        self.events.append(event)


class Gate(Recorder):
    """Blocks on its first event until released: a stuck observer."""

    def __init__(self, *types: type) -> None:
        super().__init__(*types)
        self.entered = threading.Event()
        self.release = threading.Event()

    def _on(self, event: Any) -> None:
        self.entered.set()
        self.release.wait(30)
        super()._on(event)


class Counting:
    """Counts the results it is handed and keeps none of them."""

    def __init__(self) -> None:
        self.calls = 0

    def handlers(self) -> Mapping[type, Handler]:
        return {TaskResult: self._on}

    def _on(self, event: TaskResult) -> None:
        self.calls += 1


class Failing(Counting):
    def _on(self, event: TaskResult) -> None:
        super()._on(event)
        raise RuntimeError(f"observer bug on sample {event.sample_id}")


def result(i: int) -> TaskResult:
    return TaskResult("slam", i, float(i), float(i), float(i) + 0.01)


def test_dispatch_by_type_in_publish_order_off_the_publishers_thread() -> None:
    bus = EventBus()
    pipeline = ObserverPipeline(bus)
    everything = Recorder(TaskResult, RuleChanged, UsageSampled)
    rules_only = Recorder(RuleChanged)
    pipeline.add(everything)
    pipeline.add(rules_only, name="rules")
    published: list[Any] = []
    for i in range(300):
        for topic, event in (
            ("task.result", result(i)),
            ("rule", RuleChanged(float(i), "r", i % 2 == 0)),
            ("usage", UsageSampled(float(i), {"slam": 0.1})),
            ("task.dropped", SampleDropped("slam", i, float(i), "queue full")),  # nobody reads
        ):
            bus.publish(topic, event)
            published.append(event)
    assert pipeline.drain()
    assert everything.events == [e for e in published if not isinstance(e, SampleDropped)]
    assert rules_only.events == [e for e in published if isinstance(e, RuleChanged)]
    assert threading.get_ident() not in everything.threads | rules_only.threads
    assert len(everything.threads | rules_only.threads) == 1  # one consumer thread
    stats = pipeline.stats()
    assert stats.delivered == 900 and stats.dropped == 0 and stats.queued == 0
    pipeline.close()
    bus.close()


def test_full_queue_drops_the_oldest_and_counts_them() -> None:
    bus = EventBus()
    pipeline = ObserverPipeline(bus, maxlen=100)
    gate = Gate(TaskResult)
    pipeline.add(gate)
    bus.publish("task.result", result(0))
    assert gate.entered.wait(10)  # the consumer is stuck on event 0
    for i in range(1, 1001):  # the publisher never waits for it
        bus.publish("task.result", result(i))
    assert pipeline.stats().dropped == 900
    gate.release.set()
    assert pipeline.drain()
    # Event 0 (in hand when the queue filled), then the newest 100.
    assert [e.sample_id for e in gate.events] == [0, *range(901, 1001)]
    pipeline.close()
    bus.close()


def test_a_failing_observer_keeps_receiving_and_harms_no_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()
    pipeline = ObserverPipeline(bus)
    failing, healthy = Failing(), Recorder(TaskResult)
    pipeline.add(failing)
    pipeline.add(healthy)
    for i in range(50):
        bus.publish("task.result", result(i))
    assert pipeline.drain()
    assert failing.calls == 50
    assert [e.sample_id for e in healthy.events] == list(range(50))
    assert pipeline.stats().errors == {"Failing": 50}
    # One traceback in the log, not fifty.
    assert sum("observer Failing failed" in r.getMessage() for r in caplog.records) == 1
    pipeline.close()
    bus.close()


def test_close_drains_then_nothing_more_runs() -> None:
    bus = EventBus()
    pipeline = ObserverPipeline(bus)
    rec = Recorder(ContextChanged)
    pipeline.add(rec)
    for i in range(1000):
        bus.publish("context", ContextChanged(float(i), {"speed": i}, ("speed",)))
    assert pipeline.close()
    assert len(rec.events) == 1000  # everything queued before close was handled
    bus.publish("context", ContextChanged(2000.0, {"speed": 0}, ("speed",)))
    time.sleep(0.05)
    assert len(rec.events) == 1000
    assert pipeline.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pipeline.add(Recorder(ContextChanged))
    bus.close()


class Payload(dict):  # type: ignore[type-arg]
    """A result a weak reference can watch (a plain dict cannot be weakly referenced)."""


def test_an_idle_consumer_keeps_no_event_alive() -> None:
    # The soak test's memory hung on whichever burst came last: the consumer held its batch
    # while it waited for the next one.
    bus = EventBus()
    pipeline = ObserverPipeline(bus)
    counting = Counting()
    pipeline.add(counting)
    payloads = [Payload(sample=i) for i in range(500)]
    watchers = [weakref.ref(p) for p in payloads]
    for i, payload in enumerate(payloads):
        bus.publish("task.result", TaskResult("slam", i, 0.0, 0.0, 0.01, payload))
    del payloads, payload
    assert pipeline.drain()
    assert counting.calls == 500
    assert [w for w in watchers if w() is not None] == []
    pipeline.close()
    bus.close()


def test_an_observer_of_a_type_no_topic_carries_is_refused() -> None:
    class NotAnEvent:
        pass

    pipeline = ObserverPipeline(EventBus())
    with pytest.raises(TypeError, match="NotAnEvent"):
        pipeline.add(Recorder(NotAnEvent, HostReading))
    pipeline.close()
