"""A run database's retention window (`--keep`): what pruning keeps and the SQL that prunes.

The run store's writer thread calls :func:`prune` on its own connection once a period; this
module holds no thread and reads no clock: the cut is taken from the newest recorded event.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

__all__ = ["RETAINED", "prune"]

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


def prune(
    conn: sqlite3.Connection, keep_s: float, chunk_rows: int, counted: Callable[[int], None]
) -> None:
    """Delete every event row older than `keep_s` before the newest one, but the state in
    force at the cut (:data:`RETAINED`), in transactions of at most `chunk_rows` rows so
    that the WAL never holds a window's worth of deletions. Each chunk records the cut and
    its count in the `retention` table in the same transaction, and is handed to `counted`
    once committed: an interrupted prune leaves an exact record."""
    newest = [
        row[0]
        for table, (column, _) in RETAINED.items()
        for row in conn.execute(f"SELECT {column} FROM {table} ORDER BY rowid DESC LIMIT 1")
    ]
    if not newest:
        return
    cut = max(newest) - keep_s
    for table, (column, keys) in RETAINED.items():
        # Rows are appended as events arrive, so every row before the first one inside the
        # window is older than the cut. (A late row, older than rows before it, goes at the
        # next prune.)
        first = conn.execute(
            f"SELECT rowid FROM {table} WHERE {column} >= ? ORDER BY rowid LIMIT 1", (cut,)
        ).fetchone()
        if first is None:
            last = conn.execute(f"SELECT max(rowid) FROM {table}").fetchone()[0]
            if last is None:
                continue
            bound = last + 1
        else:
            bound = first[0]
        old = f"SELECT rowid FROM {table} WHERE rowid < :bound"
        if keys is not None:
            per_key = f" GROUP BY {', '.join(keys)}" if keys else ""
            old += (
                f" AND rowid NOT IN (SELECT max(rowid) FROM {table} WHERE rowid < :bound{per_key})"
            )
        delete = f"DELETE FROM {table} WHERE rowid IN ({old} LIMIT :chunk)"
        deleted = chunk_rows
        while deleted == chunk_rows:
            with conn:
                conn.execute("BEGIN")
                deleted = conn.execute(delete, {"bound": bound, "chunk": chunk_rows}).rowcount
                if deleted:
                    conn.execute(
                        "UPDATE retention SET kept_from = ?, rows_pruned = rows_pruned + ?",
                        (cut, deleted),
                    )
            counted(deleted)
