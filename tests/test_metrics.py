"""The Prometheus exporter, fed by a real EventBus through the observer pipeline and scraped
over HTTP on 127.0.0.1."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import (
    AllocationApplied,
    ContextChanged,
    RuleChanged,
    SampleDropped,
    SourceStateChanged,
    TaskResult,
    TaskStateChanged,
    UsageSampled,
)
from ctxrobot.observe.metrics import LATENCY_BUCKETS_S, TEXT_VALUES_KEPT, MetricsExporter
from ctxrobot.observe.pipeline import ObserverPipeline

LATENCIES_MS = {"slam": [0.8, 3.0, 40.0, 95.0, 120.0, 1500.0], "signs": [60.0, 250.0]}
DEADLINES_MS = {"slam": 100.0, "signs": 200.0, "speech": None}


@pytest.fixture
def scraped() -> Iterator[dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """Publish a short run, scrape the endpoint once, return {(sample, labels): value}."""
    bus = EventBus()
    metrics = MetricsExporter(deadlines_ms=DEADLINES_MS)
    pipeline = ObserverPipeline(bus)
    pipeline.add(metrics)
    t0 = time.monotonic()
    for task, lats in LATENCIES_MS.items():
        bus.publish("task.state", TaskStateChanged(t0, task, "starting"))
        bus.publish("task.state", TaskStateChanged(t0 + 0.1, task, "running"))
        for i, ms in enumerate(lats):
            ts = t0 + i
            bus.publish("task.result", TaskResult(task, i, ts, ts + ms / 4000, ts + ms / 1000))
    bus.publish("task.dropped", SampleDropped("signs", 9, t0, "queue full"))
    bus.publish("task.dropped", SampleDropped("signs", 10, t0, "queue full"))
    signals = {"speed": 0.3, "motion": "stopped", "voice_active": False, "pose": [1, 2]}
    bus.publish("context", ContextChanged(t0, signals, ("speed", "motion")))
    signals = {**signals, "motion": "moving", "voice_active": True}
    bus.publish("context", ContextChanged(t0 + 1, signals, ("motion", "voice_active")))
    bus.publish("rule", RuleChanged(t0 + 1, "slam-critical-while-moving", True))
    bus.publish("rule", RuleChanged(t0 + 1, "speech-on-voice", True))
    bus.publish("rule", RuleChanged(t0 + 2, "speech-on-voice", False))
    alloc = {
        "slam": {"weight": 400, "share_cap": 0.5, "frozen": False},
        "signs": {"weight": 100, "share_cap": None, "frozen": True},
    }
    for act_ms in (0.05, 0.2, 3.0):
        bus.publish("allocation", AllocationApplied(t0 + 1, t0 + 1, "ctx", "rule", alloc, act_ms))
    bus.publish("usage", UsageSampled(t0 + 2, {"slam": 0.42}))
    bus.publish("source.state", SourceStateChanged(t0, "camera", "open"))
    bus.publish("source.state", SourceStateChanged(t0 + 1, "camera", "failed", "unplugged"))
    assert pipeline.drain()
    port = metrics.serve(0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.status == 200
            text = resp.read().decode()
    finally:
        pipeline.close()
        metrics.close()
        bus.close()
    yield {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_latency_histograms(scraped: dict) -> None:
    for task, lats in LATENCIES_MS.items():
        lab = (("task", task),)
        assert scraped[("ctxrobot_task_latency_seconds_count", lab)] == len(lats)
        assert scraped[("ctxrobot_task_latency_seconds_sum", lab)] == pytest.approx(
            sum(lats) / 1000, rel=1e-6
        )
        for le in LATENCY_BUCKETS_S:
            key = ("ctxrobot_task_latency_seconds_bucket", (("le", str(le)), ("task", task)))
            assert scraped[key] == int(np.sum(np.asarray(lats) / 1000 <= le + 1e-12)), le
    # 1 ms…2 s: the smallest bucket separates sub-ms samples, the largest catches 1.5 s.
    assert (
        scraped[("ctxrobot_task_latency_seconds_bucket", (("le", "0.001"), ("task", "slam")))] == 1
    )
    assert scraped[("ctxrobot_task_latency_seconds_bucket", (("le", "1.0"), ("task", "slam")))] == 5
    assert scraped[("ctxrobot_task_queue_wait_seconds_count", (("task", "slam"),))] == 6


def test_counters(scraped: dict) -> None:
    assert scraped[("ctxrobot_task_deadline_misses_total", (("task", "slam"),))] == 2
    assert scraped[("ctxrobot_task_deadline_misses_total", (("task", "signs"),))] == 1
    key = ("ctxrobot_task_dropped_samples_total", (("reason", "queue full"), ("task", "signs")))
    assert scraped[key] == 2
    assert scraped[("ctxrobot_allocations_total", (("policy", "ctx"),))] == 3


def test_state_cpu_and_context_gauges(scraped: dict) -> None:
    assert scraped[("ctxrobot_task_state", (("state", "running"), ("task", "slam")))] == 1
    assert scraped[("ctxrobot_task_state", (("state", "starting"), ("task", "slam")))] == 0
    assert scraped[("ctxrobot_task_cpu_allocated_share", (("task", "slam"),))] == 0.5
    assert scraped[("ctxrobot_task_cpu_allocated_share", (("task", "signs"),))] == 0  # frozen
    assert scraped[("ctxrobot_task_cpu_used_share", (("task", "slam"),))] == 0.42
    assert scraped[("ctxrobot_task_cpu_weight", (("task", "slam"),))] == 400
    assert scraped[("ctxrobot_task_frozen", (("task", "signs"),))] == 1
    assert scraped[("ctxrobot_task_frozen", (("task", "slam"),))] == 0
    assert scraped[("ctxrobot_context_signal", (("signal", "speed"),))] == 0.3
    assert scraped[("ctxrobot_context_signal", (("signal", "voice_active"),))] == 1
    state = "ctxrobot_context_signal_state"
    assert scraped[(state, (("signal", "motion"), ("value", "moving")))] == 1
    assert scraped[(state, (("signal", "motion"), ("value", "stopped")))] == 0
    assert not any(name.endswith("signal") and ("signal", "pose") in lab for name, lab in scraped)
    source = "ctxrobot_source_state"
    assert scraped[(source, (("source", "camera"), ("state", "failed")))] == 1
    assert scraped[(source, (("source", "camera"), ("state", "open")))] == 0
    rule = "ctxrobot_rule_active"
    assert scraped[(rule, (("rule", "slam-critical-while-moving"),))] == 1
    assert scraped[(rule, (("rule", "speech-on-voice"),))] == 0


def test_actuation_histogram(scraped: dict) -> None:
    assert scraped[("ctxrobot_actuation_seconds_count", ())] == 3
    assert scraped[("ctxrobot_actuation_seconds_bucket", (("le", "0.0001"),))] == 1
    assert scraped[("ctxrobot_actuation_seconds_bucket", (("le", "0.001"),))] == 2
    assert scraped[("ctxrobot_actuation_seconds_sum", ())] == pytest.approx(3.25e-3)


def test_registry_is_private() -> None:
    """Two exporters in one process do not collide (the global registry is untouched)."""
    a = MetricsExporter(deadlines_ms={})
    b = MetricsExporter(deadlines_ms={})
    a.latency.labels("x").observe(0.01)
    assert b.registry.get_sample_value("ctxrobot_task_latency_seconds_count", {"task": "x"}) is None
    a.close()
    b.close()


def test_text_signal_label_sets_stay_bounded() -> None:
    """A text signal that takes a new value every time (a transcript) keeps a bounded number
    of label sets: the current value at 1, the most recent ones at 0, older ones removed."""
    bus = EventBus()
    metrics = MetricsExporter(deadlines_ms={})
    pipeline = ObserverPipeline(bus)
    pipeline.add(metrics)
    for i in range(500):
        bus.publish("context", ContextChanged(float(i), {"heard": f"utterance {i}"}, ("heard",)))
    assert pipeline.drain()
    pipeline.close()
    values = {
        s.labels["value"]: s.value
        for family in metrics.registry.collect()
        if family.name == "ctxrobot_context_signal_state"
        for s in family.samples
    }
    assert len(values) == TEXT_VALUES_KEPT
    assert values["utterance 499"] == 1
    assert sum(values.values()) == 1
    assert "utterance 0" not in values
