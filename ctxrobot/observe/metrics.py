"""Prometheus exporter (opt-in, `--metrics-port`): the live run as scrapeable metrics.

Why these choices:
- An own `CollectorRegistry`, not the process-global one: two runtimes in one process
  (tests, a daemon restarting a run) never collide on metric names.
- Fed by **queued** bus subscriptions: prometheus-client takes a lock per observation,
  which must not run on the inline context → actuator path.
- Latencies in seconds (Prometheus convention) with buckets from 1 ms to 2 s, the span of
  our tasks; actuation has its own buckets from 10 µs, since it is sub-millisecond.
- The exporter binds 127.0.0.1 by default: a robot's metrics are not for the whole LAN
  unless someone asks.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from reactivex.abc import DisposableBase

from ctxrobot.model.bus import EventBus
from ctxrobot.model.errors import PortInUseError
from ctxrobot.model.events import (
    AllocationApplied,
    ContextChanged,
    RuleChanged,
    SampleDropped,
    TaskResult,
    TaskStateChanged,
)
from ctxrobot.observe.store import allocated_shares, allocation_field

LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
ACTUATION_BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1)


class MetricsExporter:
    """Every ctxrobot metric, in one registry, updated from `bus` events from construction on.

    `deadlines_ms` (task → deadline, None for none) is needed to count deadline misses
    the way the run database does (latency > deadline).
    """

    def __init__(self, bus: EventBus, *, deadlines_ms: Mapping[str, float | None]) -> None:
        self.registry = CollectorRegistry()
        self._deadlines_ms = dict(deadlines_ms)
        self._subscriptions: list[DisposableBase] = []
        self._server: WSGIServer | None = None
        self._server_thread: threading.Thread | None = None
        # Last string value per signal and state per task, to zero the old label set.
        self._lock = threading.Lock()
        self._last_text: dict[str, str] = {}
        self._last_state: dict[str, str] = {}
        r = self.registry
        self.latency = Histogram(
            "ctxrobot_task_latency_seconds",
            "Sensor-to-result latency of each processed sample (t_end - t_sensor).",
            ["task"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_wait = Histogram(
            "ctxrobot_task_queue_wait_seconds",
            "Time a sample waited before its task started on it (t_start - t_sensor).",
            ["task"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.deadline_misses = Counter(
            "ctxrobot_task_deadline_misses",
            "Samples whose latency exceeded the task's deadline.",
            ["task"],
            registry=r,
        )
        self.dropped = Counter(
            "ctxrobot_task_dropped_samples",
            "Samples dropped before processing.",
            ["task", "reason"],
            registry=r,
        )
        self.task_state = Gauge(
            "ctxrobot_task_state",
            "1 for the task's current lifecycle state, 0 for states it has left.",
            ["task", "state"],
            registry=r,
        )
        self.cpu_allocated = Gauge(
            "ctxrobot_task_cpu_allocated_share",
            "CPU share of the whole machine allocated to the task (its cap, else its weight's"
            " fraction of the unfrozen weights).",
            ["task"],
            registry=r,
        )
        self.cpu_used = Gauge(
            "ctxrobot_task_cpu_used_share",
            "Measured CPU use of the task, as a share of the whole machine.",
            ["task"],
            registry=r,
        )
        self.cpu_weight = Gauge(
            "ctxrobot_task_cpu_weight", "cgroup CPU weight (1..10000).", ["task"], registry=r
        )
        self.frozen = Gauge(
            "ctxrobot_task_frozen", "1 while the task's cgroup is frozen.", ["task"], registry=r
        )
        self.signal = Gauge(
            "ctxrobot_context_signal",
            "Numeric and boolean context signals (booleans as 0/1).",
            ["signal"],
            registry=r,
        )
        self.signal_state = Gauge(
            "ctxrobot_context_signal_state",
            "Text context signals: 1 for the current value, 0 for earlier values.",
            ["signal", "value"],
            registry=r,
        )
        self.rule_active = Gauge(
            "ctxrobot_rule_active", "1 while the rule is active.", ["rule"], registry=r
        )
        self.actuation = Histogram(
            "ctxrobot_actuation_seconds",
            "Time the actuator took to apply an allocation.",
            buckets=ACTUATION_BUCKETS_S,
            registry=r,
        )
        self.allocations = Counter(
            "ctxrobot_allocations", "Allocations applied.", ["policy"], registry=r
        )
        self._attach(bus)

    # -- feeding -------------------------------------------------------------------------

    def _attach(self, bus: EventBus) -> None:
        handlers: dict[str, Callable[[Any], None]] = {
            "task.result": self.on_result,
            "task.dropped": self.on_dropped,
            "task.state": self.on_state,
            "context": self.on_context,
            "rule": self.on_rule,
            "allocation": self.on_allocation,
        }
        for topic, handler in handlers.items():
            self._subscriptions.append(
                bus.subscribe(topic, handler, name=f"metrics:{topic}", inline=False)
            )

    def on_result(self, ev: TaskResult) -> None:
        self.latency.labels(ev.task).observe(ev.latency_s)
        self.queue_wait.labels(ev.task).observe(max(0.0, ev.t_start - ev.t_sensor))
        # Touch the child so a task with no misses exports 0 rather than nothing.
        misses = self.deadline_misses.labels(ev.task)
        if ev.missed(self._deadlines_ms.get(ev.task)):
            misses.inc()

    def on_dropped(self, ev: SampleDropped) -> None:
        self.dropped.labels(ev.task, ev.reason).inc()

    def on_state(self, ev: TaskStateChanged) -> None:
        with self._lock:
            previous = self._last_state.get(ev.task)
            if previous is not None and previous != ev.state:
                self.task_state.labels(ev.task, previous).set(0)
            self._last_state[ev.task] = ev.state
            self.task_state.labels(ev.task, ev.state).set(1)

    def on_context(self, ev: ContextChanged) -> None:
        with self._lock:
            for name, value in ev.signals.items():
                if isinstance(value, bool | int | float):
                    self.signal.labels(name).set(float(value))
                elif isinstance(value, str):
                    previous = self._last_text.get(name)
                    if previous is not None and previous != value:
                        self.signal_state.labels(name, previous).set(0)
                    self._last_text[name] = value
                    self.signal_state.labels(name, value).set(1)
                # None (unknown yet) and structured values have no gauge form.

    def on_rule(self, ev: RuleChanged) -> None:
        self.rule_active.labels(ev.rule).set(1 if ev.active else 0)

    def on_allocation(self, ev: AllocationApplied) -> None:
        self.actuation.observe(ev.actuation_ms / 1000.0)
        self.allocations.labels(ev.policy).inc()
        for task, share in allocated_shares(ev.allocation).items():
            self.cpu_allocated.labels(task).set(share)
        for task, alloc in ev.allocation.items():
            weight = allocation_field(alloc, "weight")
            if weight is not None:
                self.cpu_weight.labels(task).set(weight)
            self.frozen.labels(task).set(1 if allocation_field(alloc, "frozen") else 0)

    def record_usage(self, task: str, cpu_share: float) -> None:
        """Measured CPU use of `task`, a share of the whole machine (from the usage sampler)."""
        self.cpu_used.labels(task).set(cpu_share)

    # -- serving -------------------------------------------------------------------------

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Start the HTTP exporter on a daemon thread; returns the bound port (0 → ephemeral)."""
        try:
            self._server, self._server_thread = start_http_server(
                port, addr=addr, registry=self.registry
            )
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
            raise PortInUseError(
                f"metrics port {addr}:{port} is in use: choose another --metrics-port "
                "(0 picks a free one)"
            ) from err
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop the exporter and unsubscribe from the bus."""
        for sub in self._subscriptions:
            sub.dispose()
        self._subscriptions.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._server_thread is not None:
            self._server_thread.join(timeout=5.0)
            self._server_thread = None
