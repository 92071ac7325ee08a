"""The run database: `<run_dir>/run.db`, one SQLite file per run.

Why it is shaped this way:

- The hot path (context → policy → actuator, task channels) must never wait on disk. The
  store therefore attaches to the bus as **queued** subscribers: the bus hands events to
  them on their own threads, and those callbacks only turn an event into a row tuple and
  append it to an in-memory batch. A single writer thread owns the SQLite connection
  and inserts each batch in one transaction (one fsync per batch, not per row).
- WAL mode lets `ctxrobot report`, `trace` and `summarize` read a run while the daemon is
  still writing it.
- Times are stored as host `time.monotonic()` seconds, exactly as the events carry them;
  `run.t0` is the run's start on that clock, so readers show `t - t0`.
- Nothing is lost on a clean shutdown (SIGTERM handler → `close`): `close` disposes the
  bus subscriptions (which drains their queues), then flushes the last batch.

Readers (`summarize`, `summarize_window`, `read_run`) are plain functions over a db path so
they work on finished runs, live runs and copies alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from reactivex.abc import DisposableBase
from rich import box
from rich.console import Console
from rich.table import Table

from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import (
    AllocationApplied,
    ContextChanged,
    RuleChanged,
    SampleDropped,
    TaskResult,
    TaskStateChanged,
)

log = logging.getLogger(__name__)

DB_NAME = "run.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    id TEXT PRIMARY KEY, started_utc TEXT NOT NULL, t0 REAL NOT NULL, policy TEXT NOT NULL,
    manifest_path TEXT, scenario_path TEXT, hostname TEXT, ncpus REAL,
    ended_utc TEXT, duration_s REAL, summary_json TEXT
);
CREATE TABLE IF NOT EXISTS tasks (
    name TEXT PRIMARY KEY, image TEXT, deadline_ms REAL, cpu_min REAL, cpu_max REAL
);
CREATE TABLE IF NOT EXISTS samples (
    task TEXT NOT NULL, sample_id INTEGER NOT NULL, t_sensor REAL NOT NULL,
    t_start REAL NOT NULL, t_end REAL NOT NULL, latency_ms REAL NOT NULL,
    deadline_miss INTEGER NOT NULL, result_json TEXT
);
CREATE INDEX IF NOT EXISTS samples_task_t ON samples (task, t_sensor);
CREATE TABLE IF NOT EXISTS drops (
    task TEXT NOT NULL, sample_id INTEGER NOT NULL, t REAL NOT NULL, reason TEXT
);
CREATE TABLE IF NOT EXISTS context (t REAL NOT NULL, signals_json TEXT, changed_json TEXT);
CREATE TABLE IF NOT EXISTS rules (t REAL NOT NULL, rule TEXT NOT NULL, active INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS allocations (
    t REAL NOT NULL, trigger_t REAL NOT NULL, policy TEXT, reason TEXT,
    allocation_json TEXT, actuation_ms REAL
);
CREATE TABLE IF NOT EXISTS task_states (
    t REAL NOT NULL, task TEXT NOT NULL, state TEXT NOT NULL, detail TEXT
);
CREATE TABLE IF NOT EXISTS usage (
    t REAL NOT NULL, task TEXT NOT NULL, cpu_share REAL, allocated_share REAL
);
"""

_INSERTS = {
    "samples": "INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    "drops": "INSERT INTO drops VALUES (?, ?, ?, ?)",
    "context": "INSERT INTO context VALUES (?, ?, ?)",
    "rules": "INSERT INTO rules VALUES (?, ?, ?)",
    "allocations": "INSERT INTO allocations VALUES (?, ?, ?, ?, ?, ?)",
    "task_states": "INSERT INTO task_states VALUES (?, ?, ?, ?)",
    "usage": "INSERT INTO usage VALUES (?, ?, ?, ?)",
}

# Tasks arrive as (name, image, deadline_ms, cpu_min, cpu_max).
TaskRow = tuple[str, str, float | None, float | None, float | None]


def to_jsonable(value: Any) -> Any:
    """`json.dumps` fallback for what results and allocations really contain.

    Allocations hold `TaskAllocation` dataclasses and results may hold numpy scalars or
    arrays; anything else is stored as its repr-ish string rather than failing the batch.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def dumps(value: Any) -> str:
    return json.dumps(value, default=to_jsonable, separators=(",", ":"))


def allocation_field(value: Any, name: str) -> Any:
    """A `TaskAllocation` field, whether it is the dataclass or its stored JSON form."""
    if isinstance(value, Mapping):
        return value.get(name)
    return getattr(value, name, None)


def allocated_shares(allocation: Mapping[str, Any]) -> dict[str, float]:
    """Share of the whole machine each task of an allocation may use.

    An explicit `share_cap` is exactly that; otherwise the task's weight over all unfrozen
    weights (what CFS gives it when every task is busy); a frozen task gets nothing.
    """
    live = {k: v for k, v in allocation.items() if not allocation_field(v, "frozen")}
    total = sum(float(allocation_field(v, "weight") or 0) for v in live.values())
    shares = {}
    for task, alloc in allocation.items():
        if allocation_field(alloc, "frozen"):
            shares[task] = 0.0
        elif allocation_field(alloc, "share_cap") is not None:
            shares[task] = float(allocation_field(alloc, "share_cap"))
        else:
            shares[task] = float(allocation_field(alloc, "weight") or 0) / total if total else 0.0
    return shares


class RunStore:
    """Writes one run's events into `<run_dir>/run.db` from a background writer thread."""

    #: The writer flushes at least this often, so live readers lag by at most this much.
    FLUSH_INTERVAL_S = 0.25
    #: ...or as soon as this many rows are pending, so bursts stay in bounded memory.
    FLUSH_ROWS = 2000
    #: Queue length of each bus subscription. The callbacks only build tuples, so they keep
    #: up easily; the margin covers scheduling hiccups on a loaded 2-core Pi.
    QUEUE_MAXLEN = 1 << 16

    def __init__(self, path: Path, conn: sqlite3.Connection, deadlines_ms: dict[str, float | None]):
        self.path = path
        self._conn = conn
        self._deadlines_ms = deadlines_ms
        self._pending: list[tuple[str, tuple[Any, ...]]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._urgent = False  # `flush` asked for a write now, not at the next interval
        self._closed = False
        self._subscriptions: list[DisposableBase] = []
        # Rows ever handed in / ever attempted by the writer, in order: `flush` waits for the
        # second to catch up with the first.
        self._added = 0
        self._handled = 0
        self.rows_written = 0
        self.write_errors = 0
        self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._writer.start()

    @classmethod
    def create(
        cls,
        run_dir: str | Path,
        *,
        run_id: str,
        t0: float,
        policy: str,
        manifest_path: str | Path | None,
        scenario_path: str | Path | None,
        ncpus: float,
        tasks: Iterable[TaskRow],
    ) -> RunStore:
        """Create the run directory and database, record the run and its tasks."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / DB_NAME
        if path.exists():
            # Appending a second run would make every reader's numbers a mix of two runs.
            raise FileExistsError(f"{path} exists: every run needs its own run directory")
        # The writer thread owns the connection after this method returns.
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode is crash-safe for the database file; only the last
        # transactions may be lost on power failure, which a robot log can accept.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        task_rows = [tuple(t) for t in tasks]
        with conn:
            conn.execute("BEGIN")
            conn.execute(
                "INSERT INTO run (id, started_utc, t0, policy, manifest_path, scenario_path,"
                " hostname, ncpus) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                    t0,
                    policy,
                    None if manifest_path is None else str(manifest_path),
                    None if scenario_path is None else str(scenario_path),
                    socket.gethostname(),
                    ncpus,
                ),
            )
            conn.executemany("INSERT INTO tasks VALUES (?, ?, ?, ?, ?)", task_rows)
        return cls(path, conn, {row[0]: row[2] for row in task_rows})

    # -- feeding -------------------------------------------------------------------------

    def attach(self, bus: EventBus) -> None:
        """Subscribe (queued) to every topic the run database records."""
        handlers: dict[str, Callable[[Any], None]] = {
            "task.result": self._on_result,
            "task.dropped": self._on_dropped,
            "task.state": self._on_state,
            "context": self._on_context,
            "rule": self._on_rule,
            "allocation": self._on_allocation,
        }
        for topic, handler in handlers.items():
            self._subscriptions.append(
                bus.subscribe(
                    topic,
                    handler,
                    name=f"store:{topic}",
                    inline=False,
                    maxlen=self.QUEUE_MAXLEN,
                )
            )

    def record_usage(self, t: float, task: str, cpu_share: float, allocated_share: float) -> None:
        """Measured CPU use and allocated share of one task (fractions of the whole machine)."""
        self._add("usage", (t, task, cpu_share, allocated_share))

    def _on_result(self, ev: TaskResult) -> None:
        latency_ms = ev.latency_s * 1000.0
        miss = ev.missed(self._deadlines_ms.get(ev.task))
        row = (ev.task, ev.sample_id, ev.t_sensor, ev.t_start, ev.t_end, latency_ms, int(miss))
        self._add("samples", (*row, dumps(ev.result)))

    def _on_dropped(self, ev: SampleDropped) -> None:
        self._add("drops", (ev.task, ev.sample_id, ev.t, ev.reason))

    def _on_state(self, ev: TaskStateChanged) -> None:
        self._add("task_states", (ev.t, ev.task, ev.state, ev.detail))

    def _on_context(self, ev: ContextChanged) -> None:
        self._add("context", (ev.t, dumps(ev.signals), dumps(list(ev.changed))))

    def _on_rule(self, ev: RuleChanged) -> None:
        self._add("rules", (ev.t, ev.rule, int(ev.active)))

    def _on_allocation(self, ev: AllocationApplied) -> None:
        row = (ev.t, ev.trigger_t, ev.policy, ev.reason, dumps(ev.allocation), ev.actuation_ms)
        self._add("allocations", row)

    def _add(self, table: str, row: tuple[Any, ...]) -> None:
        with self._cond:
            if self._closed:
                log.warning("run store closed; dropping a late %s row", table)
                return
            self._pending.append((table, row))
            self._added += 1
            if len(self._pending) >= self.FLUSH_ROWS:
                self._cond.notify_all()

    # -- writing -------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._stop or self._urgent or len(self._pending) >= self.FLUSH_ROWS,
                    self.FLUSH_INTERVAL_S,
                )
                self._urgent = False
                batch, self._pending = self._pending, []
                stopping = self._stop
            if batch:
                self._write(batch)
                with self._cond:
                    self._handled += len(batch)
                    self._cond.notify_all()
            if stopping:
                return

    def _write(self, batch: Sequence[tuple[str, tuple[Any, ...]]]) -> None:
        by_table: dict[str, list[tuple[Any, ...]]] = {}
        for table, row in batch:
            by_table.setdefault(table, []).append(row)
        try:
            with self._conn:
                self._conn.execute("BEGIN")
                for table, rows in by_table.items():
                    self._conn.executemany(_INSERTS[table], rows)
            self.rows_written += len(batch)
        except sqlite3.Error:
            # A full disk must not take the runtime down with it; the loss is logged.
            self.write_errors += 1
            log.exception("run store: failed to write %d rows to %s", len(batch), self.path)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Commit every row handed to the store so far, now (live readers, tests).

        Events still queued in the bus subscriptions are not included; `bus.drain()` first
        when they must be.
        """
        with self._cond:
            target = self._added
            self._urgent = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._handled >= target, timeout_s)

    def close(self, duration_s: float, summary: Mapping[str, Any] | None = None) -> None:
        """Drain the bus subscriptions, write every pending row and the run's end. Idempotent."""
        if self._closed:
            return
        for sub in self._subscriptions:
            sub.dispose()  # joins the subscriber thread after it has drained its queue
        self._subscriptions.clear()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._writer.join()
        with self._cond:
            self._closed = True
            batch, self._pending = self._pending, []
        if batch:
            self._write(batch)
        with self._conn:
            self._conn.execute("BEGIN")
            self._conn.execute(
                "UPDATE run SET ended_utc = ?, duration_s = ?, summary_json = ?",
                (
                    dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                    duration_s,
                    None if summary is None else dumps(summary),
                ),
            )
        # A finished run is read, copied and archived, not written: fold the WAL back into
        # run.db and leave WAL mode, so run.db alone is the whole run and read-only readers
        # need no -shm file next to it (they can read from a read-only copy).
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            mode = self._conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
        except sqlite3.OperationalError:
            mode = "wal"
        if mode != "delete":
            # A live reader still holds the db open; run.db is complete anyway after the
            # checkpoint, it just stays in WAL mode.
            log.info("run store: %s stays in WAL mode (a reader has it open)", self.path)
        self._conn.close()


# -- readers -----------------------------------------------------------------------------


def db_path_of(run: str | Path) -> Path:
    """Accept a run directory or the database file itself."""
    p = Path(run)
    return p / DB_NAME if p.is_dir() else p


def connect_ro(run: str | Path) -> sqlite3.Connection:
    """A read-only connection; fails clearly when the run has no database."""
    path = db_path_of(run)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no run database (expected {DB_NAME} in the run dir)")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    return conn


@contextlib.contextmanager
def reading(run: str | Path) -> Iterator[sqlite3.Connection]:
    """`connect_ro` that closes the connection (sqlite3's own `with` only commits)."""
    with contextlib.closing(connect_ro(run)) as conn:
        yield conn


def percentiles(values: Sequence[float], qs: Sequence[int]) -> dict[str, float | None]:
    """`{"p50": …}` with numpy's default (linear) method; None when there is no data."""
    if len(values) == 0:
        return {f"p{q}": None for q in qs}
    arr = np.percentile(np.asarray(values, dtype=float), list(qs))
    return {f"p{q}": float(v) for q, v in zip(qs, arr, strict=True)}


def _run_row(conn: sqlite3.Connection) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM run").fetchone()
    if row is None:
        raise ValueError("run database has no run row")
    return row


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
    up) or after the recorded duration (results in flight at the end, take-down).
    """
    first, last = _event_t(conn, "min"), _event_t(conn, "max")
    t0 = run["t0"]
    start = min(0.0, 0.0 if first is None else first - t0)
    end = max(run["duration_s"] or 0.0, 0.0 if last is None else last - t0)
    return start, end


def summarize(db_path: str | Path) -> dict[str, Any]:
    """The `ctxrobot run --json` document, computed from the database.

    A run that is still going (or was killed before `close`) has no duration yet; it is
    then the time from t0 to the last recorded event.
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
    """Load every table of a run; JSON columns are decoded."""
    with reading(run) as conn:
        start, end = _timeline(conn, _run_row(conn))

        def rows(sql: str, *json_cols: str) -> list[dict[str, Any]]:
            out = []
            for r in conn.execute(sql):
                d = dict(r)
                for col in json_cols:
                    d[col.removesuffix("_json")] = None if d[col] is None else json.loads(d[col])
                    del d[col]
                out.append(d)
            return out

        return RunData(
            run=rows("SELECT * FROM run", "summary_json")[0],
            tasks=rows("SELECT * FROM tasks ORDER BY rowid"),
            samples=rows("SELECT * FROM samples ORDER BY t_sensor", "result_json"),
            drops=rows("SELECT * FROM drops ORDER BY t"),
            context=rows("SELECT * FROM context ORDER BY t, rowid", "signals_json", "changed_json"),
            rules=rows("SELECT * FROM rules ORDER BY t, rowid"),
            allocations=rows("SELECT * FROM allocations ORDER BY t, rowid", "allocation_json"),
            task_states=rows("SELECT * FROM task_states ORDER BY t, rowid"),
            usage=rows("SELECT * FROM usage ORDER BY t, rowid"),
            start=start,
            end=end,
        )


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
