"""Prometheus exporter (opt-in, `--metrics-port`): the live run as scrapeable metrics.

Why these choices:
- An own `CollectorRegistry`, not the process-global one: two runtimes in one process
  (tests, a daemon restarting a run) never collide on metric names.
- An observer of the pipeline (`ctxrobot.observe.pipeline`): prometheus-client takes a lock
  per observation, which must not run on the inline context → actuator path.
- Latencies in seconds (Prometheus convention) with buckets from 1 ms to 2 s, the span of
  our tasks; actuation has its own buckets from 10 µs, since it is sub-millisecond.
- Label sets stay bounded however long the daemon runs: a text signal keeps at most
  `TEXT_VALUES_KEPT` values (older ones are removed, not zeroed), everything else is keyed
  by names from the manifest (tasks, rules, sources, signals) or a small vocabulary
  (states, drop reasons).
- The exporter binds 127.0.0.1 by default: a robot's metrics are not for the whole LAN
  unless someone asks.
"""

from __future__ import annotations

import collections
import errno
import threading
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ctxrobot.model.errors import PortInUseError
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
from ctxrobot.observe.pipeline import Handler
from ctxrobot.observe.values import allocated_shares, allocation_field

LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
ACTUATION_BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1)
#: Values of one text signal exported at a time (the current one and recent ones at 0).
TEXT_VALUES_KEPT = 16


class MetricsExporter:
    """Every ctxrobot metric, in one registry, updated by the events the pipeline hands it.

    `deadlines_ms` (task → deadline, None for none) is needed to count deadline misses
    the way the run database does (latency > deadline).
    """

    def __init__(self, *, deadlines_ms: Mapping[str, float | None]) -> None:
        self.registry = CollectorRegistry()
        self._deadlines_ms = dict(deadlines_ms)
        self._server: WSGIServer | None = None
        self._server_thread: threading.Thread | None = None
        # Only the pipeline's thread touches these: no lock.
        self._last_state: dict[tuple[str, str], str] = {}  # (kind, name) → state
        # Per text signal, its recent values, oldest first (the last is the current one).
        self._text_values: dict[str, collections.OrderedDict[str, None]] = {}
        self._result_series: dict[str, tuple[Histogram, Histogram, Counter]] = {}
        self._define_task_metrics(self.registry)
        self._define_run_metrics(self.registry)

    def _define_task_metrics(self, r: CollectorRegistry) -> None:
        """Per task: latency, misses, drops, lifecycle, CPU."""
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

    def _define_run_metrics(self, r: CollectorRegistry) -> None:
        """The robot's context, rules, allocations and sensor sources."""
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
        self.source_state = Gauge(
            "ctxrobot_source_state",
            "1 for the sensor source's current state (open, failed, reopening, closed), 0 for"
            " states it has left.",
            ["source", "state"],
            registry=r,
        )

    # -- the observer ----------------------------------------------------------------------

    def handlers(self) -> Mapping[type, Handler]:
        return {
            TaskResult: self._on_result,
            SampleDropped: self._on_dropped,
            TaskStateChanged: self._on_state,
            ContextChanged: self._on_context,
            RuleChanged: self._on_rule,
            AllocationApplied: self._on_allocation,
            UsageSampled: self._on_usage,
            SourceStateChanged: self._on_source,
        }

    def _on_result(self, ev: TaskResult) -> None:
        series = self._result_series.get(ev.task)
        if series is None:
            # Looking a child up by its labels costs more than observing it: once per task.
            # Creating the misses child makes a task with no misses export 0, not nothing.
            series = self._result_series[ev.task] = (
                self.latency.labels(ev.task),
                self.queue_wait.labels(ev.task),
                self.deadline_misses.labels(ev.task),
            )
        latency, queue_wait, misses = series
        latency.observe(ev.latency_s)
        queue_wait.observe(max(0.0, ev.t_start - ev.t_sensor))
        if ev.missed(self._deadlines_ms.get(ev.task)):
            misses.inc()

    def _on_dropped(self, ev: SampleDropped) -> None:
        self.dropped.labels(ev.task, ev.reason).inc()

    def _set_state(self, gauge: Gauge, kind: str, name: str, state: str) -> None:
        """One-hot state gauge: the new state 1, the one it left 0."""
        key = (kind, name)
        previous = self._last_state.get(key)
        if previous is not None and previous != state:
            gauge.labels(name, previous).set(0)
        self._last_state[key] = state
        gauge.labels(name, state).set(1)

    def _on_state(self, ev: TaskStateChanged) -> None:
        self._set_state(self.task_state, "task", ev.task, ev.state)

    def _on_source(self, ev: SourceStateChanged) -> None:
        self._set_state(self.source_state, "source", ev.source, ev.state)

    def _on_context(self, ev: ContextChanged) -> None:
        for name, value in ev.signals.items():
            if isinstance(value, bool | int | float):
                self.signal.labels(name).set(float(value))
            elif isinstance(value, str):
                self._set_text(name, value)
            # None (unknown yet) and structured values have no gauge form.

    def _set_text(self, name: str, value: str) -> None:
        """The current value of a text signal 1, recent ones 0, older ones removed."""
        values = self._text_values.setdefault(name, collections.OrderedDict())
        if values and next(reversed(values)) != value:
            self.signal_state.labels(name, next(reversed(values))).set(0)
        values[value] = None
        values.move_to_end(value)
        self.signal_state.labels(name, value).set(1)
        while len(values) > TEXT_VALUES_KEPT:
            oldest, _ = values.popitem(last=False)
            self.signal_state.remove(name, oldest)

    def _on_rule(self, ev: RuleChanged) -> None:
        self.rule_active.labels(ev.rule).set(1 if ev.active else 0)

    def _on_allocation(self, ev: AllocationApplied) -> None:
        self.actuation.observe(ev.actuation_ms / 1000.0)
        self.allocations.labels(ev.policy).inc()
        for task, share in allocated_shares(ev.allocation).items():
            self.cpu_allocated.labels(task).set(share)
        for task, alloc in ev.allocation.items():
            weight = allocation_field(alloc, "weight")
            if weight is not None:
                self.cpu_weight.labels(task).set(weight)
            self.frozen.labels(task).set(1 if allocation_field(alloc, "frozen") else 0)

    def _on_usage(self, ev: UsageSampled) -> None:
        for task, used in ev.used.items():
            self.cpu_used.labels(task).set(used)

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
        """Stop the HTTP exporter (close the pipeline first). Idempotent."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._server_thread is not None:
            self._server_thread.join(timeout=5.0)
            self._server_thread = None
