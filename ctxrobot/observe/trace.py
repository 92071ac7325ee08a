"""`ctxrobot trace RUN_DIR`: a run as Chrome trace-event JSON, for ui.perfetto.dev.

Why a trace besides the plots: a timeline shows *causality* — which context change fired
which rule, when the allocation landed, and whether the next samples got faster — at
microsecond resolution and zoomable, which summary percentiles cannot.

Layout: one process "ctxrobot"; a "context" track carries context changes, rule changes
and allocations as instants, a "sources" track live sensors opening, failing and
reopening; then per task a track with its samples as complete slices
(`ph:"X"`, processing from t_start to t_end) and a "queue" track with each sample's wait
from t_sensor to t_start. Trace viewers require the slices of one track to nest, so when
a task's slices overlap (a pipelining task, several samples queued at once) the extra ones
go to additional lanes ("slam (2)", "slam queue (2)"…) instead of being dropped by the
viewer. Timestamps are µs since the run's t0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ctxrobot.observe.paths import OutputPathError, os_problem, output_file
from ctxrobot.observe.readers import RunData, db_path_of, read_run

PID = 1
CONTEXT_TID = 1
SOURCES_TID = 2  # task tracks start at 1000


def _us(t: float, t0: float) -> float:
    # Rounded to 0.1 µs: exact enough, and keeps the JSON small.
    return round((t - t0) * 1e6, 1)


def _meta(name: str, tid: int | None, value: str | int) -> dict[str, Any]:
    event: dict[str, Any] = {"ph": "M", "pid": PID, "name": name, "args": {}}
    if tid is not None:
        event["tid"] = tid
    event["args"]["name" if isinstance(value, str) else "sort_index"] = value
    return event


class _Tracks:
    """Thread ids per (task, kind, lane), named on first use, in a stable display order."""

    def __init__(self, events: list[dict[str, Any]], task_names: list[str]) -> None:
        self._events = events
        self._index = {name: i for i, name in enumerate(task_names)}
        self._lane_ends: dict[tuple[str, str], list[float]] = {}
        self._named: set[int] = set()

    def tid(self, task: str, kind: str, lane: int = 0) -> int:
        # Blocks of 1000 per task keep a task's lanes together and sorted in the viewer.
        tid = 1000 * (self._index[task] + 1) + (500 if kind == "queue" else 0) + lane
        if tid not in self._named:
            self._named.add(tid)
            label = task if kind == "exec" else f"{task} queue"
            if lane:
                label += f" ({lane + 1})"
            self._events.append(_meta("thread_name", tid, label))
            self._events.append(_meta("thread_sort_index", tid, tid))
        return tid

    def place(self, task: str, kind: str, ts: float, end: float) -> int:
        """The first lane free at `ts` (callers go in start order, so lanes stay minimal)."""
        ends = self._lane_ends.setdefault((task, kind), [])
        for lane, lane_end in enumerate(ends):
            if lane_end <= ts:
                ends[lane] = end
                return self.tid(task, kind, lane)
        ends.append(end)
        return self.tid(task, kind, len(ends) - 1)


def _slice(tid: int, name: str, cat: str, ts: float, end: float, args: dict[str, Any]) -> dict:
    return {
        "ph": "X",
        "pid": PID,
        "tid": tid,
        "name": name,
        "cat": cat,
        "ts": ts,
        "dur": round(max(0.0, end - ts), 1),
        "args": args,
    }


def build_trace(run: RunData) -> dict[str, Any]:
    """The trace document (`{"traceEvents": [...], "displayTimeUnit": "ms", ...}`)."""
    events: list[dict[str, Any]] = [
        _meta("process_name", None, "ctxrobot"),
        _meta("thread_name", CONTEXT_TID, "context"),
        _meta("thread_sort_index", CONTEXT_TID, 0),
    ]
    if run.source_states:
        events.append(_meta("thread_name", SOURCES_TID, "sources"))
        events.append(_meta("thread_sort_index", SOURCES_TID, SOURCES_TID))
    tracks = _Tracks(events, run.task_names)
    for name in run.task_names:  # every task gets its tracks, even without samples
        tracks.tid(name, "exec")
        tracks.tid(name, "queue")
    events += _sample_slices(run, tracks)
    events += _task_instants(run, tracks)
    events += _context_instants(run)
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "run_id": run.run["id"],
            "policy": run.run["policy"],
            "hostname": run.run["hostname"],
            "started_utc": run.run["started_utc"],
        },
    }


def _sample_slices(run: RunData, tracks: _Tracks) -> list[dict[str, Any]]:
    """Each sample's processing (t_start → t_end) and its wait (t_sensor → t_start)."""
    t0 = run.t0
    events = []
    for s in sorted(run.samples, key=lambda s: s["t_start"]):
        miss = bool(s["deadline_miss"])
        ts, end = _us(s["t_start"], t0), _us(s["t_end"], t0)
        args = {
            "sample_id": s["sample_id"],
            "latency_ms": round(s["latency_ms"], 3),
            "deadline_miss": miss,
            "result": s["result"],
        }
        name = f"{s['task']} #{s['sample_id']}" + (" MISS" if miss else "")
        events.append(
            _slice(tracks.place(s["task"], "exec", ts, end), name, "sample", ts, end, args)
        )
    for s in sorted(run.samples, key=lambda s: s["t_sensor"]):
        ts, end = _us(s["t_sensor"], t0), _us(s["t_start"], t0)
        tid = tracks.place(s["task"], "queue", ts, end)
        events.append(
            _slice(tid, f"wait #{s['sample_id']}", "queue", ts, end, {"sample_id": s["sample_id"]})
        )
    return events


def _task_instants(run: RunData, tracks: _Tracks) -> list[dict[str, Any]]:
    """Drops and lifecycle changes, on their task's track."""
    t0 = run.t0
    drops = [
        _instant(
            _us(d["t"], t0),
            tracks.tid(d["task"], "exec"),
            f"dropped #{d['sample_id']}",
            "drop",
            {"reason": d["reason"]},
        )
        for d in run.drops
    ]
    states = [
        _instant(
            _us(st["t"], t0),
            tracks.tid(st["task"], "exec"),
            st["state"],
            "state",
            {"detail": st["detail"]},
        )
        for st in run.task_states
    ]
    return drops + states


def _context_instants(run: RunData) -> list[dict[str, Any]]:
    """Context changes, rules and allocations on the context track; sources on theirs."""
    t0 = run.t0
    events = []
    for c in run.context:
        changed = c["changed"] or []
        label = ", ".join(f"{k}={c['signals'].get(k)}" for k in changed) or "context"
        args = {"signals": c["signals"], "changed": changed}
        events.append(_instant(_us(c["t"], t0), CONTEXT_TID, label, "context", args))
    for r in run.rules:
        label = f"rule {r['rule']} {'on' if r['active'] else 'off'}"
        args = {"rule": r["rule"], "active": bool(r["active"])}
        events.append(_instant(_us(r["t"], t0), CONTEXT_TID, label, "rule", args))
    for a in run.allocations:
        args = {
            "policy": a["policy"],
            "reason": a["reason"],
            "actuation_ms": a["actuation_ms"],
            "trigger_to_applied_ms": round((a["t"] - a["trigger_t"]) * 1e3, 3),
            "allocation": a["allocation"],
        }
        label = f"allocation: {a['reason']}"
        events.append(_instant(_us(a["t"], t0), CONTEXT_TID, label, "allocation", args))
    for st in run.source_states:
        label = f"{st['source']} {st['state']}"
        args = {"source": st["source"], "state": st["state"], "detail": st["detail"]}
        events.append(_instant(_us(st["t"], t0), SOURCES_TID, label, "source", args))
    return events


def _instant(ts: float, tid: int, name: str, cat: str, args: dict[str, Any]) -> dict[str, Any]:
    # Thread-scoped ("s":"t") so each instant sits on its own track, not across the process.
    return {
        "ph": "i",
        "s": "t",
        "pid": PID,
        "tid": tid,
        "name": name,
        "cat": cat,
        "ts": ts,
        "args": args,
    }


def write_trace(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the trace of the run in `run_dir` (a run folder or its run.db) to `out`, a file
    or a folder to write `trace.json` into (default: the run folder)."""
    doc = build_trace(read_run(run_dir))
    path = output_file(
        out if out is not None else db_path_of(run_dir).parent, "trace.json", "trace"
    )
    try:
        path.write_text(json.dumps(doc, separators=(",", ":")))
    except OSError as err:
        path.unlink(missing_ok=True)  # no half-written trace left behind
        raise OutputPathError(
            f"cannot write {path}: {os_problem(err)}: give --out a file on a disk with space"
        ) from None
    return path
