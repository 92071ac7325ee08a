"""The run database: round trip through a real EventBus and the observer pipeline, nothing
lost, summaries right, sources recorded."""

from __future__ import annotations

import io
import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from obsdata import CAMERA_STATES, MOVING, TASKS, record_run
from rich.console import Console

from ctxrobot.model.allocation import TaskAllocation
from ctxrobot.model.bus import EventBus
from ctxrobot.model.errors import UserError
from ctxrobot.model.events import AllocationApplied, TaskResult, TaskStateChanged, UsageSampled
from ctxrobot.observe.pipeline import ObserverPipeline
from ctxrobot.observe.readers import (
    print_summary,
    read_run,
    rule_intervals,
    summarize,
    summarize_window,
)
from ctxrobot.observe.store import RunStore
from ctxrobot.observe.values import allocated_shares


def _count(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_summary_matches_numpy(tmp_path: Path) -> None:
    rec = record_run(tmp_path / "run")
    summary = summarize(rec.run_dir)  # a run dir or the db file both work
    assert summary == summarize(rec.db_path)
    assert summary["policy"] == "ctx"
    assert summary["duration_s"] == 20.0
    assert list(summary["tasks"]) == [t[0] for t in TASKS]
    for name, lat in rec.latencies_ms.items():
        got = summary["tasks"][name]
        assert got["samples"] == len(lat)
        p50, p95, p99 = np.percentile(lat, [50, 95, 99])
        assert got["latency_ms"] == pytest.approx({"p50": p50, "p95": p95, "p99": p99}, rel=1e-6)
        deadline = rec.deadlines_ms[name]
        assert got["deadline_misses"] == sum(x > deadline for x in lat)
        assert got["dropped"] == rec.dropped[name]
    assert rec.dropped["signs"] > 0
    assert summary["tasks"]["slam"]["deadline_misses"] > 0  # slow while stopped
    p50, p99 = np.percentile(rec.actuation_ms, [50, 99])
    assert summary["actuation_ms"] == pytest.approx({"p50": p50, "p99": p99}, rel=1e-6)
    # Everything handed to the store was written.
    assert summary["recording"]["rows_lost"] == 0 and summary["recording"]["write_error"] is None
    assert summary["recording"]["rows_written"] > sum(len(v) for v in rec.latencies_ms.values())
    # The document is what `ctxrobot run --json` prints: it must serialise as is.
    assert json.loads(json.dumps(summary)) == summary


def test_nothing_lost_on_close(tmp_path: Path) -> None:
    """A burst far larger than one writer batch, closed right after publishing."""
    rec = record_run(tmp_path / "run", scale=20)
    n_results = sum(len(v) for v in rec.latencies_ms.values())
    assert n_results > RunStore.FLUSH_ROWS * 3
    assert _count(rec.db_path, "samples") == n_results
    assert _count(rec.db_path, "drops") == sum(rec.dropped.values())
    assert _count(rec.db_path, "allocations") == len(rec.actuation_ms)
    assert _count(rec.db_path, "usage") == 3 * len(rec.actuation_ms)
    assert _count(rec.db_path, "task_states") == 2 * len(TASKS)
    # close() folds the WAL into run.db and leaves WAL mode: the file alone is the whole run,
    # and reading it creates no side files.
    summarize(rec.db_path)
    assert sorted(p.name for p in rec.run_dir.iterdir()) == ["run.db"]


def test_rows_round_trip(tmp_path: Path) -> None:
    rec = record_run(tmp_path / "run")
    run = read_run(rec.run_dir)
    assert run.t0 == rec.t0
    assert run.run["id"] == "test-run" and run.run["ncpus"] == 4
    assert run.run["summary"] == {"note": "synthetic"}
    assert run.run["ended_utc"] is not None
    assert run.run["recording"]["rows_lost"] == 0
    assert [t["name"] for t in run.tasks] == ["slam", "signs", "speech"]
    slam = [s for s in run.samples if s["task"] == "slam"]
    assert slam[0]["result"] == {"i": 0, "pose": [1.0, 0.0, 0.1]}
    for s in slam:
        assert s["t_sensor"] <= s["t_start"] <= s["t_end"]
        assert s["deadline_miss"] == int(s["latency_ms"] > 100.0)
    assert run.context[1]["signals"]["motion"] == "moving"
    assert run.context[1]["changed"] == ["speed", "motion"]
    assert run.allocations[1]["allocation"]["slam"] == {
        "weight": 600,
        "share_cap": 0.6,
        "frozen": False,
    }
    # Usage rows: what each task used, and what the last allocation gave it.
    first = [u for u in run.usage if u["t"] == rec.t0]
    assert {u["task"]: u["allocated_share"] for u in first} == pytest.approx(
        {"slam": 0.34, "signs": 0.33, "speech": 0.33}
    )
    assert all(u["cpu_share"] == pytest.approx(0.8 * u["allocated_share"]) for u in run.usage)
    assert [(s["t"] - rec.t0, s["state"]) for s in run.source_states] == [
        (pytest.approx(t), state) for t, state in CAMERA_STATES
    ]
    assert rule_intervals(rec.run_dir) == {
        "slam-critical-while-moving": [pytest.approx(MOVING)],
        "speech-on-voice": [pytest.approx((8.0, 11.0))],
    }


def test_summarize_window_p99_while_critical(tmp_path: Path) -> None:
    rec = record_run(tmp_path / "run")
    ((start, end),) = rule_intervals(rec.run_dir)["slam-critical-while-moving"]
    window = summarize_window(rec.db_path, "slam", start, end)
    inside = [
        lat
        for lat, ts in zip(rec.latencies_ms["slam"], rec.sensor_t["slam"], strict=True)
        if start <= ts < end
    ]
    assert window["samples"] == len(inside) > 0
    assert window["latency_ms"]["p99"] == pytest.approx(np.percentile(inside, 99), rel=1e-6)
    # SLAM gets more CPU while critical, so its tail is lower than over the whole run.
    assert (
        window["latency_ms"]["p99"] < summarize(rec.db_path)["tasks"]["slam"]["latency_ms"]["p99"]
    )
    empty = summarize_window(rec.db_path, "slam", 100.0, 200.0)
    assert empty["samples"] == 0 and empty["latency_ms"]["p99"] is None


def test_live_reader_sees_flushed_rows_and_unknown_task(tmp_path: Path) -> None:
    """A reader may open the db while the writer is running (WAL); no deadline, no miss."""
    t0 = time.monotonic()
    bus = EventBus()
    store = RunStore.create(
        tmp_path / "live",
        run_id="live",
        t0=t0,
        policy="cfs",
        manifest_path=None,
        scenario_path=None,
        ncpus=2,
        tasks=[("slam", "img", None, None, None)],
    )
    pipeline = ObserverPipeline(bus)
    pipeline.add(store)
    for i in range(10):
        bus.publish("task.result", TaskResult("slam", i, t0 + i, t0 + i, t0 + i + 5.0))
    bus.publish("task.result", TaskResult("ghost", 0, t0, t0, t0 + 0.01))
    bus.publish("usage", UsageSampled(t0 + 1, {"slam": 0.25}))  # no allocation yet
    assert pipeline.drain()
    assert store.flush()
    live = summarize(store.path)
    assert live["tasks"]["slam"]["samples"] == 10
    assert live["tasks"]["slam"]["deadline_misses"] == 0  # no deadline configured
    assert live["tasks"]["ghost"]["samples"] == 1  # results of a task not in the manifest
    assert live["duration_s"] == pytest.approx(14.0)  # not closed yet: up to the last event
    assert live["actuation_ms"] == {"p50": None, "p99": None}
    assert live["recording"] is None  # recorded at close
    (usage,) = read_run(store.path).usage
    assert usage["cpu_share"] == 0.25 and usage["allocated_share"] is None
    pipeline.close()
    store.close(20.0, None)
    store.close(20.0, None)  # idempotent
    assert summarize(store.path)["duration_s"] == 20.0


def test_print_summary(tmp_path: Path) -> None:
    rec = record_run(tmp_path / "run")
    out = io.StringIO()
    print_summary(summarize(rec.db_path), Console(file=out, width=100, color_system=None))
    text = out.getvalue()
    for name, *_ in TASKS:
        assert name in text
    assert str(len(rec.latencies_ms["slam"])) in text
    assert "actuation latency: p50" in text


def test_allocations_of_real_task_allocations(tmp_path: Path) -> None:
    """The scheduler publishes `TaskAllocation` dataclasses; they are stored as JSON."""
    t0 = time.monotonic()
    bus = EventBus()
    store = RunStore.create(
        tmp_path / "run",
        run_id="alloc",
        t0=t0,
        policy="ctx",
        manifest_path=None,
        scenario_path=None,
        ncpus=2,
        tasks=[],
    )
    pipeline = ObserverPipeline(bus)
    pipeline.add(store)
    allocation = {
        "slam": TaskAllocation(weight=300, share_cap=None, frozen=False, rate_hz=None),
        "signs": TaskAllocation(weight=100, share_cap=None, frozen=False, rate_hz=2.0),
        "speech": TaskAllocation(weight=100, share_cap=0.1, frozen=True),
    }
    bus.publish("allocation", AllocationApplied(t0 + 1, t0 + 0.999, "ctx", "rule", allocation, 1))
    pipeline.close()
    store.close(2.0)
    stored = read_run(store.path).allocations[0]["allocation"]
    assert stored["signs"] == {
        "weight": 100,
        "share_cap": None,
        "frozen": False,
        "rate_hz": 2.0,
        "stale_after_s": None,
    }
    # Shares read the same from the dataclasses and from their stored form.
    expected = {"slam": 0.75, "signs": 0.25, "speech": 0.0}
    assert allocated_shares(allocation) == allocated_shares(stored) == expected
    with pytest.raises(UserError, match="its own run folder"):
        RunStore.create(
            tmp_path / "run",
            run_id="again",
            t0=t0,
            policy="ctx",
            manifest_path=None,
            scenario_path=None,
            ncpus=2,
            tasks=[],
        )


def test_a_row_sqlite_cannot_store_is_dropped_not_the_recording(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad event (a task of None, a detail SQLite cannot bind) costs its own row,
    counted and logged once; every other row is written (a numpy id is stored as a number)."""
    t0 = time.monotonic()
    bus = EventBus()
    store = RunStore.create(
        tmp_path / "run",
        run_id="bad",
        t0=t0,
        policy="ctx",
        manifest_path=None,
        scenario_path=None,
        ncpus=2,
        tasks=[],
    )
    pipeline = ObserverPipeline(bus)
    pipeline.add(store)
    for i in range(100):
        bus.publish("task.result", TaskResult("slam", np.int64(i), t0, t0, t0 + 0.01))
        if i == 40:
            detail = {"not": "text"}
            bus.publish("task.state", TaskStateChanged(t0, "slam", "crashed", detail))  # type: ignore[arg-type]
        if i == 60:
            bus.publish("task.result", TaskResult(None, i, t0, t0, t0 + 0.01))  # type: ignore[arg-type]
    assert pipeline.drain() and store.flush()
    assert store.write_error is None
    assert (store.rows_written, store.rows_lost) == (100, 2)
    pipeline.close()
    store.close(1.0)
    assert summarize(store.path)["tasks"]["slam"]["samples"] == 100
    assert summarize(store.path)["recording"]["rows_lost"] == 2
    assert [s["sample_id"] for s in read_run(store.path).samples] == list(range(100))
    dropped = [r for r in caplog.records if "cannot store" in r.getMessage()]
    assert len(dropped) == 1
