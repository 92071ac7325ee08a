"""The live status document the daemon serves to `ctxrobot dash`, `ps` and `ctl status`.

A `StatusBoard` is an observer of the pipeline (`ctxrobot.observe.pipeline`): its handlers
run on the pipeline's thread, never on the hot path, and keep fixed-size windows per task
(memory does not grow with the run's length). `snapshot()`, called from the control
server's thread, renders the document described in `ctxrobot.observe.dash`. Criticality is
derived from the active rules and the manifest's rule definitions, so the board does not
reach into the scheduler; the allocated share of a task comes from the last allocation the
board saw, its used share from the last usage reading.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

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
from ctxrobot.observe.readers import percentiles
from ctxrobot.observe.values import allocated_shares, to_jsonable

WINDOW = 256  # results per task kept for percentiles and the sparkline
RECENT = 8  # results per task shown in full when a task is selected
FIRED = 8  # rules that fired last, shown in the context line
ACTUATIONS = 1024  # allocations kept for the actuation percentiles


class _TaskBoard:
    def __init__(self, deadline_ms: float | None) -> None:
        self.deadline_ms = deadline_ms
        self.state = "starting"
        self.detail = ""
        self.latencies: collections.deque[float] = collections.deque(maxlen=WINDOW)
        # (sample id, latency ms, result) of the latest results
        self.recent: collections.deque[tuple[int, float, Mapping[str, Any]]] = collections.deque(
            maxlen=RECENT
        )
        self.samples = 0
        self.misses = 0
        self.dropped = 0
        self.used: float | None = None
        self.allocation: dict[str, Any] = {}


class _SourceBoard:
    def __init__(self, state: str, detail: str, t: float) -> None:
        self.state = state
        self.detail = detail
        self.since = t  # monotonic time of the last change
        self.changes = 1


class StatusBoard:
    """Live per-task, per-source and context state for the status document."""

    def __init__(
        self,
        *,
        deadlines_ms: Mapping[str, float | None],
        critical_rules: Mapping[str, Sequence[str]],
        policy: str,
        config: str,
        run_dir: str,
    ) -> None:
        """`critical_rules[task]`: the rules whose `set` makes that task critical."""
        self._lock = threading.Lock()
        self._tasks = {name: _TaskBoard(ms) for name, ms in deadlines_ms.items()}
        self._sources: dict[str, _SourceBoard] = {}
        self._critical_rules = {t: set(r) for t, r in critical_rules.items()}
        self._signals: dict[str, Any] = {}
        self._active: set[str] = set()
        self._fired: collections.deque[str] = collections.deque(maxlen=FIRED)
        self._actuation: collections.deque[float] = collections.deque(maxlen=ACTUATIONS)
        self._actuation_count = 0
        self._started = time.monotonic()
        self._daemon = {"pid": os.getpid(), "policy": policy, "config": config, "run_dir": run_dir}

    def handlers(self) -> Mapping[type, Handler]:
        return {
            TaskResult: self._on_result,
            SampleDropped: self._on_drop,
            TaskStateChanged: self._on_state,
            ContextChanged: self._on_context,
            RuleChanged: self._on_rule,
            AllocationApplied: self._on_allocation,
            UsageSampled: self._on_usage,
            SourceStateChanged: self._on_source,
        }

    def set_critical_rules(self, critical_rules: Mapping[str, Sequence[str]]) -> None:
        """After a rules reload: which rules make which task critical."""
        with self._lock:
            self._critical_rules = {t: set(r) for t, r in critical_rules.items()}

    # -- handlers (the pipeline's thread) ---------------------------------------------------

    def _on_result(self, event: TaskResult) -> None:
        ms = event.latency_s * 1000.0
        with self._lock:
            board = self._tasks.get(event.task)
            if board is None:
                return
            board.samples += 1
            board.misses += event.missed(board.deadline_ms)
            board.latencies.append(ms)
            # The result as it came (copied when a snapshot is taken, not per event).
            board.recent.append((event.sample_id, ms, event.result))

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

    def _on_usage(self, event: UsageSampled) -> None:
        with self._lock:
            for task, used in event.used.items():
                if task in self._tasks:
                    self._tasks[task].used = used

    def _on_source(self, event: SourceStateChanged) -> None:
        with self._lock:
            board = self._sources.get(event.source)
            if board is None:
                self._sources[event.source] = _SourceBoard(event.state, event.detail, event.t)
                return
            if board.state != event.state:
                board.since = event.t
            board.state, board.detail = event.state, event.detail
            board.changes += 1

    # -- the document (the control server's thread) -----------------------------------------

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            tasks = {name: self._task_doc(name, board) for name, board in self._tasks.items()}
            sources = {
                name: {
                    "state": s.state,
                    "detail": s.detail,
                    "for_s": round(max(0.0, now - s.since), 1),
                    "changes": s.changes,
                }
                for name, s in self._sources.items()
            }
            actuation = list(self._actuation)
            pct = percentiles(actuation, (50, 99))
            return {
                "daemon": {**self._daemon, "uptime_s": round(now - self._started, 1)},
                "tasks": tasks,
                "sources": sources,
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

    def _task_doc(self, name: str, board: _TaskBoard) -> dict[str, Any]:
        alloc = board.allocation
        return {
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
            "recent": [
                {"id": sample_id, "latency_ms": round(ms, 2), "result": dict(result)}
                for sample_id, ms, result in board.recent
            ],
        }
