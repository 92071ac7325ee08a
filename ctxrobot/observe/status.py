"""The live status document the daemon serves to `ctxrobot dash`, `ps` and `ctl status`.

A `StatusBoard` listens on the bus (queued: the hot path never waits for it) and keeps
sliding windows per task; `snapshot()` renders the document described in
`ctxrobot.observe.dash`. Criticality is derived from the active rules and the manifest's rule
definitions, so the board does not reach into the scheduler.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import (
    AllocationApplied,
    ContextChanged,
    RuleChanged,
    SampleDropped,
    TaskResult,
    TaskStateChanged,
)
from ctxrobot.observe.store import allocated_shares, percentiles, to_jsonable

WINDOW = 256  # results per task kept for percentiles and the sparkline
RECENT = 8  # results per task shown in full when a task is selected


class _TaskBoard:
    def __init__(self, deadline_ms: float) -> None:
        self.deadline_ms = deadline_ms
        self.state = "starting"
        self.detail = ""
        self.latencies: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)
        self.samples = 0
        self.misses = 0
        self.dropped = 0
        self.used: float | None = None
        self.allocation: dict[str, Any] = {}


class StatusBoard:
    def __init__(
        self,
        bus: EventBus,
        *,
        deadlines_ms: Mapping[str, float],
        critical_rules: Mapping[str, Sequence[str]],
        policy: str,
        config: str,
        run_dir: str,
    ) -> None:
        """`critical_rules[task]`: the rules whose `set` makes that task critical."""
        self._lock = threading.Lock()
        self._tasks = {name: _TaskBoard(ms) for name, ms in deadlines_ms.items()}
        self._critical_rules = {t: set(r) for t, r in critical_rules.items()}
        self._signals: dict[str, Any] = {}
        self._active: set[str] = set()
        self._fired: collections.deque[str] = collections.deque(maxlen=8)
        self._actuation: collections.deque[float] = collections.deque(maxlen=1024)
        self._actuation_count = 0
        self._started = time.monotonic()
        self._daemon = {"pid": os.getpid(), "policy": policy, "config": config, "run_dir": run_dir}
        for topic, handler in (
            ("task.result", self._on_result),
            ("task.dropped", self._on_drop),
            ("task.state", self._on_state),
            ("context", self._on_context),
            ("rule", self._on_rule),
            ("allocation", self._on_allocation),
        ):
            bus.subscribe(topic, handler, name=f"status:{topic}")

    def set_critical_rules(self, critical_rules: Mapping[str, Sequence[str]]) -> None:
        """After a rules reload: which rules make which task critical."""
        with self._lock:
            self._critical_rules = {t: set(r) for t, r in critical_rules.items()}

    def _on_result(self, event: TaskResult) -> None:
        ms = event.latency_s * 1000.0
        with self._lock:
            board = self._tasks.get(event.task)
            if board is None:
                return
            board.samples += 1
            board.misses += event.missed(board.deadline_ms)
            board.latencies.append(ms)
            board.recent.append(
                {"id": event.sample_id, "latency_ms": round(ms, 2), "result": dict(event.result)}
            )

    def _on_drop(self, event: SampleDropped) -> None:
        with self._lock:
            if event.task in self._tasks:
                self._tasks[event.task].dropped += 1

    def _on_state(self, event: TaskStateChanged) -> None:
        with self._lock:
            if event.task in self._tasks:
                self._tasks[event.task].state = event.state
                self._tasks[event.task].detail = event.detail

    def _on_context(self, event: ContextChanged) -> None:
        with self._lock:
            self._signals = dict(event.signals)

    def _on_rule(self, event: RuleChanged) -> None:
        with self._lock:
            if event.active:
                self._active.add(event.rule)
                self._fired.append(event.rule)
            else:
                self._active.discard(event.rule)

    def _on_allocation(self, event: AllocationApplied) -> None:
        shares = allocated_shares(event.allocation)
        with self._lock:
            for task, alloc in event.allocation.items():
                if task in self._tasks:
                    self._tasks[task].allocation = {**to_jsonable(alloc), "share": shares[task]}
            self._actuation.append(event.actuation_ms)
            self._actuation_count += 1

    def record_usage(self, task: str, used_share: float) -> None:
        """Measured CPU use of a task's container, as a fraction of the machine."""
        with self._lock:
            if task in self._tasks:
                self._tasks[task].used = used_share

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            tasks = {}
            for name, board in self._tasks.items():
                alloc = board.allocation
                tasks[name] = {
                    "state": board.state,
                    "detail": board.detail,
                    "critical": bool(self._critical_rules.get(name, set()) & self._active),
                    "rate_hz": alloc.get("rate_hz"),
                    "cpu": {
                        "allocated": alloc.get("share"),
                        "used": board.used,
                        "weight": alloc.get("weight"),
                        "frozen": bool(alloc.get("frozen", False)),
                    },
                    "latency_ms": percentiles(board.latencies, (50, 95, 99)),
                    "recent_latency_ms": [round(v, 2) for v in list(board.latencies)[-40:]],
                    "samples": board.samples,
                    "deadline_misses": board.misses,
                    "dropped": board.dropped,
                    "recent": list(board.recent),
                }
            actuation = list(self._actuation)
            pct = percentiles(actuation, (50, 99))
            return {
                "daemon": {**self._daemon, "uptime_s": round(time.monotonic() - self._started, 1)},
                "tasks": tasks,
                "context": {
                    "signals": dict(self._signals),
                    "active_rules": sorted(self._active),
                    "fired": list(self._fired),
                },
                "actuation_ms": {
                    "p50": pct["p50"],
                    "p99": pct["p99"],
                    "last": actuation[-1] if actuation else None,
                    "count": self._actuation_count,
                },
            }
