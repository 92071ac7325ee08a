"""The run database's layout: `<run_dir>/run.db`, one SQLite file per run, shared by the
writer (`ctxrobot.observe.store`, which creates it with :func:`create_database`) and the
readers (`ctxrobot.observe.readers`).

Times are host `time.monotonic()` seconds, exactly as the events carry them; `run.t0` is
the run's start on that clock, so readers show `t - t0`. Tables added after the first
release (`OPTIONAL_TABLES`) may be missing from older databases: readers treat a missing
one as empty.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DB_NAME = "run.db"
WRITER_CACHE_KIB = 256  # the writer connection's page cache

SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    id TEXT PRIMARY KEY, started_utc TEXT NOT NULL, t0 REAL NOT NULL, policy TEXT NOT NULL,
    manifest_path TEXT, scenario_path TEXT, hostname TEXT, ncpus REAL,
    ended_utc TEXT, duration_s REAL, summary_json TEXT, recording_json TEXT
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
CREATE TABLE IF NOT EXISTS source_states (
    t REAL NOT NULL, source TEXT NOT NULL, state TEXT NOT NULL, detail TEXT
);
CREATE TABLE IF NOT EXISTS core_inputs (
    t REAL NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, body_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS retention (
    keep_s REAL NOT NULL, kept_from REAL, rows_pruned INTEGER NOT NULL
);
"""

#: Row inserts of the event tables, by table.
INSERTS = {
    "samples": "INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    "drops": "INSERT INTO drops VALUES (?, ?, ?, ?)",
    "context": "INSERT INTO context VALUES (?, ?, ?)",
    "rules": "INSERT INTO rules VALUES (?, ?, ?)",
    "allocations": "INSERT INTO allocations VALUES (?, ?, ?, ?, ?, ?)",
    "task_states": "INSERT INTO task_states VALUES (?, ?, ?, ?)",
    "usage": "INSERT INTO usage VALUES (?, ?, ?, ?)",
    "source_states": "INSERT INTO source_states VALUES (?, ?, ?, ?)",
    "core_inputs": "INSERT INTO core_inputs VALUES (?, ?, ?, ?)",
}

#: Tables every run database has had since the first release.
REQUIRED_TABLES = (
    "run",
    "tasks",
    "samples",
    "drops",
    "context",
    "rules",
    "allocations",
    "task_states",
    "usage",
)
#: Tables newer runs have; an older database without them reads as if they were empty.
OPTIONAL_TABLES = ("source_states", "core_inputs", "retention")


def create_database(
    path: Path,
    run_row: tuple[Any, ...],
    task_rows: Sequence[tuple[Any, ...]],
    keep_s: float | None,
) -> sqlite3.Connection:
    """Open the (empty) database file at `path` for the run store's writer: create the
    tables and record the run, its tasks and its retention window (`keep_s`, None: none).

    SQLite creates the -wal and -shm files with the database file's mode and owner.
    """
    # The writer thread owns the connection after `RunStore.create` returns.
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode is crash-safe for the database file; only the last
        # transactions may be lost on power failure, which a robot log can accept.
        conn.execute("PRAGMA synchronous=NORMAL")
        # The writer only appends: SQLite's default 2 MB page cache buys it nothing, and
        # filling it made a daemon's memory climb for its first five minutes (tools/soak).
        conn.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
        conn.executescript(SCHEMA)
        with conn:
            conn.execute("BEGIN")
            conn.execute(
                "INSERT INTO run (id, started_utc, t0, policy, manifest_path, scenario_path,"
                " hostname, ncpus) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                run_row,
            )
            conn.executemany("INSERT INTO tasks VALUES (?, ?, ?, ?, ?)", task_rows)
            if keep_s is not None:
                conn.execute("INSERT INTO retention VALUES (?, NULL, 0)", (keep_s,))
    except BaseException:
        conn.close()
        raise
    return conn
