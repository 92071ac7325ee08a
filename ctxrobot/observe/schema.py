"""The run database's layout: `<run_dir>/run.db`, one SQLite file per run, shared by the
writer (`ctxrobot.observe.store`) and the readers (`ctxrobot.observe.readers`).

Times are host `time.monotonic()` seconds, exactly as the events carry them; `run.t0` is
the run's start on that clock, so readers show `t - t0`. Tables added after the first
release (`OPTIONAL_TABLES`) may be missing from older databases: readers treat a missing
one as empty.
"""

from __future__ import annotations

DB_NAME = "run.db"

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

#: What a run recorded with a retention window (`RunStore.create(keep_s=…)`, `--keep`) prunes
#: of each event table: rows older than the window on the table's time column. A table that
#: records a state keeps, of the rows before the window, the last one of each key (``()``:
#: of the whole table), because that state still holds when the window begins: the rule
#: that is active, the task that runs, the allocation in force, the context. ``None``: a
#: series of its own moments, pruned whole. `retention` holds the window, the time before
#: which rows are gone (`kept_from`) and how many went. Inputs of the scheduler core go too:
#: a run that pruned them cannot be replayed.
RETAINED: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "samples": ("t_sensor", None),
    "drops": ("t", None),
    "usage": ("t", None),
    "core_inputs": ("t", None),
    "context": ("t", ()),
    "allocations": ("t", ()),
    "rules": ("t", ("rule",)),
    "task_states": ("t", ("task",)),
    "source_states": ("t", ("source",)),
}
