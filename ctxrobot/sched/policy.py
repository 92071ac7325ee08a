"""CPU allocation policies: state in, decisions out.

A policy is a small object with one job: given the current context, each task's state and
the time, say what every task's CPU allocation should be. Policies do no I/O and never
read a clock (``now`` is passed in), so each one is unit-tested as a pure function and runs
the same in virtual time; :class:`ctxrobot.sched.state.SchedulerState` decides *when* to
ask, and the edge does the writing.

Four policies, all on the vocabulary of ARCHITECTURE.md ("share" is a fraction of the
whole machine):

- ``cfs``: the stock Linux scheduler, the baseline: touch nothing.
- ``static``: the manifest's weights and caps, whatever the context.
- ``weights``: the published prototype (Hadidi et al., EDGE 2023): each task's context
  weight normalised to a CPU fraction, recomputed every period (100 ms): it polls.
- ``ctx`` (the default): event-driven guarantees for critical tasks, see :class:`CtxPolicy`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ctxrobot.model.allocation import TaskAllocation
from ctxrobot.sched.rules import TaskDirective

__all__ = [
    "POLICIES",
    "SLACK_RELEASE_THRESHOLD",
    "WEIGHTS_MIN_FRACTION",
    "CfsPolicy",
    "CtxPolicy",
    "Policy",
    "StaticPolicy",
    "TaskState",
    "WeightsPolicy",
    "feedback_direction",
    "make_policy",
]

# Allocations are compared for equality to skip no-op writes, and shares end up as
# microsecond quotas: rounding to 1e-4 of the machine (100 µs per 1 s of 1 CPU) keeps
# floating-point noise from looking like a change without losing anything the kernel sees.
_SHARE_DIGITS = 4
_EPS = 1e-9
_MAX_WEIGHT = 10_000

#: A critical task gives share back only when even its slowest result in the feedback window
#: left at least this fraction of its deadline unused: releasing on a thinner margin would
#: trade one window's saving for the next window's misses.
SLACK_RELEASE_THRESHOLD = 0.5

#: The smallest fraction the ``weights`` policy gives a task (1 % of the machine).
WEIGHTS_MIN_FRACTION = 0.01

#: The policies a manifest's ``scheduler.policy`` may name.
POLICIES = ("cfs", "static", "weights", "ctx")


@dataclass(frozen=True, slots=True)
class TaskState:
    """What a policy knows about one task.

    Bounds come from the manifest (``cpu_min``/``cpu_max`` are machine fractions);
    ``directive`` is the merged demand of the active rules; ``demand`` is the machine
    fraction the task used over the last measurement window (None before the first one);
    ``results``/``misses``/``worst_slack`` summarise the deadline-feedback window
    (``worst_slack`` = min over results of ``1 − latency/deadline``, negative on a miss);
    ``frozen_since``/``thawed_at`` are when the task's current freeze began and when its
    last freeze ended (None if it never was); ``backlog_since`` is when the oldest sample it
    has not yet finished with was sensed (None: it has caught up); ``feeds_context``: its
    results make a context signal (the sign detector's ``sign_ahead``); ``stale_after_s``:
    the age past which the manifest lets a sample be skipped (``stale: skip``; None: never).
    """

    name: str
    cpu_min: float
    cpu_max: float
    weight: int = 100
    max_freeze_s: float | None = None
    deadline_s: float | None = None
    directive: TaskDirective = field(default_factory=TaskDirective)
    demand: float | None = None
    results: int = 0
    misses: int = 0
    worst_slack: float | None = None
    frozen_since: float | None = None
    thawed_at: float | None = None
    backlog_since: float | None = None
    feeds_context: bool = False
    stale_after_s: float | None = None

    @property
    def ceiling(self) -> float:
        """The effective cap: the tighter of the manifest's and the rules', never below
        ``cpu_min`` (the starvation guard outranks a rule's cap)."""
        cap = self.cpu_max if self.directive.cpu_max is None else self.directive.cpu_max
        return max(self.cpu_min, min(self.cpu_max, cap))

    @property
    def context_weight(self) -> int:
        return self.weight if self.directive.weight is None else self.directive.weight


class Policy(Protocol):
    """A CPU allocation policy: three verbs.

    ``allocate`` returns the allocation for the tasks it wants to set (tasks it leaves out
    are not touched); the core asks on every input that may change the answer and writes
    only what differs from what is applied. ``wake_at`` is the earliest time at which
    ``allocate`` would answer differently with no new input (a freeze running out, the next
    period of a polling policy), so the core needs no timer of its own; None: nothing pending.
    ``decided_at`` is the time the answer reflects: ``now`` for a policy that looks at its
    inputs on every call, the last poll for one that polls — so an allocation is reported
    against the input that caused it, not the moment it was finally written.
    """

    name: str

    def allocate(
        self, context: Mapping[str, object], tasks: Mapping[str, TaskState], now: float
    ) -> dict[str, TaskAllocation]: ...

    def wake_at(self, tasks: Mapping[str, TaskState], now: float) -> float | None: ...

    def decided_at(self, now: float) -> float: ...


def _cap(share: float) -> float | None:
    """A share as a cap: a cap of the whole machine is no cap at all."""
    return None if share >= 1.0 - _EPS else round(share, _SHARE_DIGITS)


class CfsPolicy:
    """The baseline: leave everything to the stock Linux scheduler."""

    name = "cfs"

    def allocate(
        self, context: Mapping[str, object], tasks: Mapping[str, TaskState], now: float
    ) -> dict[str, TaskAllocation]:
        return {}

    def wake_at(self, tasks: Mapping[str, TaskState], now: float) -> float | None:
        return None

    def decided_at(self, now: float) -> float:
        return now


class StaticPolicy:
    """The manifest's weights and caps, blind to context: what a careful integrator would
    configure once with ``docker run --cpu-shares --cpus``."""

    name = "static"

    def allocate(
        self, context: Mapping[str, object], tasks: Mapping[str, TaskState], now: float
    ) -> dict[str, TaskAllocation]:
        return {
            name: TaskAllocation(weight=t.weight, share_cap=_cap(t.cpu_max))
            for name, t in tasks.items()
        }

    def wake_at(self, tasks: Mapping[str, TaskState], now: float) -> float | None:
        return None

    def decided_at(self, now: float) -> float:
        return now


class WeightsPolicy:
    """The published prototype's method, reproduced as the comparison point.

    The context sets each task's CPU fraction: a task an active rule gives a ``share`` gets
    that fraction (all such shares scaled down together if they exceed the machine); the
    others split the rest in proportion to their context weight (the rules' ``weight``,
    else the manifest's). Each fraction is applied as both cap and weight (the prototype's
    ``docker update --cpus --cpu-shares``), and late samples are skipped where the manifest
    allows it, as the prototype skipped late frames. It **polls**: the allocation is
    recomputed at each period boundary (every ``period_s``, on the grid ``k × period_s``)
    from the context and task states of that moment; between two boundaries it keeps
    answering what it computed last, whatever happened since. No minimums, no freezing, no
    rates: that is the method compared. The one guard is a floor of
    :data:`WEIGHTS_MIN_FRACTION`: a zero quota means "unlimited" to Docker and the kernel.
    """

    name = "weights"

    def __init__(self, period_s: float = 0.1) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be positive, got {period_s}")
        self.period_s = period_s
        self._polled: dict[str, TaskAllocation] | None = None
        self._polled_at = -math.inf
        self._next_poll = -math.inf

    def allocate(
        self, context: Mapping[str, object], tasks: Mapping[str, TaskState], now: float
    ) -> dict[str, TaskAllocation]:
        if self._polled is None or now >= self._next_poll or set(self._polled) != set(tasks):
            self._polled = self._compute(tasks)
            self._polled_at = now
            self._next_poll = (math.floor(now / self.period_s + 1e-9) + 1) * self.period_s
        return dict(self._polled)

    def _compute(self, tasks: Mapping[str, TaskState]) -> dict[str, TaskAllocation]:
        claimed = {n: t.directive.share for n, t in tasks.items() if t.directive.share is not None}
        total = sum(claimed.values())
        scale = 1.0 / total if total > 1.0 else 1.0
        rest = 1.0 - total * scale
        others_weight = sum(t.context_weight for n, t in tasks.items() if n not in claimed)
        allocation: dict[str, TaskAllocation] = {}
        for name, t in tasks.items():
            share = claimed.get(name)
            fraction = (
                share * scale if share is not None else rest * t.context_weight / others_weight
            )
            fraction = max(fraction, WEIGHTS_MIN_FRACTION)
            allocation[name] = TaskAllocation(
                weight=min(_MAX_WEIGHT, max(1, round(fraction * 1000))),
                share_cap=_cap(fraction),
                stale_after_s=t.stale_after_s,  # the prototype skipped late frames
            )
        return allocation

    def wake_at(self, tasks: Mapping[str, TaskState], now: float) -> float | None:
        return self._next_poll if self._polled is not None else None

    def decided_at(self, now: float) -> float:
        return self._polled_at


def feedback_direction(task: TaskState) -> int:
    """+1 when the task missed a deadline in the feedback window, −1 when even its slowest
    result left ample slack, 0 otherwise (no deadline, no results, or a thin margin)."""
    if task.deadline_s is None or task.results == 0:
        return 0
    if task.misses > 0:
        return 1
    if task.worst_slack is not None and task.worst_slack >= SLACK_RELEASE_THRESHOLD:
        return -1
    return 0


class CtxPolicy:
    """Context-aware, event-driven allocation (ours).

    With no critical task, every task runs under its context weight and its cap. When the
    active rules (or unfinished critical work, see ``ctxrobot.sched.state``) make tasks
    critical:

    1. each critical task's **guarantee** is its rule ``share`` (at least ``cpu_min``, at most
       its cap), plus ``miss_boost`` if it missed a deadline in the feedback window or minus
       ``slack_release`` if it had ample slack;
    2. a critical task with **work waiting** (``backlog_since``) on a contended machine takes
       **everything above the others' minimums**: the others are capped (CFS quota) at their
       ``cpu_min``. Several backlogged critical tasks split that budget in proportion to their
       guarantees, each capped at its part: a hard split, because weights only act between
       tasks that meet on one CPU, and an envelope's quota is shared by every CPU;
    3. without waiting work, the others share what the guarantees leave: each is capped at a
       weighted fair part of it (water-filling between its ``cpu_min`` and its cap); the
       critical tasks also get weights matching their guarantee;
    4. when even the others' minimums do not fit (**short**), the least important are
       **frozen**, lowest weight first — never a task whose results make a context signal:
       frozen, it could not report the very change that should end its freeze;
    5. **starvation guard**: no running task is ever below its ``cpu_min``; a task frozen for
       ``max_freeze_s`` gets a ``thaw_s`` window at ``cpu_min`` before it may be frozen
       again; if its minimum then does not fit beside the guarantees, the guarantees shrink
       (never below their own ``cpu_min``) for that window;
    6. **shedding**: ``rate_hz`` from the rules is passed through to every task, and a task
       whose manifest says ``stale: skip`` has samples older than its deadline shed;
    7. **work conservation**: while every task's measured demand is known and together they
       use at most ``contended_above`` of the machine, nobody is short of CPU, so no cap or
       freeze holds a task back while cores idle; the weights still favour the critical tasks.
    """

    name = "ctx"

    def __init__(
        self,
        miss_boost: float = 0.1,
        slack_release: float = 0.05,
        thaw_s: float = 0.5,
        contended_above: float = 0.5,
    ) -> None:
        if miss_boost < 0 or slack_release < 0 or thaw_s <= 0:
            raise ValueError("miss_boost and slack_release must be >= 0 and thaw_s > 0")
        if not 0 <= contended_above <= 1:
            raise ValueError(f"contended_above must be in [0, 1], got {contended_above}")
        self.miss_boost = miss_boost
        self.slack_release = slack_release
        self.thaw_s = thaw_s
        self.contended_above = contended_above

    def contended(self, tasks: Iterable[TaskState]) -> bool:
        """Whether guarantees need enforcing: some task's demand is not measured yet, or all
        demands together exceed ``contended_above`` of the machine."""
        total = 0.0
        for t in tasks:
            if t.demand is None:
                return True
            total += t.demand
        return total > self.contended_above

    def guarantee(self, task: TaskState) -> float:
        """A critical task's guaranteed share, deadline feedback included."""
        base = task.cpu_min if task.directive.share is None else task.directive.share
        step = {1: self.miss_boost, -1: -self.slack_release, 0: 0.0}[feedback_direction(task)]
        return min(task.ceiling, max(task.cpu_min, base + step))

    def _freezable(self, task: TaskState, now: float) -> bool:
        if task.feeds_context:
            return False
        # Compared as `now < start + limit`, the very sum wake_at returns: with
        # `now - start < limit` float rounding could keep a task frozen at its wake-up time.
        if task.frozen_since is not None:
            limit = task.max_freeze_s
            return limit is None or now < task.frozen_since + limit
        return task.thawed_at is None or now >= task.thawed_at + self.thaw_s

    def allocate(
        self, context: Mapping[str, object], tasks: Mapping[str, TaskState], now: float
    ) -> dict[str, TaskAllocation]:
        critical = [t for t in tasks.values() if t.directive.critical]
        others = [t for t in tasks.values() if not t.directive.critical]
        if not critical:
            return {
                t.name: TaskAllocation(
                    weight=t.context_weight,
                    share_cap=_cap(t.ceiling),
                    rate_hz=t.directive.rate_hz,
                    stale_after_s=t.stale_after_s,
                )
                for t in others
            }
        contended = self.contended(tasks.values())
        guarantees = _fit({t.name: (t.cpu_min, self.guarantee(t)) for t in critical}, 1.0)
        frozen = self._to_freeze(others, guarantees, contended, now)
        running = [t for t in others if t.name not in frozen]
        needed = sum(t.cpu_min for t in running)
        # Tasks the guard keeps running must fit: shrink the guarantees if they don't.
        guarantees = _fit({t.name: (t.cpu_min, guarantees[t.name]) for t in critical}, 1.0 - needed)
        waiting = [t for t in critical if t.backlog_since is not None]
        if contended and waiting:
            parts, shares = _favour_waiting(critical, waiting, guarantees, running)
        else:
            parts = {t.name: _cap(t.ceiling) for t in critical}
            budget = 1.0 - sum(guarantees.values())
            shares = (
                _water_fill(
                    budget, [(t.name, t.cpu_min, t.ceiling, t.context_weight) for t in running]
                )
                if contended
                else {t.name: t.ceiling for t in running}
            )
        budget = 1.0 - sum(guarantees.values())
        others_weight = sum(t.context_weight for t in running)
        allocation = {
            t.name: TaskAllocation(
                weight=_critical_weight(t, guarantees[t.name], budget, others_weight),
                share_cap=parts[t.name],
                rate_hz=t.directive.rate_hz,
                stale_after_s=t.stale_after_s,
            )
            for t in critical
        }
        for t in others:
            is_frozen = t.name in frozen
            allocation[t.name] = TaskAllocation(
                weight=t.context_weight,
                share_cap=_cap(t.cpu_min if is_frozen else shares[t.name]),
                frozen=is_frozen,
                rate_hz=t.directive.rate_hz,
                stale_after_s=t.stale_after_s,
            )
        return allocation

    def _to_freeze(
        self,
        others: Iterable[TaskState],
        guarantees: Mapping[str, float],
        contended: bool,
        now: float,
    ) -> set[str]:
        """The least important others to freeze so that the rest fit at their minimums."""
        others = list(others)
        # Least important first; among equals, the one with the larger minimum (frees the
        # most budget per freeze), then the bigger measured consumer.
        candidates = sorted(
            (t for t in others if contended and self._freezable(t, now)),
            key=lambda t: (t.context_weight, -t.cpu_min, -(t.demand or 0.0), t.name),
        )
        frozen: set[str] = set()
        needed = sum(t.cpu_min for t in others)
        for t in candidates:
            if needed <= 1.0 - sum(guarantees.values()) + _EPS:
                break
            frozen.add(t.name)
            needed -= t.cpu_min
        return frozen

    def wake_at(self, tasks: Mapping[str, TaskState], now: float) -> float | None:
        times: list[float] = []
        for t in tasks.values():
            if t.frozen_since is not None and t.max_freeze_s is not None:
                times.append(t.frozen_since + t.max_freeze_s)
            elif t.thawed_at is not None:
                times.append(t.thawed_at + self.thaw_s)
        pending = [x for x in times if x > now]
        return min(pending, default=None)

    def decided_at(self, now: float) -> float:
        return now


def _favour_waiting(
    critical: Iterable[TaskState],
    waiting: Iterable[TaskState],
    guarantees: Mapping[str, float],
    running: Iterable[TaskState],
) -> tuple[dict[str, float | None], dict[str, float]]:
    """Critical tasks with work waiting take all but the others' minimums.

    Returns each critical task's cap (None: none) and each running other's share. One
    waiting task needs no cap of its own: the others' caps leave it the rest. Several are
    capped at their parts of that rest, in proportion to their guarantees; a critical task
    with nothing waiting keeps its guarantee as a cap until it has work again.
    """
    waiting_names = {t.name for t in waiting}
    shares = {t.name: t.cpu_min for t in running}
    idle = {t.name: guarantees[t.name] for t in critical if t.name not in waiting_names}
    rest = 1.0 - sum(shares.values()) - sum(idle.values())
    wanted = {t.name: guarantees[t.name] for t in waiting}
    total = sum(wanted.values())
    parts: dict[str, float | None] = {name: _cap(share) for name, share in idle.items()}
    for t in waiting:
        parts[t.name] = (
            _cap(t.ceiling)
            if len(wanted) == 1
            else _cap(min(t.ceiling, max(t.cpu_min, rest * wanted[t.name] / total)))
        )
    return parts, shares


def _fit(bounds: Mapping[str, tuple[float, float]], budget: float) -> dict[str, float]:
    """Shrink wanted shares (``lo``, ``want``) so their sum fits ``budget``, taking from each
    in proportion to its excess over ``lo``; never below ``lo`` even if that overflows."""
    excess = sum(want - lo for lo, want in bounds.values())
    overflow = sum(want for _, want in bounds.values()) - budget
    if overflow <= _EPS or excess <= _EPS:
        return {name: want for name, (_, want) in bounds.items()}
    keep = max(0.0, 1.0 - overflow / excess)
    return {name: lo + (want - lo) * keep for name, (lo, want) in bounds.items()}


def _water_fill(budget: float, items: Iterable[tuple[str, float, float, int]]) -> dict[str, float]:
    """Weighted max-min split of ``budget``: share_i = clamp(λ·w_i, lo_i, hi_i) with the
    largest λ whose shares still fit. Everyone gets at least ``lo`` (the caller made sure
    the minimums fit); when even the caps fit, everyone gets ``hi``."""
    items = list(items)
    if sum(hi for _, _, hi, _ in items) <= budget + _EPS:
        return {name: hi for name, _, hi, _ in items}

    def total(level: float) -> float:
        return sum(min(hi, max(lo, level * w)) for _, lo, hi, w in items)

    # total(λ) is non-decreasing and linear between the breakpoints lo/w and hi/w: find
    # the segment where it reaches the budget and solve it exactly. (This runs on every
    # context change, inside the sub-millisecond actuation path: no iterative search.)
    low, low_total = 0.0, total(0.0)
    level = low
    for point in sorted({b for _, lo, hi, w in items for b in (lo / w, hi / w)}):
        point_total = total(point)
        if point_total >= budget:
            span = point_total - low_total
            level = point if span <= 0 else low + (budget - low_total) * (point - low) / span
            break
        low, low_total = point, point_total
        level = point
    return {name: min(hi, max(lo, level * w)) for name, lo, hi, w in items}


def _critical_weight(task: TaskState, share: float, budget: float, others_weight: int) -> int:
    """A weight that wins ``share`` of contended CPU: w = share · W_others / budget. With
    every critical task weighted so, each gets w_i / (Σw_crit + W_others) = share_i when all
    contend (guarantees and ``budget`` add up to the machine). With no other task running,
    critical tasks contend only among themselves: w = share × 1000 splits the CPU in the
    ratio of their guarantees. Never below the task's own context weight; the others' caps
    are the hard guarantee, the weight covers what is uncapped."""
    if others_weight == 0:
        wanted = math.ceil(share * 1000)
    elif budget <= _EPS:
        return _MAX_WEIGHT
    else:
        wanted = math.ceil(share * others_weight / budget)
    return min(_MAX_WEIGHT, max(task.context_weight, wanted))


def make_policy(
    name: str,
    *,
    period_ms: float = 100.0,
    miss_boost: float = 0.1,
    slack_release: float = 0.05,
) -> Policy:
    """Build the policy a manifest's ``scheduler.policy`` names."""
    if name == "cfs":
        return CfsPolicy()
    if name == "static":
        return StaticPolicy()
    if name == "weights":
        return WeightsPolicy(period_ms / 1000.0)
    if name == "ctx":
        return CtxPolicy(miss_boost=miss_boost, slack_release=slack_release)
    raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
