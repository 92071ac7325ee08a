"""The event-driven scheduler: context → rules → policy → actuator, within the event's call.

:class:`ContextScheduler` keeps the :class:`SchedulerState` (context, task states, deadline
windows, what was applied), asks the policy for an allocation when an input changes and
hands it to the actuator. It subscribes **inline** to ``context`` and ``task.result``: the
decision and the cgroup writes happen in the thread that published the context change, so
the latency from a sensor event to the write is the cost of the chain itself, not a
polling period. It publishes ``RuleChanged`` and ``AllocationApplied``; ``actuation_ms``
is measured with the injected ``clock`` from the triggering event's time to after the
write, so virtual-time tests see exact numbers.

When a decision is taken:

- event-driven policies (``period_s`` None): on every context change, deadline-feedback
  verdict change, rule hold expiry (``RuleOutcome.expires_at``), policy wake-up
  (``Policy.wake_at``: a freeze running out), a task's container stopping or (re)starting
  (``task.state``: only running tasks are allocated) and ``reload``. Only an allocation that
  differs from the last one applied is written, so a context change the rules do not care
  about costs one policy call and nothing else.
- periodic policies (the prototype's ``weights``): every ``period_s``, unconditionally, as
  the prototype did; context changes only update the state, and the next period's write
  reports the earliest unapplied change as its trigger.

Threads: inline handlers run under the bus lock; timers run on the rx scheduler's thread
but also under the bus lock (``ctxrobot.context.SerializedScheduler``), so decisions are
ordered with deliveries and every path takes locks in one order: bus, then the scheduler's
own lock, then whatever the actuator takes. Events are published after the scheduler's
lock is released. Only demand sampling (cgroup file reads) runs outside the bus lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from reactivex.abc import SchedulerBase
from reactivex.disposable import CompositeDisposable, SerialDisposable
from reactivex.scheduler import EventLoopScheduler
from reactivex.scheduler.periodicscheduler import PeriodicScheduler

from ctxrobot.actuate.actuator import Allocation, TaskAllocation
from ctxrobot.manifest.schema import Manifest, TaskSpec
from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import (
    AllocationApplied,
    ContextChanged,
    RuleChanged,
    TaskResult,
    TaskStateChanged,
)
from ctxrobot.sched.context import ContextTracker, SerializedScheduler
from ctxrobot.sched.policy import Policy, TaskState, feedback_direction, make_policy
from ctxrobot.sched.rules import RuleBook, RuleOutcome, RuleSpec, TaskDirective

__all__ = ["ActuatorLike", "ContextScheduler", "SchedulerState", "build_scheduler", "task_state"]

log = logging.getLogger(__name__)

#: Delay before re-evaluating a rule hold that had not yet expired at its expiry time.


class ActuatorLike(Protocol):
    """What the scheduler drives: ``ctxrobot.actuator.Actuator`` or a wrapper of it."""

    def apply(self, allocation: Allocation) -> object: ...

    def thaw_all(self) -> list[str]: ...


def task_state(spec: TaskSpec) -> TaskState:
    """A task's initial state from its manifest entry."""
    r = spec.resources
    return TaskState(
        name=spec.name,
        cpu_min=r.cpu_min,
        cpu_max=r.cpu_max,
        weight=r.weight,
        max_freeze_s=r.max_freeze_s,
        deadline_s=spec.deadline_ms / 1000.0,
    )


@dataclass
class _Usage:
    t: float
    ns: int


class SchedulerState:
    """Everything a policy is asked about, and the bookkeeping that keeps it current.

    Mutated only by :class:`ContextScheduler` (under its lock); the policy sees
    ``context`` and the immutable ``tasks`` snapshot, never this object.
    """

    def __init__(self, tasks: Sequence[TaskState], feedback_window_s: float) -> None:
        self.context: dict[str, object] = {}
        self.tasks: dict[str, TaskState] = {t.name: t for t in tasks}
        self.window_s = feedback_window_s
        self.applied: dict[str, TaskAllocation] = {}
        # Tasks whose container runs; the others are left out of every allocation.
        self.running: set[str] = set(self.tasks)
        self._results: dict[str, deque[tuple[float, float]]] = {t.name: deque() for t in tasks}
        self._usage: dict[str, _Usage] = {}

    def live_tasks(self) -> dict[str, TaskState]:
        """What the policy allocates among: the tasks whose containers are running."""
        return {name: t for name, t in self.tasks.items() if name in self.running}

    def set_running(self, task: str, running: bool) -> bool:
        """Record a task's container state; True if that changes what is allocated."""
        if task not in self.tasks or (task in self.running) == running:
            return False
        if running:
            self.running.add(task)
        else:
            self.running.discard(task)
        # A (re)started container starts from Docker's defaults, not from what we wrote;
        # a stopped one is no longer frozen.
        self.applied.pop(task, None)
        self.tasks[task] = replace(self.tasks[task], frozen_since=None)
        return True

    def set_directives(self, directives: Mapping[str, TaskDirective]) -> None:
        for name, task in self.tasks.items():
            self.tasks[name] = replace(task, directive=directives.get(name, TaskDirective()))

    def record_result(self, ev: TaskResult) -> bool:
        """Add a result to its task's feedback window; True if the verdict changed."""
        task = self.tasks.get(ev.task)
        if task is None or task.deadline_s is None:
            return False
        window = self._results[ev.task]
        window.append((ev.t_end, ev.latency_s))
        # The window slides with the task's own results: a task that stopped producing keeps
        # its last verdict instead of looking healthy because its misses aged out.
        while window[0][0] <= ev.t_end - self.window_s:
            window.popleft()
        deadline = task.deadline_s
        updated = replace(
            task,
            results=len(window),
            misses=sum(1 for _, latency in window if latency > deadline),
            worst_slack=min(1.0 - latency / deadline for _, latency in window),
        )
        self.tasks[ev.task] = updated
        return feedback_direction(updated) != feedback_direction(task)

    def record_usage(self, usage: Mapping[str, int], t: float, ncpus: float) -> None:
        """Cumulative CPU ns per task at ``t`` → each task's demand since the last sample,
        as a fraction of the machine."""
        for name, ns in usage.items():
            before = self._usage.get(name)
            self._usage[name] = _Usage(t, ns)
            task = self.tasks.get(name)
            if task is None or before is None or t <= before.t:
                continue
            demand = max(0, ns - before.ns) / ((t - before.t) * 1e9 * ncpus)
            self.tasks[name] = replace(task, demand=demand)

    def mark_applied(self, allocation: Allocation, t: float) -> None:
        """Remember what was written at ``t`` and when freezes began and ended."""
        for name, alloc in allocation.items():
            self.applied[name] = alloc
            task = self.tasks.get(name)
            if task is None:
                continue
            if alloc.frozen and task.frozen_since is None:
                self.tasks[name] = replace(task, frozen_since=t)
            elif not alloc.frozen and task.frozen_since is not None:
                self.tasks[name] = replace(task, frozen_since=None, thawed_at=t)

    def mark_thawed(self, t: float) -> None:
        """Every task was thawed at ``t`` (the scheduler stopped)."""
        for name, alloc in list(self.applied.items()):
            if alloc.frozen:
                self.applied[name] = replace(alloc, frozen=False)
        for name, task in self.tasks.items():
            if task.frozen_since is not None:
                self.tasks[name] = replace(task, frozen_since=None, thawed_at=t)


class ContextScheduler:
    """Drives an actuator from context changes with a policy (see the module doc).

    ``scheduler``: the rx scheduler for timers (None: a private event-loop thread, disposed
    by :meth:`stop`). ``ncpus``: the machine that :meth:`record_usage` readings are shares
    of. ``tracker``: builds the context
    tracker on the scheduler's rx scheduler; it is started after the scheduler subscribes
    and stopped with it.
    """

    def __init__(
        self,
        bus: EventBus,
        policy: Policy,
        actuator: ActuatorLike,
        tasks: Sequence[TaskState],
        rules: Sequence[RuleSpec] = (),
        *,
        scheduler: PeriodicScheduler | None = None,
        clock: Callable[[], float] = time.monotonic,
        feedback_window_s: float = 2.0,
        tracker: Callable[[SchedulerBase], ContextTracker] | None = None,
        ncpus: float = 1.0,
    ) -> None:
        self.bus = bus
        self.policy = policy
        self.actuator = actuator
        self.state = SchedulerState(tasks, feedback_window_s)
        self._rulebook = RuleBook(rules)
        self._active_rules: list[str] = []
        # A private event loop is ours to dispose of; a given scheduler is the caller's.
        self._loop = EventLoopScheduler() if scheduler is None else None
        self._inner: PeriodicScheduler = self._loop if scheduler is None else scheduler
        # Decisions from timers run under the bus lock, ordered with inline deliveries.
        self._rx = SerializedScheduler(self._inner, bus.delivery_lock)
        self._clock = clock
        self.tracker = None if tracker is None else tracker(self._rx)
        self._ncpus = ncpus
        self._lock = threading.RLock()
        self._outbox: list[tuple[str, object]] = []
        self._subscriptions = CompositeDisposable()
        self._rule_timer = SerialDisposable()
        self._wake_timer = SerialDisposable()
        # Periodic policies: the earliest context change not yet reflected in a write.
        self._unapplied_since: float | None = None
        self._running = False

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Subscribe, apply the initial allocation, start timers and the context tracker."""
        with self._lock:
            self._running = True
            now = self._clock()
            self._evaluate_rules(now)
            self._decide(now, "start", force=True)
        self._flush()
        self._subscriptions.add(
            self.bus.subscribe("context", self._on_context, name="scheduler.context", inline=True)
        )
        self._subscriptions.add(
            self.bus.subscribe(
                "task.result", self._on_result, name="scheduler.feedback", inline=True
            )
        )
        self._subscriptions.add(
            self.bus.subscribe(
                "task.state", self._on_task_state, name="scheduler.tasks", inline=True
            )
        )
        self._subscriptions.add(self._rule_timer)
        self._subscriptions.add(self._wake_timer)
        if self.policy.period_s is not None:
            self._subscriptions.add(
                self._rx.schedule_periodic(self.policy.period_s, self._guarded(self._on_period))
            )
        if self.tracker is not None:
            self.tracker.start()

    def stop(self) -> None:
        """Stop deciding and thaw every task: nothing stays frozen after the scheduler."""
        if self.tracker is not None:
            self.tracker.stop()
        with self._lock:
            self._running = False
            self._subscriptions.dispose()
            failed = self.actuator.thaw_all()
            if failed:
                log.warning("could not thaw: %s", ", ".join(failed))
            self.state.mark_thawed(self._clock())
        if self._loop is not None:
            self._loop.dispose()

    def reload(self, rules: Sequence[RuleSpec]) -> None:
        """Swap the rule book (tasks and their containers are untouched) and re-decide."""
        with self._lock:
            self._rulebook = RuleBook(rules)
            now = self._clock()
            self._evaluate_rules(now)
            if self._running:
                self._decide(now, "reload")
        self._flush()

    @property
    def active_rules(self) -> list[str]:
        with self._lock:
            return list(self._active_rules)

    # -- inputs ---------------------------------------------------------------------------
    def _on_context(self, ev: ContextChanged) -> None:
        with self._lock:
            if not self._running:
                return
            self.state.context = dict(ev.signals)
            self._evaluate_rules(ev.t)
            if self.policy.period_s is None:
                self._decide(ev.t, "context")
            elif self._unapplied_since is None:
                self._unapplied_since = ev.t
        self._flush()

    def _on_result(self, ev: TaskResult) -> None:
        with self._lock:
            if not self._running:
                return
            if self.state.record_result(ev) and self.policy.period_s is None:
                self._decide(ev.t_end, "feedback")
        self._flush()

    def _on_task_state(self, ev: TaskStateChanged) -> None:
        """A stopped task leaves the allocation (its CPU goes to the others, and the
        actuator has no controller for it); a (re)started one comes back at once."""
        with self._lock:
            if not self._running:
                return
            changed = self.state.set_running(ev.task, ev.state == "running")
            # A periodic policy picks the change up at its next period.
            if changed and self.policy.period_s is None:
                self._decide(ev.t, f"task-{ev.state}")
        self._flush()

    def _on_period(self) -> None:
        with self._lock:
            if not self._running:
                return
            now = self._clock()
            trigger = now if self._unapplied_since is None else self._unapplied_since
            self._unapplied_since = None
            self._decide(trigger, "period", force=True)
        self._flush()

    def _on_rule_expiry(self) -> None:
        with self._lock:
            if not self._running:
                return
            now = self._clock()
            self._evaluate_rules(now)
            if self.policy.period_s is None:
                self._decide(now, "rule-expiry")
        self._flush()

    def _on_wake(self) -> None:
        with self._lock:
            if not self._running:
                return
            now = self._clock()
            self._decide(now, "freeze-guard")
        self._flush()

    def record_usage(self, usage: Mapping[str, int], t: float) -> None:
        """Cumulative CPU ns per task at ``t`` (the runtime's usage sampler reads the
        cgroups once for everyone); it becomes each task's measured demand. Measuring
        decides nothing by itself."""
        with self._lock:
            self.state.record_usage(usage, t, self._ncpus)

    # -- decisions (called with the lock held) --------------------------------------------
    def _evaluate_rules(self, now: float) -> None:
        outcome: RuleOutcome = self._rulebook.evaluate(self.state.context, now)
        before = set(self._active_rules)
        after = set(outcome.active)
        # Diff against what was published, not outcome.fired: after a reload the new book's
        # "fired" includes rules that were already active under the old one.
        for rule in outcome.active:
            if rule not in before:
                self._outbox.append(("rule", RuleChanged(now, rule, True)))
        for rule in self._active_rules:
            if rule not in after:
                self._outbox.append(("rule", RuleChanged(now, rule, False)))
        self._active_rules = list(outcome.active)
        self.state.set_directives(outcome.directives)
        if outcome.expires_at is None:
            self._rule_timer.disposable = None
        else:
            self._rule_timer.disposable = self._rx.schedule_relative(
                outcome.expires_at - now, self._guarded_action(self._on_rule_expiry)
            )

    def _decide(self, trigger_t: float, reason: str, *, force: bool = False) -> None:
        now = self._clock()
        allocation = self.policy.allocate(self.state.context, self.state.live_tasks(), now)
        changed = any(self.state.applied.get(name) != a for name, a in allocation.items())
        if allocation and (force or changed):
            self.actuator.apply(allocation)
            done = self._clock()
            self.state.mark_applied(allocation, done)
            self._outbox.append(
                (
                    "allocation",
                    AllocationApplied(
                        t=done,
                        trigger_t=trigger_t,
                        policy=self.policy.name,
                        reason=reason,
                        allocation=dict(allocation),
                        actuation_ms=(done - trigger_t) * 1000.0,
                    ),
                )
            )
        wake = self.policy.wake_at(self.state.live_tasks(), now)
        self._wake_timer.disposable = (
            None
            if wake is None
            else self._rx.schedule_relative(
                max(0.0, wake - self._clock()), self._guarded_action(self._on_wake)
            )
        )

    def _flush(self) -> None:
        """Publish what the last decision produced, outside the scheduler's lock."""
        with self._lock:
            outbox, self._outbox = self._outbox, []
        for topic, event in outbox:
            self.bus.publish(topic, event)

    # -- timer plumbing -------------------------------------------------------------------
    def _guarded(self, fn: Callable[[], None]) -> Callable[[object], None]:
        """A periodic action that logs instead of killing the timer thread."""

        def run(_state: object) -> None:
            try:
                fn()
            except Exception:
                log.exception("scheduler timer %s failed", fn.__name__)

        return run

    def _guarded_action(self, fn: Callable[[], None]) -> Callable[[SchedulerBase, object], None]:
        periodic = self._guarded(fn)

        def action(_scheduler: SchedulerBase, state: object) -> None:
            periodic(state)

        return action


def build_scheduler(
    manifest: Manifest,
    policy_name: str,
    bus: EventBus,
    actuator: ActuatorLike,
    *,
    tasks: Sequence[str],
    ncpus: float,
    scheduler: PeriodicScheduler | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ContextScheduler:
    """The scheduler of a run: the named policy over the manifest's tasks, rules and
    context signals (demand arrives through :meth:`ContextScheduler.record_usage`)."""
    cfg = manifest.scheduler
    policy = make_policy(
        policy_name,
        period_ms=cfg.period_ms,
        miss_boost=cfg.feedback.miss_boost,
        slack_release=cfg.feedback.slack_release,
    )
    wanted = set(tasks)
    states = [task_state(spec) for spec in manifest.tasks if spec.name in wanted]

    return ContextScheduler(
        bus,
        policy,
        actuator,
        states,
        manifest.rules,
        scheduler=scheduler,
        clock=clock,
        feedback_window_s=cfg.feedback.window_s,
        tracker=lambda rx: ContextTracker.from_config(bus, manifest.context, rx, clock=clock),
        ncpus=ncpus,
    )
