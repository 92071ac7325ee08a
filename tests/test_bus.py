"""The event bus: typed topics, thread-safe publishing, isolation, bounded back-pressure."""

from __future__ import annotations

import threading
import time
import tracemalloc

import pytest

from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import AudioLevel, LaserScan


def level(i: int) -> AudioLevel:
    return AudioLevel("mic", float(i), -20.0)


def test_publish_reaches_inline_subscribers_in_order() -> None:
    bus = EventBus()
    first: list[float] = []
    second: list[float] = []
    bus.subscribe("sensor.audio", lambda e: first.append(e.t), name="first", inline=True)
    bus.subscribe("sensor.audio", lambda e: second.append(e.t), name="second", inline=True)
    for i in range(5):
        bus.publish("sensor.audio", level(i))
    assert first == second == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert bus.published["sensor.audio"] == 5


def test_a_publisher_never_waits_for_another_ones_delivery() -> None:
    """The decision thread publishes its actions while sensor threads are delivering: it
    must not wait for them (the bus once held one lock across every delivery)."""
    bus = EventBus()
    delivering, release = threading.Event(), threading.Event()

    def slow(_event: AudioLevel) -> None:
        delivering.set()
        release.wait(10.0)

    bus.subscribe("sensor.audio", slow, name="slow", inline=True)
    got: list[float] = []
    bus.subscribe("sensor.scan", lambda e: got.append(e.t), name="fast", inline=True)
    sensor = threading.Thread(target=bus.publish, args=("sensor.audio", level(0)))
    sensor.start()
    try:
        assert delivering.wait(10.0)
        other = threading.Thread(
            target=bus.publish, args=("sensor.scan", LaserScan("lidar", 1.0, 1.0))
        )
        other.start()
        other.join(5.0)
        assert not other.is_alive(), "a publisher waited for another publisher's delivery"
        assert got == [1.0]
    finally:
        release.set()
        sensor.join(10.0)


def test_topics_are_typed_and_named() -> None:
    bus = EventBus()
    with pytest.raises(TypeError, match="carries AudioLevel"):
        bus.publish("sensor.audio", LaserScan("lidar", 0.0, 1.0))
    with pytest.raises(KeyError, match="known topics"):
        bus.publish("sensor.audoi", level(0))


def test_a_failing_subscriber_stops_neither_the_bus_nor_the_others() -> None:
    bus = EventBus()
    good: list[float] = []

    def bad(event: AudioLevel) -> None:
        if event.t == 1.0:
            raise RuntimeError("subscriber bug")

    bus.subscribe("sensor.audio", bad, name="bad", inline=True)
    bus.subscribe("sensor.audio", lambda e: good.append(e.t), name="good", inline=True)
    for i in range(4):
        bus.publish("sensor.audio", level(i))
    assert good == [0.0, 1.0, 2.0, 3.0]
    assert bus.errors == {"bad": 1}


def test_queued_subscriber_failure_is_isolated_too() -> None:
    bus = EventBus()
    got: list[float] = []

    def flaky(event: AudioLevel) -> None:
        if event.t == 0.0:
            raise RuntimeError("first one fails")
        got.append(event.t)

    bus.subscribe("sensor.audio", flaky, name="flaky")
    for i in range(3):
        bus.publish("sensor.audio", level(i))
    assert bus.drain(5)
    assert got == [1.0, 2.0]
    assert bus.errors["flaky"] == 1


def test_slow_queued_consumer_drops_oldest_and_memory_stays_bounded() -> None:
    """Back-pressure policy: a slow queued consumer loses its oldest events, counted."""
    bus = EventBus()
    release = threading.Event()
    got: list[float] = []

    def slow(event: AudioLevel) -> None:
        release.wait()
        got.append(event.t)

    bus.subscribe("sensor.audio", slow, name="slow", maxlen=100)
    tracemalloc.start()
    bus.publish("sensor.audio", level(0))  # taken by the consumer, which then blocks
    time.sleep(0.1)
    before, _ = tracemalloc.get_traced_memory()
    for i in range(1, 50_001):
        bus.publish("sensor.audio", level(i))
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # 50 000 events of ~100 B each would be ~5 MB if queued; 100 queued are ~10 kB.
    assert after - before < 500_000
    assert bus.dropped["slow"] == 50_000 - 100
    release.set()
    assert bus.drain(10)
    assert got[0] == 0.0
    assert got[1:] == [float(i) for i in range(49_901, 50_001)], "the newest are kept"


def test_publishers_never_wait_for_a_slow_queued_consumer() -> None:
    bus = EventBus()
    bus.subscribe("sensor.audio", lambda e: time.sleep(0.05), name="slow", maxlen=10)
    start = time.perf_counter()
    for i in range(200):
        bus.publish("sensor.audio", level(i))
    elapsed = time.perf_counter() - start
    # 200 × 50 ms = 10 s if publishing waited; it takes milliseconds. The bound is loose on
    # purpose (a loaded 2-core machine), and still far below the blocking case.
    assert elapsed < 2.0
    bus.close()
