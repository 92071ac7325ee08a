"""The dashboard: `--once` text and the Textual app driven through its pilot.

The status documents follow the daemon's status contract (the daemon is not needed: the
dashboard only renders what `status_source` returns). `Feed` advances like a live daemon:
every call is a newer snapshot.
"""

from __future__ import annotations

import asyncio
import copy
import re
import threading
import time
from typing import Any

import numpy as np
import pytest
from textual.widgets import DataTable

from ctxrobot.model.allocation import TaskAllocation
from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import (
    AllocationApplied,
    ContextChanged,
    RuleChanged,
    SourceStateChanged,
    TaskResult,
    TaskStateChanged,
    UsageSampled,
)
from ctxrobot.observe.dash import SORTS, DashApp, recent_text, snapshot_text, sort_tasks, sparkline
from ctxrobot.observe.pipeline import ObserverPipeline
from ctxrobot.observe.status import StatusBoard

STATUS: dict[str, Any] = {
    "daemon": {
        "pid": 4321,
        "uptime_s": 12.3,
        "policy": "ctx",
        "config": "/etc/ctxrobot/robot.yaml",
        "run_dir": "/var/lib/ctxrobot/runs/r1",
    },
    "tasks": {
        "slam": {
            "state": "running",
            "critical": True,
            "rate_hz": None,
            "cpu": {"allocated": 0.5, "used": 0.42, "weight": 400, "frozen": False},
            "latency_ms": {"p50": 31.0, "p95": 60.2, "p99": 80.1},
            "recent_latency_ms": [30.1, 29.8, 35.0, 80.0],
            "samples": 1200,
            "deadline_misses": 3,
            "dropped": 1,
            "recent": [{"id": 1199, "latency_ms": 30.2, "result": {"pose": [1, 2, 0.1]}}],
        },
        "signs": {
            "state": "running",
            "critical": False,
            "rate_hz": 2.0,
            "cpu": {"allocated": 0.2, "used": 0.31, "weight": 100, "frozen": False},
            "latency_ms": {"p50": 90.5, "p95": 150.0, "p99": 240.7},
            "recent_latency_ms": [88.0, 91.0],
            "samples": 300,
            "deadline_misses": 12,
            "dropped": 40,
            "recent": [
                {"id": 298, "latency_ms": 88.0, "result": {"signs": []}},
                {"id": 299, "latency_ms": 91.0, "result": {"signs": ["stop"]}},
            ],
        },
        "speech": {
            "state": "starting",
            "critical": False,
            "rate_hz": None,
            "cpu": {"allocated": 0.1, "used": 0.0, "weight": 50, "frozen": True},
            "latency_ms": {"p50": None, "p95": None, "p99": None},
            "recent_latency_ms": [],
            "samples": 0,
            "deadline_misses": 0,
            "dropped": 0,
            "recent": [],
        },
    },
    "sources": {
        "camera": {"state": "open", "detail": "", "for_s": 12.0, "changes": 1},
        "lidar": {"state": "reopening", "detail": "no scan for 2 s", "for_s": 3.4, "changes": 3},
    },
    "context": {
        "signals": {"speed": 0.3, "motion": "moving", "voice_active": False},
        "active_rules": ["slam-critical-while-moving"],
        "fired": ["signs-on-camera-activity"],
    },
    "actuation_ms": {"p50": 0.08, "p99": 0.3, "last": 0.07, "count": 57},
}


class Feed:
    """A status source that advances on every call, like a daemon under load."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self) -> dict[str, Any]:
        with self.lock:
            self.calls += 1
            n = self.calls
        status = copy.deepcopy(STATUS)
        slam = status["tasks"]["slam"]
        slam["samples"] += n
        slam["recent"].append({"id": 1199 + n, "latency_ms": 30.0 + n, "result": {"n": n}})
        return status


def test_snapshot_text_shows_every_task_with_numbers() -> None:
    text = snapshot_text(STATUS, width=120)
    assert "\x1b[" not in text  # plain text, no colour codes
    assert all(len(line) <= 120 for line in text.splitlines())
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    for name in STATUS["tasks"]:
        assert name in lines
    assert re.search(r"slam\s+running\s+yes\s+50% / 42%\s+400\s+31\.0\s+60\.2\s+80\.1", text)
    assert re.search(r"signs\s+running @2Hz\s+–\s+20% / 31%\s+100\s+90\.5\s+150\.0\s+240\.7", text)
    assert re.search(r"\b1200\s+3\s+1\s*$", lines["slam"])
    assert re.search(r"\b300\s+12\s+40\s*$", lines["signs"])
    assert re.search(r"speech\s+starting \(frozen\)\s+–\s+10% / 0%\s+50\s+–\s+–\s+–", text)
    assert "pid 4321" in text and "policy ctx" in text
    assert "speed=0.3" in text and "motion=moving" in text and "voice_active=no" in text
    assert "slam-critical-while-moving" in text and "signs-on-camera-activity" in text
    assert "p50 0.080 ms · p99 0.300 ms · last 0.070 ms · 57 allocations" in text
    assert "sources  camera=open  lidar=reopening 3.4s (no scan for 2 s)" in text


def test_snapshot_of_an_empty_daemon() -> None:
    """A daemon that has just started (no tasks, no context yet) still renders."""
    text = snapshot_text({"daemon": {"pid": 1, "policy": "cfs"}}, width=80)
    assert "pid 1" in text and "no signals yet" in text and "none active" in text
    assert "sources  none reported" in text


def test_sparkline_and_sort() -> None:
    assert sparkline([1.0, 2.0, 3.0, 8.0]) == "▁▂▃█"
    assert sparkline([5.0, 5.0]) == "▁▁"
    assert sparkline(list(range(100)), width=4) == "▁▃▆█"
    assert sparkline([]) == ""
    tasks = STATUS["tasks"]
    labels = [label for label, _, _ in SORTS]
    assert sort_tasks(tasks, labels.index("task")) == ["signs", "slam", "speech"]
    assert sort_tasks(tasks, labels.index("p99")) == ["signs", "slam", "speech"]
    assert sort_tasks(tasks, labels.index("cpu used")) == ["slam", "signs", "speech"]
    assert sort_tasks(tasks, labels.index("state")) == ["signs", "slam", "speech"]


def _screen(app: DashApp) -> str:
    """The terminal as the user sees it, one line per row.

    Textual has no public plain-text screen dump (only SVG screenshots), so this reads the
    compositor's strips: the exact cells the driver would write to the terminal.
    """
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


async def _until(pilot: Any, cond: Any, what: str) -> None:
    """Let the app run until `cond()` holds (bounded by iterations, not by a clock)."""
    for _ in range(600):  # up to 30 s on a loaded machine; normally a few iterations
        if cond():
            return
        await pilot.pause(0.05)
    pytest.fail(f"dashboard never reached: {what}")


def test_app_keys_and_refresh() -> None:
    feed = Feed()

    async def drive() -> None:
        app = DashApp(feed, interval_s=0.05)
        async with app.run_test(size=(130, 36)) as pilot:
            table = app.query_one(DataTable)
            await _until(pilot, lambda: feed.calls >= 3, "three polls")
            await _until(pilot, lambda: "slam" in _screen(app), "task rows")
            screen = _screen(app)
            for name in STATUS["tasks"]:
                assert name in screen
            assert "pid 4321" in screen and "sort: task" in screen
            assert "240.7" in screen and "80.1" in screen
            assert "slam-critical-while-moving" in screen and "57 allocations" in screen
            assert "lidar=reopening" in screen
            # Sorted by name, cursor on the first row: signs' recent results are shown.
            assert app.selected == "signs"
            assert "signs: recent results" in screen and '{"signs":["stop"]}' in screen

            # Arrow down selects slam, whose results keep arriving with each poll.
            await pilot.press("down")
            await _until(pilot, lambda: app.selected == "slam", "slam selected")
            calls = feed.calls
            await _until(pilot, lambda: feed.calls > calls + 1, "more polls")
            await _until(pilot, lambda: f'{{"n":{feed.calls}}}' in _screen(app), "newest result")
            assert "slam: recent results" in _screen(app)

            # `s` cycles the sort: p99, misses, then CPU used (worst first), which moves slam
            # to the top. The selection follows slam to its new row.
            def order() -> list[str]:
                lines = _screen(app).splitlines()
                return [w[0] for line in lines if (w := line.split()) and w[0] in STATUS["tasks"]]

            await pilot.press("s")
            await _until(pilot, lambda: "sort: p99" in _screen(app), "sort by p99")
            assert order() == ["signs", "slam", "speech"]
            await pilot.press("s", "s")
            await _until(pilot, lambda: "sort: cpu used" in _screen(app), "sort by cpu used")
            assert order() == ["slam", "signs", "speech"]
            await _until(pilot, lambda: table.cursor_row == 0, "cursor follows slam")
            assert app.selected == "slam"
            await pilot.press("down", "enter")
            await _until(pilot, lambda: app.selected == "signs", "signs selected")
            await _until(pilot, lambda: "signs: recent results" in _screen(app), "signs detail")

            # `p` pauses: no more polls, the view says so; `p` again resumes.
            await pilot.press("p")
            await _until(pilot, lambda: "PAUSED" in _screen(app), "paused banner")
            calls = feed.calls
            await pilot.pause(0.3)  # six poll intervals
            assert feed.calls == calls
            await pilot.press("p")
            await _until(pilot, lambda: feed.calls > calls, "polling resumed")
            await _until(pilot, lambda: "PAUSED" not in _screen(app), "paused banner gone")

            await pilot.press("q")
            await pilot.pause()
        assert not app.is_running

    asyncio.run(drive())


def test_app_survives_a_failing_source() -> None:
    """The daemon going away shows in the header; the last good view stays."""
    state = {"fail": False, "calls": 0}

    def source() -> dict[str, Any]:
        state["calls"] += 1
        if state["fail"]:
            raise ConnectionRefusedError("control socket gone")
        return STATUS

    async def drive() -> None:
        app = DashApp(source, interval_s=0.05)
        async with app.run_test(size=(130, 36)) as pilot:
            await _until(pilot, lambda: "240.7" in _screen(app), "first status")
            state["fail"] = True
            await _until(pilot, lambda: "daemon unreachable" in _screen(app), "error banner")
            screen = _screen(app)
            assert "control socket gone" in screen and "240.7" in screen
            state["fail"] = False
            await _until(pilot, lambda: "daemon unreachable" not in _screen(app), "recovery")

    asyncio.run(drive())


def test_snapshot_of_the_daemons_status_board() -> None:
    """The daemon's real `StatusBoard`, fed on a real bus through the observer pipeline,
    renders with the right numbers."""
    bus = EventBus()
    board = StatusBoard(
        deadlines_ms={"slam": 100.0, "speech": 500.0},
        critical_rules={"slam": ["slam-critical-while-moving"]},
        policy="ctx",
        config="config/robot.yaml",
        run_dir="runs/x",
    )
    pipeline = ObserverPipeline(bus)
    pipeline.add(board)
    t0 = time.monotonic()
    latencies = [12.0, 30.0, 45.5, 150.0, 33.3]
    bus.publish("task.state", TaskStateChanged(t0, "slam", "running"))
    bus.publish("task.state", TaskStateChanged(t0, "speech", "exited", "exit code 137"))
    for i, ms in enumerate(latencies):
        bus.publish("task.result", TaskResult("slam", i, t0, t0, t0 + ms / 1000, {"i": i}))
    bus.publish("context", ContextChanged(t0, {"motion": "moving", "speed": 0.5}, ("motion",)))
    bus.publish("rule", RuleChanged(t0, "slam-critical-while-moving", True))
    alloc = {"slam": TaskAllocation(weight=400, share_cap=0.6), "speech": TaskAllocation()}
    bus.publish("allocation", AllocationApplied(t0, t0, "ctx", "rule", alloc, 0.25))
    bus.publish("usage", UsageSampled(t0, {"slam": 0.45}))
    bus.publish("source.state", SourceStateChanged(t0, "mic", "open"))
    bus.publish("source.state", SourceStateChanged(t0, "mic", "failed", "device unplugged"))
    assert pipeline.drain()
    status = board.snapshot()
    pipeline.close()
    bus.close()
    assert status["sources"]["mic"]["state"] == "failed"
    assert status["sources"]["mic"]["changes"] == 2
    text = snapshot_text(status)
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    slam = next(line for line in text.splitlines() if line.strip().startswith("slam"))
    assert re.search(rf"running\s+yes\s+60% / 45%\s+400\s+{p50:.1f}\s+{p95:.1f}\s+{p99:.1f}", slam)
    assert re.search(r"\b5\s+1\s+0$", slam)  # samples, misses (150 > 100), dropped
    speech = next(line for line in text.splitlines() if line.strip().startswith("speech"))
    # A weight-only task shows what its weight gives it: 100 / (400 + 100) of the machine.
    assert re.search(r"exited\s+–\s+20% / –\s+100\s+–\s+–\s+–", speech)
    # Why it exited shows with its recent results when the task is selected.
    assert "exited: exit code 137" in recent_text("speech", status["tasks"]["speech"]).plain
    assert "motion=moving" in text and "slam-critical-while-moving" in text
    assert "p50 0.250 ms" in text and "1 allocations" in text
    assert re.search(r"sources  mic=failed [\d.]+s \(device unplugged\)", text)
