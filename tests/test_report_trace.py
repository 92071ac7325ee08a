"""`ctxrobot report` PNGs and `ctxrobot trace` JSON from a recorded run."""

from __future__ import annotations

import itertools
import json
import re
import struct
import time
from pathlib import Path

import pytest
from obsdata import CAMERA_STATES, MOVING, TASKS, VOICE, record_run

from ctxrobot.observe.readers import read_run
from ctxrobot.observe.report import allocated_from_allocations, context_bands, write_report
from ctxrobot.observe.store import RunStore
from ctxrobot.observe.trace import write_trace

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record_run(tmp_path_factory.mktemp("obs") / "run").run_dir


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_writes_pngs(run_dir: Path, tmp_path: Path) -> None:
    files = write_report(run_dir, tmp_path / "plots")
    assert [f.name for f in files] == ["latency.png", "cpu.png", "actuation.png"]
    for f in files:
        assert f.parent == tmp_path / "plots"
        width, height = _png_size(f)
        assert width >= 600 and height >= 300
        assert f.stat().st_size > 10_000  # a real plot, not an empty canvas
    # Default location: inside the run directory.
    assert write_report(run_dir)[0] == run_dir / "report" / "latency.png"


def test_context_bands(run_dir: Path) -> None:
    bands = context_bands(read_run(run_dir))
    assert bands["rule slam-critical-while-moving"] == [pytest.approx(MOVING)]
    assert bands["rule speech-on-voice"] == [pytest.approx(VOICE)]
    assert bands["motion"] == [pytest.approx(MOVING)]  # "stopped" is off, "moving" on
    assert bands["voice_active"] == [pytest.approx(VOICE)]
    assert "speed" not in bands


def test_allocated_share_fallback() -> None:
    """Without usage rows, CPU shares come from the allocations themselves."""
    rows = allocated_from_allocations(
        [
            {
                "t": 1.0,
                "allocation": {
                    "a": {"weight": 300, "share_cap": None, "frozen": False},
                    "b": {"weight": 100, "share_cap": None, "frozen": False},
                    "c": {"weight": 100, "share_cap": 0.25, "frozen": False},
                    "d": {"weight": 900, "share_cap": None, "frozen": True},
                },
            }
        ]
    )
    assert rows == [(1.0, "a", 0.6), (1.0, "b", 0.2), (1.0, "c", 0.25), (1.0, "d", 0.0)]


def test_report_of_empty_run(tmp_path: Path) -> None:
    """A run that recorded nothing (crashed at start) still gets its plots, not a traceback."""
    store = RunStore.create(
        tmp_path / "empty",
        run_id="empty",
        t0=time.monotonic(),
        policy="cfs",
        manifest_path=None,
        scenario_path=None,
        ncpus=2,
        tasks=[("slam", "img", 100.0, None, None)],
    )
    store.close(0.0)
    for f in write_report(tmp_path / "empty"):
        _png_size(f)
    trace = json.loads(write_trace(tmp_path / "empty").read_text())
    assert {e["args"].get("name") for e in trace["traceEvents"]} >= {"ctxrobot", "slam"}


def test_trace_structure(run_dir: Path, tmp_path: Path) -> None:
    path = write_trace(run_dir, tmp_path / "t" / "trace.json")
    doc = json.loads(path.read_text())
    assert doc["displayTimeUnit"] == "ms"
    events = doc["traceEvents"]
    assert isinstance(events, list)
    for e in events:
        assert e["ph"] in {"M", "X", "i"}
        assert e["pid"] == 1
        if e["ph"] != "M":
            assert isinstance(e["ts"], float | int) and e["ts"] >= 0
    meta = [e for e in events if e["ph"] == "M"]
    assert [e["args"]["name"] for e in meta if e["name"] == "process_name"] == ["ctxrobot"]
    tracks = {e["args"]["name"]: e["tid"] for e in meta if e["name"] == "thread_name"}
    for name, *_ in TASKS:
        assert name in tracks and f"{name} queue" in tracks
    assert "context" in tracks
    assert len(set(tracks.values())) == len(tracks)

    slices = [e for e in events if e["ph"] == "X"]
    assert all(e["dur"] >= 0 for e in slices)
    # Viewers drop slices that overlap on one track without nesting: lanes prevent that.
    by_tid: dict[int, list[dict]] = {}
    for e in slices:
        by_tid.setdefault(e["tid"], []).append(e)
    for lane in by_tid.values():
        lane.sort(key=lambda e: e["ts"])
        for a, b in itertools.pairwise(lane):
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-6
    run = read_run(run_dir)
    for name, *_ in TASKS:
        work_lanes = {
            t for label, t in tracks.items() if re.fullmatch(rf"{name}( \(\d+\))?", label)
        }
        wait_lanes = {
            t for label, t in tracks.items() if re.fullmatch(rf"{name} queue( \(\d+\))?", label)
        }
        work = [e for e in slices if e["tid"] in work_lanes]
        wait = [e for e in slices if e["tid"] in wait_lanes]
        n = sum(s["task"] == name for s in run.samples)
        assert len(work) == len(wait) == n > 0
        assert {e["cat"] for e in work} == {"sample"} and {e["cat"] for e in wait} == {"queue"}
    # The synthetic SLAM samples overlap (10 Hz, up to 200 ms): they needed a second lane.
    assert "slam (2)" in tracks
    slam0 = next(s for s in run.samples if s["task"] == "slam")
    first = next(e for e in slices if e["tid"] == tracks["slam"])
    assert first["ts"] == pytest.approx((slam0["t_start"] - run.t0) * 1e6, abs=0.2)
    assert first["args"]["sample_id"] == slam0["sample_id"]
    assert first["args"]["latency_ms"] == pytest.approx(slam0["latency_ms"], abs=1e-3)
    assert any(e["args"]["deadline_miss"] for e in slices if e["cat"] == "sample")

    instants = [e for e in events if e["ph"] == "i"]
    on_context = [e for e in instants if e["tid"] == tracks["context"]]
    assert {e["cat"] for e in on_context} == {"context", "rule", "allocation"}
    rules = [e for e in on_context if e["cat"] == "rule"]
    assert len(rules) == 4
    rule_on = next(e for e in rules if e["args"]["active"])
    assert rule_on["ts"] == pytest.approx(MOVING[0] * 1e6, abs=1)
    allocs = [e for e in on_context if e["cat"] == "allocation"]
    assert len(allocs) == len(run.allocations)
    assert all("actuation_ms" in e["args"] and "allocation" in e["args"] for e in allocs)
    drops = [e for e in instants if e["cat"] == "drop"]
    assert drops and all(e["tid"] == tracks["signs"] for e in drops)
    sources = [e for e in instants if e["cat"] == "source"]
    assert [e["name"] for e in sources] == [f"camera {state}" for _, state in CAMERA_STATES]
    assert {e["tid"] for e in sources} == {tracks["sources"]}
