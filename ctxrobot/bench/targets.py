"""The issue's targets, checked against one envelope's bench document.

Every check is computed from the document's own numbers; a target whose inputs are missing
(a policy not run, no critical sample) is reported as not measured, never as met.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal


@dataclasses.dataclass(frozen=True)
class Target:
    what: str
    bound: Literal["at most", "at least"]
    threshold: float
    value_of: Callable[[Mapping[str, Any]], float | None]

    def met(self, value: float) -> bool:
        return value <= self.threshold if self.bound == "at most" else value >= self.threshold


def _get(doc: Mapping[str, Any], key: str, policy: str) -> float | None:
    return (doc.get(key) or {}).get(policy)


def _worst_task_critical_vs_isolated(doc: Mapping[str, Any]) -> float | None:
    ratios = [
        st.get("critical_p99_vs_isolated")
        for st in (doc.get("tasks") or {}).get("ctx", {}).values()
    ]
    present = [r for r in ratios if r is not None]
    return max(present, default=None)


def _cfs_over_ctx(doc: Mapping[str, Any]) -> float | None:
    cfs, ctx = _get(doc, "critical_p99_ms", "cfs"), _get(doc, "critical_p99_ms", "ctx")
    return None if cfs is None or not ctx else cfs / ctx


def _extra_misses(doc: Mapping[str, Any]) -> float | None:
    ctx = _get(doc, "critical_miss_rate", "ctx")
    iso = _get(doc, "critical_miss_rate", "isolated")
    return None if ctx is None or iso is None else ctx - iso


#: The targets of issue 11 for `ctx`, at the headline load.
TARGETS: tuple[Target, ...] = (
    Target(
        "ctx critical p99 / the same task isolated (worst task)",
        "at most",
        1.25,
        _worst_task_critical_vs_isolated,
    ),
    Target("cfs critical p99 / ctx critical p99", "at least", 3.0, _cfs_over_ctx),
    Target("ctx critical miss rate − isolated's", "at most", 0.01, _extra_misses),
    Target("total time: cfs / ctx", "at least", 1.42, lambda d: _get(d, "speedup_vs_cfs", "ctx")),
    Target(
        "ctx worst quality loss vs isolated (relative)",
        "at most",
        0.05,
        lambda d: _get(d, "quality_loss_vs_isolated", "ctx"),
    ),
    Target("ctx actuation p99, ms", "at most", 0.5, lambda d: _get(d, "actuation_ms_p99", "ctx")),
    Target(
        "ctx runtime overhead, % of one core",
        "at most",
        2.0,
        lambda d: _get(d, "overhead_cpu_pct", "ctx"),
    ),
)


def check_targets(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each target with its threshold, the measured value and whether it is met (None: not
    measured)."""
    out = []
    for target in TARGETS:
        value = target.value_of(doc)
        out.append(
            {
                "target": target.what,
                "bound": target.bound,
                "threshold": target.threshold,
                "value": value,
                "met": None if value is None else target.met(value),
            }
        )
    return out
