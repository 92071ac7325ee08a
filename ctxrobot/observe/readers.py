"""Reading a recorded run: summaries, windows, rule intervals, the whole run for plots.

Readers are plain functions over a run folder or its `run.db`, so they work on finished
runs, live runs (WAL mode) and copies alike, always through a read-only connection. A path
that is not a readable run database — missing, unreadable, empty, not SQLite, truncated,
without the run tables — raises `RunDatabaseError` with one line saying what to give
instead, never a library traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from ctxrobot.model.events import CoreInput
from ctxrobot.observe.inputs import decode
from ctxrobot.observe.paths import RunDatabaseError
from ctxrobot.observe.schema import DB_NAME, OPTIONAL_TABLES, REQUIRED_TABLES

__all__ = [
    "RunData",
    "connect_ro",
    "db_path_of",
    "percentiles",
    "print_summary",
    "read_inputs",
    "read_run",
    "reading",
    "rule_intervals",
    "summarize",
    "summarize_window",
]

_GIVE_A_RUN = "give a run folder (the --out of `ctxrobot run`) or its run.db"


def db_path_of(run: str | Path) -> Path:
    """Accept a run directory or the database file itself."""
    p = Path(run)
    return p / DB_NAME if p.is_dir() else p


def _open(path: Path) -> sqlite3.Connection:
    """A read-only connection to `path`, after checking it can be one."""
    if not path.exists():
        where = f"no {DB_NAME} in {path.parent}" if path.name == DB_NAME else "no such file"
        raise RunDatabaseError(f"{path}: {where}: {_GIVE_A_RUN}")
    if path.is_dir():
        raise RunDatabaseError(f"{path} is a folder, not a database: {_GIVE_A_RUN}")
    if not os.access(path, os.R_OK):
        raise RunDatabaseError(
            f"{path}: permission denied: read it as its owner or a member of its group"
        )
    if path.stat().st_size == 0:
        raise RunDatabaseError(f"{path} is empty (the run never started): {_GIVE_A_RUN}")
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    return conn


def _problem(path: Path, err: sqlite3.Error) -> RunDatabaseError:
    """A SQLite error while reading `path`, as the one line a user gets."""
    if "not a database" in str(err):
        return RunDatabaseError(f"{path} is not an SQLite database: {_GIVE_A_RUN}")
    return RunDatabaseError(
        f"{path} is damaged or truncated ({err}): copy it again from where the run was recorded"
    )


def _tables(conn: sqlite3.Connection) -> frozenset[str]:
    return frozenset(r[0] for r in conn.execute("SELECT name FROM sqlite_master"))


def _check_tables(conn: sqlite3.Connection, path: Path) -> frozenset[str]:
    """The run tables `path` has; raises when a required one is missing."""
    tables = _tables(conn)
    missing = [t for t in REQUIRED_TABLES if t not in tables]
    if missing:
        raise RunDatabaseError(
            f"{path} is not a ctxrobot run database (no {', '.join(missing)} table): " + _GIVE_A_RUN
        )
    return tables


def connect_ro(run: str | Path) -> sqlite3.Connection:
    """A read-only connection to a checked run database (the caller closes it)."""
    return _connect_checked(db_path_of(run))


def _connect_checked(path: Path) -> sqlite3.Connection:
    conn = _open(path)
    try:
        _check_tables(conn, path)
    except sqlite3.Error as err:
        conn.close()
        raise _problem(path, err) from None
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def reading(run: str | Path) -> Iterator[sqlite3.Connection]:
    """`connect_ro` that closes the connection, and turns a SQLite error raised while
    reading (a truncated file fails only when its missing pages are reached) into a
    `RunDatabaseError`."""
    path = db_path_of(run)
    with contextlib.closing(_connect_checked(path)) as conn:
        try:
            yield conn
        except sqlite3.Error as err:
            raise _problem(path, err) from None


def percentiles(values: Sequence[float], qs: Sequence[int]) -> dict[str, float | None]:
    """`{"p50": …}` with numpy's default (linear) method; None when there is no data."""
    if len(values) == 0:
        return {f"p{q}": None for q in qs}
    arr = np.percentile(np.asarray(values, dtype=float), list(qs))
    return {f"p{q}": float(v) for q, v in zip(qs, arr, strict=True)}


def _run_row(conn: sqlite3.Connection) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM run").fetchone()
    if row is None:
        path = conn.execute("PRAGMA database_list").fetchone()[2]
        raise RunDatabaseError(
            f"{path} holds no run (it was created, the run never started): {_GIVE_A_RUN}"
        )
    return row


def _recording(run: sqlite3.Row) -> dict[str, Any] | None:
    """How the writer fared (rows written and lost), for runs recorded since it is kept."""
    text = dict(run).get("recording_json")
    return None if text is None else json.loads(text)


def _retention(conn: sqlite3.Connection, t0: float) -> dict[str, Any] | None:
    """The run's retention window (`--keep`) and what it pruned; None: the whole run is
    kept (or it was recorded before windows existed)."""
    if "retention" not in _tables(conn):
        return None
    row = conn.execute("SELECT keep_s, kept_from, rows_pruned FROM retention").fetchone()
    if row is None:
        return None
    keep_s, kept_from, pruned = row
    return {
        "keep_s": keep_s,
        # Seconds since t0 before which events were pruned (None: nothing was yet).
        "kept_from_s": None if kept_from is None else kept_from - t0,
        "rows_pruned": pruned,
    }


def _task_names(conn: sqlite3.Connection) -> list[str]:
    """Tasks from the manifest first (in its order), then any that only appear in data."""
    names = [r[0] for r in conn.execute("SELECT name FROM tasks ORDER BY rowid")]
    extra = conn.execute(
        "SELECT task FROM samples UNION SELECT task FROM drops ORDER BY 1"
    ).fetchall()
    return names + [r[0] for r in extra if r[0] not in names]


def _event_t(conn: sqlite3.Connection, agg: str) -> float | None:
    """`agg` ("min" or "max") over the times of every recorded event."""
    first = "t_end" if agg == "max" else "t_sensor"
    row = conn.execute(
        f"SELECT {agg}(t) FROM (SELECT {agg}({first}) AS t FROM samples"
        + "".join(
            f" UNION ALL SELECT {agg}(t) FROM {table}"
            for table in ("drops", "context", "rules", "allocations", "task_states", "usage")
        )
        + ")"
    ).fetchone()
    return row[0]


def _timeline(conn: sqlite3.Connection, run: sqlite3.Row) -> tuple[float, float]:
    """(start, end) in seconds since t0 that a plot of the run must cover.

    Normally (0, duration); wider when events were stamped before t0 (containers starting
    up) or after the recorded duration (results in flight at the end, take-down). A run
    whose retention window pruned its beginning starts where the window does (the state
    rows it kept from before hold from there on).
    """
    first, last = _event_t(conn, "min"), _event_t(conn, "max")
    t0 = run["t0"]
    start = min(0.0, 0.0 if first is None else first - t0)
    retention = _retention(conn, t0)
    if retention is not None and retention["kept_from_s"] is not None:
        start = retention["kept_from_s"]
    end = max(run["duration_s"] or 0.0, 0.0 if last is None else last - t0)
    return start, end


def summarize(db_path: str | Path) -> dict[str, Any]:
    """The `ctxrobot run --json` document, computed from the database.

    A run that is still going (or was killed before `close`) has no duration yet; it is
    then the time from t0 to the last recorded event. `recording` says how many rows the
    writer could not store (None for a live run, or one recorded before it was kept);
    `retention` the window a run that keeps one has kept (samples, drops and actuations
    then count only within it).
    """
    with reading(db_path) as conn:
        run = _run_row(conn)
        duration = run["duration_s"]
        if duration is None:
            last = _event_t(conn, "max")
            duration = 0.0 if last is None else max(0.0, last - run["t0"])
        tasks: dict[str, Any] = {}
        for name in _task_names(conn):
            lat = [
                r[0] for r in conn.execute("SELECT latency_ms FROM samples WHERE task = ?", (name,))
            ]
            misses = conn.execute(
                "SELECT count(*) FROM samples WHERE task = ? AND deadline_miss", (name,)
            ).fetchone()[0]
            dropped = conn.execute("SELECT count(*) FROM drops WHERE task = ?", (name,)).fetchone()
            tasks[name] = {
                "samples": len(lat),
                "latency_ms": percentiles(lat, (50, 95, 99)),
                "deadline_misses": misses,
                "dropped": dropped[0],
            }
        act = [r[0] for r in conn.execute("SELECT actuation_ms FROM allocations")]
        return {
            "policy": run["policy"],
            "duration_s": float(duration),
            "tasks": tasks,
            "actuation_ms": percentiles(act, (50, 99)),
            "recording": _recording(run),
            "retention": _retention(conn, run["t0"]),
        }


def summarize_window(db_path: str | Path, task: str, t_from: float, t_to: float) -> dict[str, Any]:
    """Latency of `task`'s samples whose sensor time lies in [t_from, t_to).

    Times are seconds since the run's start (as every reader shows them), e.g. one
    interval from `rule_intervals` to ask "what was SLAM's p99 while it was critical".
    """
    with reading(db_path) as conn:
        t0 = _run_row(conn)["t0"]
        rows = conn.execute(
            "SELECT latency_ms, deadline_miss FROM samples"
            " WHERE task = ? AND t_sensor >= ? AND t_sensor < ?",
            (task, t0 + t_from, t0 + t_to),
        ).fetchall()
    lat = [r[0] for r in rows]
    return {
        "task": task,
        "t_from": t_from,
        "t_to": t_to,
        "samples": len(lat),
        "latency_ms": percentiles(lat, (50, 95, 99)),
        "deadline_misses": sum(r[1] for r in rows),
    }


def rule_intervals(db_path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Per rule, the [start, end) intervals (seconds since t0) in which it was active.

    A rule still active at the end of the recording is closed at the end of the timeline.
    """
    with reading(db_path) as conn:
        run = _run_row(conn)
        t0 = run["t0"]
        _, end = _timeline(conn, run)
        rows = conn.execute("SELECT t, rule, active FROM rules ORDER BY t, rowid").fetchall()
    out: dict[str, list[tuple[float, float]]] = {}
    since: dict[str, float] = {}
    for t, rule, active in rows:
        out.setdefault(rule, [])
        if active and rule not in since:
            since[rule] = t - t0
        elif not active and rule in since:
            out[rule].append((since.pop(rule), t - t0))
    for rule, start in since.items():
        out[rule].append((start, max(start, end)))
    return out


@dataclasses.dataclass(frozen=True)
class RunData:
    """One run, loaded for plotting and tracing. Times stay on the monotonic clock."""

    run: dict[str, Any]
    tasks: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    drops: list[dict[str, Any]]
    context: list[dict[str, Any]]
    rules: list[dict[str, Any]]
    allocations: list[dict[str, Any]]
    task_states: list[dict[str, Any]]
    usage: list[dict[str, Any]]
    #: Live sensor sources opening, failing, reopening (empty for older runs).
    source_states: list[dict[str, Any]]

    @property
    def t0(self) -> float:
        return float(self.run["t0"])

    @property
    def task_names(self) -> list[str]:
        names = [t["name"] for t in self.tasks]
        seen = set(names)
        for row in (*self.samples, *self.drops, *self.task_states, *self.usage):
            if row["task"] not in seen:
                seen.add(row["task"])
                names.append(row["task"])
        return names

    #: Seconds since t0 the timeline covers (see `_timeline`).
    start: float
    end: float


def read_run(run: str | Path) -> RunData:
    """Load every table of a run; JSON columns are decoded (`x_json` → `x`)."""
    with reading(run) as conn:
        start, end = _timeline(conn, _run_row(conn))
        tables = _check_tables(conn, db_path_of(run))

        def rows(sql: str, *json_cols: str) -> list[dict[str, Any]]:
            out = []
            for r in conn.execute(sql):
                d = dict(r)
                for col in json_cols:
                    if col in d:
                        value = d.pop(col)
                        d[col.removesuffix("_json")] = None if value is None else json.loads(value)
                out.append(d)
            return out

        def optional(table: str) -> list[dict[str, Any]]:
            assert table in OPTIONAL_TABLES
            return rows(f"SELECT * FROM {table} ORDER BY t, rowid") if table in tables else []

        return RunData(
            run=rows("SELECT * FROM run", "summary_json", "recording_json")[0],
            tasks=rows("SELECT * FROM tasks ORDER BY rowid"),
            samples=rows("SELECT * FROM samples ORDER BY t_sensor", "result_json"),
            drops=rows("SELECT * FROM drops ORDER BY t"),
            context=rows("SELECT * FROM context ORDER BY t, rowid", "signals_json", "changed_json"),
            rules=rows("SELECT * FROM rules ORDER BY t, rowid"),
            allocations=rows("SELECT * FROM allocations ORDER BY t, rowid", "allocation_json"),
            task_states=rows("SELECT * FROM task_states ORDER BY t, rowid"),
            usage=rows("SELECT * FROM usage ORDER BY t, rowid"),
            source_states=optional("source_states"),
            start=start,
            end=end,
        )


def read_inputs(run: str | Path) -> list[CoreInput]:
    """Every input the run's scheduler core was handed, as events again, in the order it
    handled them, each with the ``now`` it was given: what a replay feeds a fresh core.

    Raises `RunDatabaseError` when the run has no recorded inputs (recorded before they
    were kept), when its retention window pruned the first ones, or when some are missing
    (the writer lost rows): a replay of part of a run would decide differently for no
    reason a reader could see.
    """
    path = db_path_of(run)
    with reading(path) as conn:
        if "core_inputs" not in _check_tables(conn, path):
            raise RunDatabaseError(
                f"{path} holds no scheduler inputs (recorded by an older version): "
                "record the run again to replay it"
            )
        retention = _retention(conn, _run_row(conn)["t0"])
        if retention is not None and retention["kept_from_s"] is not None:
            raise RunDatabaseError(
                f"{path} keeps only the last {retention['keep_s']:.0f} s of the run (--keep): "
                f"its scheduler inputs before {retention['kept_from_s']:.0f} s are pruned, and "
                "a replay needs them from the start; record without --keep to replay a run"
            )
        rows = conn.execute("SELECT t, seq, kind, body_json FROM core_inputs ORDER BY seq")
        try:
            inputs = [CoreInput(t, seq, decode(kind, body)) for t, seq, kind, body in rows]
        except (ValueError, TypeError) as err:  # UnknownInput and bad fields included
            raise RunDatabaseError(
                f"{path}: a recorded scheduler input cannot be read ({err}): replay it with "
                "the version that recorded it"
            ) from None
    gaps = [i for i, recorded in enumerate(inputs) if recorded.seq != i]
    if gaps:
        raise RunDatabaseError(
            f"{path}: scheduler inputs from #{gaps[0]} on are missing (the run's writer lost "
            "rows): the run cannot be replayed"
        )
    return inputs


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def print_summary(summary: Mapping[str, Any], console: Console) -> None:
    """The `summarize` document as a compact table (what `ctxrobot run` prints at the end)."""
    table = Table(
        title=f"policy {summary['policy']} · {summary['duration_s']:.1f} s",
        box=box.SIMPLE_HEAD,
    )
    for col in ("task", "samples", "p50 ms", "p95 ms", "p99 ms", "misses", "dropped"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, t in summary["tasks"].items():
        lat = t["latency_ms"]
        table.add_row(
            name,
            str(t["samples"]),
            _ms(lat["p50"]),
            _ms(lat["p95"]),
            _ms(lat["p99"]),
            str(t["deadline_misses"]),
            str(t["dropped"]),
        )
    console.print(table)
    act = summary["actuation_ms"]
    p50 = "–" if act["p50"] is None else f"{act['p50']:.3f}"
    p99 = "–" if act["p99"] is None else f"{act['p99']:.3f}"
    console.print(f"actuation latency: p50 {p50} ms · p99 {p99} ms")
    retention = summary.get("retention") or {}
    if retention.get("kept_from_s") is not None:
        console.print(
            f"retention: the figures above cover the last {retention['keep_s'] / 3600:g} h "
            f"kept (--keep); {retention['rows_pruned']} rows before "
            f"{retention['kept_from_s']:.0f} s were pruned"
        )
    recording = summary.get("recording") or {}
    if recording.get("rows_lost"):
        console.print(
            f"recording: {recording['rows_lost']} row(s) could not be written to the run "
            f"database ({recording.get('write_error')}); the numbers above leave them out"
        )
    # Reasons quote what a task sent: printed as they are, never read as markup.
    for task, why in (summary.get("failed_tasks") or {}).items():
        console.print(f"failed: task {task}: {why}", markup=False, highlight=False)
    for fault in summary.get("faults") or []:
        console.print(
            f"fault: task {fault['task']} {fault['fault']} at {fault['t_s']:.1f} s: "
            f"{fault['outcome']}",
            markup=False,
            highlight=False,
        )
