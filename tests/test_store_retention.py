"""run.db's retention window (`--keep`): a run that never ends keeps its last hours and the
state in force when they begin, and its file stops growing; a daemon's earlier run folders go
once their runs are older than the window.

Recorded through the production path (a real `EventBus`, the observer pipeline, the writer
thread, SQLite), in virtual time: the store cuts on the newest recorded event, not a clock.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import (
    AllocationApplied,
    ContextChanged,
    CoreInput,
    RuleChanged,
    SampleDropped,
    SourceStateChanged,
    TaskResult,
    TaskStateChanged,
    UsageSampled,
)
from ctxrobot.observe.paths import RunDatabaseError
from ctxrobot.observe.pipeline import ObserverPipeline
from ctxrobot.observe.readers import (
    print_summary,
    read_inputs,
    read_run,
    rule_intervals,
    summarize,
)
from ctxrobot.observe.report import write_report
from ctxrobot.observe.retention import expired_runs, remove_run
from ctxrobot.observe.store import RunStore
from ctxrobot.observe.trace import write_trace
from ctxrobot.sched.state import Tick
from tests.conftest import ctxrobot, skip_unless_ci

KEEP_S = 30.0
ALLOCATION = {"slam": {"weight": 500, "share_cap": None, "frozen": False}}


class Recorder:
    """A store with a retention window fed through a real bus, with a clock of its own."""

    def __init__(self, run_dir: Path, keep_s: float | None) -> None:
        self.t0 = time.monotonic()
        self.bus = EventBus()
        self.store = RunStore.create(
            run_dir,
            run_id="kept",
            t0=self.t0,
            policy="ctx",
            manifest_path=None,
            scenario_path=None,
            ncpus=2,
            tasks=[("slam", "img", 100.0, None, None), ("signs", "img", 200.0, None, None)],
            keep_s=keep_s,
        )
        self.pipeline = ObserverPipeline(self.bus)
        self.pipeline.add(self.store)
        self.seq = 0

    def at(self, s: float) -> float:
        return self.t0 + s

    def second(self, s: float, payload: str = "") -> None:
        """One second of a running robot: a SLAM result, a usage sample, two core inputs."""
        t = self.at(s)
        sample = int(s)
        result = {"pose": [s, 0.0, 0.0], "note": payload}
        self.bus.publish("task.result", TaskResult("slam", sample, t, t, t + 0.04, result))
        self.bus.publish("usage", UsageSampled(t, {"slam": 0.3}))
        for _ in range(2):
            self.bus.publish("core.input", CoreInput(t, self.seq, Tick()))
            self.seq += 1

    def settle(self) -> None:
        assert self.pipeline.drain()
        assert self.store.flush()

    def close(self, duration_s: float) -> None:
        self.pipeline.close()
        self.store.close(duration_s, None)
        self.bus.close()


def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_a_window_keeps_its_events_and_the_state_in_force_when_it_begins(
    tmp_path: Path,
) -> None:
    rec = Recorder(tmp_path / "run", KEEP_S)
    publish = rec.bus.publish
    for task in ("slam", "signs"):
        publish("task.state", TaskStateChanged(rec.at(0.0), task, "starting"))
        publish("task.state", TaskStateChanged(rec.at(0.5), task, "running"))
    publish("task.state", TaskStateChanged(rec.at(40.0), "signs", "crashed", "exit 1"))
    publish("task.state", TaskStateChanged(rec.at(41.0), "signs", "running"))
    publish("rule", RuleChanged(rec.at(5.0), "held-since-5-s", True))
    publish("rule", RuleChanged(rec.at(10.0), "over-at-20-s", True))
    publish("rule", RuleChanged(rec.at(20.0), "over-at-20-s", False))
    for t in (1.0, 30.0, 31.0):
        state = "failed" if t == 30.0 else "open"
        publish("source.state", SourceStateChanged(rec.at(t), "camera", state, ""))
    for t in range(0, 100, 10):
        signals = {"motion": "moving" if t % 20 else "stopped"}
        publish("context", ContextChanged(rec.at(t), signals, ("motion",)))
        publish("allocation", AllocationApplied(rec.at(t), rec.at(t), "ctx", f"at {t}", {}, 0.2))
    publish("task.dropped", SampleDropped("signs", 7, rec.at(7.0), "queue full"))
    publish("task.dropped", SampleDropped("signs", 90, rec.at(90.0), "queue full"))
    for s in range(100):
        rec.second(float(s))
    rec.settle()
    assert rec.store.prune()

    db = rec.store.path
    # The newest event is at 99 s (results end at 99.04 s but are cut on their sensor time).
    cut_s = 99.0 - KEEP_S
    sensed = [t - rec.t0 for (t,) in _rows(db, "SELECT t_sensor FROM samples")]
    assert min(sensed) == pytest.approx(cut_s) and len(sensed) == 31
    assert [t - rec.t0 for (t,) in _rows(db, "SELECT t FROM drops")] == [pytest.approx(90.0)]
    usage = [t - rec.t0 for (t,) in _rows(db, "SELECT t FROM usage")]
    assert min(usage) == pytest.approx(cut_s)
    # The state in force at 69 s: each task's last state, the camera reopened at 31 s, the
    # allocation and context of 60 s, and the rules as they stood.
    states = _rows(db, "SELECT task, state FROM task_states ORDER BY rowid")
    assert states == [("slam", "running"), ("signs", "running")]
    (camera,) = _rows(db, "SELECT t, state FROM source_states")
    assert camera[0] - rec.t0 == pytest.approx(31.0) and camera[1] == "open"
    first_allocation = _rows(db, "SELECT min(t) FROM allocations")[0][0] - rec.t0
    assert first_allocation == pytest.approx(60.0)
    first_context = _rows(db, "SELECT min(t) FROM context")[0][0] - rec.t0
    assert first_context == pytest.approx(60.0)
    assert read_run(db).start == pytest.approx(cut_s)  # plots begin with the window
    intervals = rule_intervals(db)
    assert intervals["held-since-5-s"][0][0] == pytest.approx(5.0)
    assert intervals["over-at-20-s"] == []
    inputs = [t - rec.t0 for (t,) in _rows(db, "SELECT t FROM core_inputs")]
    assert min(inputs) == pytest.approx(cut_s) and len(inputs) == 62

    summary = summarize(db)
    assert summary["tasks"]["slam"]["samples"] == 31
    assert summary["tasks"]["signs"]["dropped"] == 1
    retention = summary["retention"]
    assert retention["keep_s"] == KEEP_S
    assert retention["kept_from_s"] == pytest.approx(cut_s)
    assert retention["rows_pruned"] == rec.store.rows_pruned > 0
    with pytest.raises(RunDatabaseError, match=r"keeps only the last 30 s .*--keep"):
        read_inputs(db)
    out = io.StringIO()
    print_summary(summary, Console(file=out, width=200, color_system=None))
    assert "retention: the figures above cover the last 0.00833333 h kept" in out.getvalue()

    rec.close(100.0)
    assert [f.name for f in write_report(db.parent, tmp_path / "plots")] == [
        "latency.png",
        "cpu.png",
        "actuation.png",
    ]
    trace = json.loads(write_trace(db.parent, tmp_path / "trace.json").read_text())
    assert trace["traceEvents"]
    recording = summarize(db)["recording"]
    assert recording["rows_pruned"] == retention["rows_pruned"]
    assert recording["rows_lost"] == 0


def test_without_a_window_nothing_is_pruned(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / "run", None)
    for s in range(100):
        rec.second(float(s))
    rec.settle()
    assert not rec.store.prune()  # no window: nothing to prune to
    rec.close(100.0)
    summary = summarize(rec.store.path)
    assert summary["retention"] is None and summary["tasks"]["slam"]["samples"] == 100
    assert len(read_inputs(rec.store.path)) == 200


def _size(db: Path) -> int:
    wal = db.with_name(db.name + "-wal")
    return db.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def test_the_file_stops_growing_once_it_holds_a_window(tmp_path: Path) -> None:
    """Eight rounds of 200 s (about 2.5 MB each), a window of 400 s: the file holds about
    three rounds and reuses the pages the older ones leave."""
    rec = Recorder(tmp_path / "run", 400.1)  # not 400: no result sits on the window's edge
    payload = "x" * 2000
    sizes = []
    for round_ in range(8):
        for s in range(round_ * 200, (round_ + 1) * 200):
            for tenth in range(5):
                rec.second(s + tenth / 5, payload)
        rec.settle()
        assert rec.store.prune()
        sizes.append(_size(rec.store.path))
    kept = _rows(rec.store.path, "SELECT count(*) FROM samples")[0][0]
    rec.close(1600.0)
    print(f"\nrun.db (+WAL) after each 200 s round, window 400 s: {[s >> 10 for s in sizes]} KiB")
    assert kept == 5 * 400 + 1  # five results a second, from 1199.8 s to 1599.8 s
    # Without the window the file would double from round 4 to round 8; with it, it holds
    # the rounds it keeps at once (3), plus slack for SQLite's free pages and the WAL.
    assert sizes[-1] < 1.3 * sizes[3]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MB file system, unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        skip_unless_ci(f"cannot mount a tmpfs (needs root): {proc.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_a_window_records_on_a_small_disk_for_ever(small_disk: Path) -> None:
    """Twelve rounds of 100 s (about 2 MB each, 24 MB in all) on a 16 MB disk, a window of
    100 s: nothing is lost, because the file never holds more than the window."""
    rec = Recorder(small_disk / "run", 100.0)
    for round_ in range(12):
        for s in range(round_ * 100, (round_ + 1) * 100):
            for tenth in range(5):
                rec.second(s + tenth / 5, "x" * 2000)
        rec.settle()
        assert rec.store.prune()
    rec.close(1200.0)
    recording = summarize(rec.store.path)["recording"]
    assert recording["rows_lost"] == 0 and recording["write_error"] is None
    assert recording["rows_pruned"] > 0.75 * recording["rows_written"]


def test_keep_takes_a_positive_number_of_hours() -> None:
    for bad, why in (("0", "positive number of hours"), ("soon", "not a number of hours")):
        proc = ctxrobot("run", "--keep", bad)
        assert proc.returncode == 2, proc.stderr
        assert why in proc.stderr
    help_text = " ".join(ctxrobot("daemon", "--help").stdout.split())
    assert "--keep HOURS keep only the last HOURS of events in run.db" in help_text
    assert "such a run cannot be replayed" in help_text


# ------------------------------------------------------------------ run folders across restarts
NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)
DAY_S = 24 * 3600.0


def recorded_run(folder: Path, seconds: int, *, start: dt.datetime, ended: bool) -> Path:
    """A run folder recorded through the store (`seconds` of a robot), dated to `start`; a run
    that did not end is one whose process was killed: no end in its run row."""
    run = Recorder(folder, keep_s=None)
    for s in range(seconds):
        run.second(float(s))
    run.close(float(seconds))
    db = folder / "run.db"
    with sqlite3.connect(db) as conn:
        end = start + dt.timedelta(seconds=seconds)
        conn.execute(
            "UPDATE run SET started_utc = ?, ended_utc = ?",
            (start.isoformat(), end.isoformat() if ended else None),
        )
    return folder


def test_a_daemons_window_removes_the_run_folders_its_restarts_left(tmp_path: Path) -> None:
    """Each daemon start records into a new folder, so the window inside one run.db does not
    bound the disk across restarts: the folders beside the current one whose runs last
    recorded more than the window ago go, and nothing else does."""
    runs = tmp_path / "runs"
    runs.mkdir()
    hours_ago = lambda h: NOW - dt.timedelta(hours=h)  # noqa: E731
    # A name that a hand-made SQLite URI would cut short at "#" or "?".
    old = recorded_run(runs / "old #1?", 5, start=hours_ago(30), ended=True)
    # Killed 20 s into a run that started 24 h 11 s ago: its last event, 23 h 59 min 52 s
    # old, is inside the window, though the run started before it.
    killed_inside = recorded_run(runs / "killed-inside", 20, start=hours_ago(24.003), ended=False)
    killed_outside = recorded_run(runs / "killed-outside", 20, start=hours_ago(25), ended=False)
    recent = recorded_run(runs / "recent", 5, start=hours_ago(1), ended=True)
    # Recorded after "now": the clock went back since (a robot without a real-time clock).
    future = recorded_run(runs / "future", 5, start=NOW + dt.timedelta(hours=30), ended=True)
    with_notes = recorded_run(runs / "with-notes", 5, start=hours_ago(48), ended=True)
    (with_notes / "notes.txt").write_text("the day the lidar fell off\n")
    write_report(with_notes)
    write_trace(with_notes)
    (with_notes / "sockets" / "slam").mkdir(parents=True)
    current = recorded_run(runs / "current", 5, start=hours_ago(40), ended=False)
    not_a_database = runs / "not-a-database"
    not_a_database.mkdir()
    (not_a_database / "run.db").write_text("not SQLite\n")
    not_a_run = runs / "photos"
    not_a_run.mkdir()
    (not_a_run / "stop.jpg").write_bytes(b"jpeg")

    expired = expired_runs(runs, DAY_S, NOW, current)
    assert [run.folder for run in expired] == [with_notes, old, killed_outside]
    assert expired[2].last_recorded == hours_ago(25) + dt.timedelta(seconds=19)

    assert remove_run(old) == []
    assert not old.exists()
    assert remove_run(killed_outside) == []
    assert remove_run(with_notes) == ["notes.txt"]
    assert sorted(p.name for p in with_notes.iterdir()) == ["notes.txt"]
    left = {p.name for p in runs.iterdir()}
    assert left == {
        "killed-inside",
        "recent",
        "future",
        "with-notes",
        "current",
        "not-a-database",
        "photos",
    }
    for kept in (killed_inside, recent, future, current):
        assert (kept / "run.db").is_file()
    assert expired_runs(runs, DAY_S, NOW, current) == []
