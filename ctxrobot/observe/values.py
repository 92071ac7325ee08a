"""How observers read the values events carry: allocations (as the dataclasses the
scheduler publishes or their stored JSON form) and results (anything JSON-like a task
returns, numpy included), turned into what is stored and shown.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["allocated_shares", "allocation_field", "dumps", "to_jsonable"]


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
    """Compact JSON of an event's value, with `to_jsonable` for what JSON lacks."""
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
