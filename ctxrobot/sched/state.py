"""The scheduler's core: events in, actions out. Everything that affects a decision is here.

:class:`SchedulerState` is a sans-I/O state machine in the manner of h11's connection and
dask.distributed's ``SchedulerState``: :meth:`~SchedulerState.handle` takes one event and
the current time and returns the actions it causes — write these cgroup values, tell this
task its rate, publish this context change. It owns no thread, opens no file or socket and
reads no clock; time passes only through the ``now`` it is given, and when it wants to be
woken without a new event it says when (:meth:`~SchedulerState.wake_at`) and the caller
hands it a :class:`Tick` then. The decision thread (``ctxrobot.service.loop``) is the only
caller in a run; tests drive it in virtual time.

The transitions, one row per event kind (:data:`TRANSITIONS` names the handler):

=====================  ===================================================  ================
event                  state it changes                                     decides because
=====================  ===================================================  ================
sensor reading         context signals; the critical-work horizon of the    ``context``
                       tasks reading that source
``TaskResult``         deadline-feedback window; ``sign_ahead``; work done  ``feedback``,
                                                                            ``context``,
                                                                            ``work-done``
``SampleDropped``      work done (a dropped sample needs no more CPU)       ``work-done``
``TaskStateChanged``   which tasks run (only running tasks are allocated)   ``task-<state>``
``UsageSampled``       each task's measured demand                          ``demand``
``Tick``               timed signal changes, rule holds running out,        ``context``,
                       the policy's own wake-ups                            ``rule-expiry``,
                                                                            ``wake``
``Start``              —                                                    ``start``
``OverrideSignals``    pinned signals                                       ``context``
``ReloadRules``        the rule book                                        ``reload``
=====================  ===================================================  ================

A decision asks the policy for an allocation and emits only what differs from what was
applied (:func:`ctxrobot.model.allocation.changed`): a context change the rules do not care
about costs one policy call and nothing else.

**Critical work outlives its rule.** A sample sensed while its task was critical stays
critical until the task has processed (or dropped) it: when a rule stops holding — voice
over, robot stopped — the task keeps its critical directive until its result for the last
such sample arrives. Without this the end-of-utterance decode, which starts when the voice
has already stopped, would be capped or frozen half way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ctxrobot.model.actions import Action, ApplyAllocation, Publish, SetDispatch
from ctxrobot.model.allocation import TaskAllocation, changed
from ctxrobot.model.events import (
    AudioLevel,
    CameraFrame,
    ContextChanged,
    HostReading,
    LaserScan,
    Odometry,
    RuleChanged,
    SampleDropped,
    TaskResult,
    TaskStateChanged,
    UsageSampled,
)
from ctxrobot.sched.policy import Policy, TaskState, feedback_direction
from ctxrobot.sched.rules import RuleBook, RuleSpec, TaskDirective
from ctxrobot.sched.signals import Context, Sign, SignalMachine

__all__ = [
    "TRANSITIONS",
    "OverrideSignals",
    "ReloadRules",
    "SchedulerState",
    "Start",
    "TaskConfig",
    "Tick",
]


# -- events only the core's owner sends (the bus carries the others) ---------------------
@dataclass(frozen=True, slots=True)
class Start:
    """Begin: apply the first allocation."""


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: something :meth:`SchedulerState.wake_at` announced is due."""


@dataclass(frozen=True, slots=True)
class OverrideSignals:
    """Pin context signals (``signals``), or unpin them all (``signals`` None)."""

    signals: Mapping[str, object] | None


@dataclass(frozen=True, slots=True)
class ReloadRules:
    """Swap the rule book; tasks and containers are untouched."""

    rules: Sequence[RuleSpec]


#: Events that stand for one sample each of the source they name.
_SAMPLE_SUMMARIES = (Odometry, LaserScan, AudioLevel, CameraFrame)
#: Unfinished samples remembered per task (a full queue holds the source back; this is only
#: a bound for a source whose task has stopped answering).
UNFINISHED_MAX = 4096


@dataclass(frozen=True, slots=True)
class TaskConfig:
    """What the core knows of a task from its manifest entry."""

    name: str
    cpu_min: float
    cpu_max: float
    weight: int = 100
    max_freeze_s: float | None = None
    deadline_s: float | None = None
    input: str | None = None  # the source whose samples the task reads
    stale_after_s: float | None = None  # a sample this old may be shed (`stale: skip`)


class SchedulerState:
    """Context, rules, per-task bookkeeping and the policy: see the module doc."""

    def __init__(
        self,
        tasks: Sequence[TaskConfig],
        *,
        policy: Policy,
        rules: Sequence[RuleSpec] = (),
        signals: Sequence[SignalMachine] = (),
        feedback_window_s: float = 2.0,
    ) -> None:
        self.policy = policy
        self.context = Context(signals)
        self._rulebook = RuleBook(rules)
        self.active_rules: list[str] = []
        self._window_s = feedback_window_s
        self.tasks: dict[str, TaskState] = {
            t.name: TaskState(
                name=t.name,
                cpu_min=t.cpu_min,
                cpu_max=t.cpu_max,
                weight=t.weight,
                max_freeze_s=t.max_freeze_s,
                deadline_s=t.deadline_s,
                stale_after_s=t.stale_after_s,
            )
            for t in tasks
        }
        self._readers: dict[str, list[str]] = {}
        for t in tasks:
            if t.input is not None:
                self._readers.setdefault(t.input, []).append(t.name)
        # When each sample a task has not finished with was sensed, oldest first. Bounded:
        # a source held back by a full queue cannot grow it without limit.
        self._unfinished: dict[str, deque[float]] = {
            n: deque(maxlen=UNFINISHED_MAX) for n in self.tasks
        }
        self._feeders = {m.task for m in signals if isinstance(m, Sign)}
        self.running: set[str] = set(self.tasks)
        self.applied: dict[str, TaskAllocation] = {}
        self._directives: dict[str, TaskDirective] = {}
        self._results: dict[str, deque[tuple[float, float]]] = {n: deque() for n in self.tasks}
        # Critical work: the newest sample sensed while the task was critical, the newest
        # sample it has finished with, and the directive it had then.
        self._critical_until: dict[str, float] = {}
        self._done_until: dict[str, float] = {}
        self._critical_directive: dict[str, TaskDirective] = {}
        self._rule_expiry: float | None = None
        self._unanswered: float | None = None  # earliest input the policy has not seen
        self._now = -float("inf")  # the time of the last event handled
        self._previous_now = -float("inf")
        self._actions: list[Action] = []
        # Each task's last view and what it was made of (see `_views`).
        self._view_memo: dict[str, tuple[TaskState, TaskDirective, float | None, TaskState]] = {}

    # -- the one entry point ----------------------------------------------------------------
    def handle(self, event: object, now: float) -> list[Action]:
        """Apply ``event`` at time ``now``; return the actions it causes, in order."""
        handler = TRANSITIONS.get(type(event))
        if handler is None:
            raise TypeError(f"the scheduler core takes no {type(event).__name__} events")
        self._previous_now, self._now = self._now, max(self._now, now)
        decision = handler(self, event, now)
        if decision is not None:
            trigger_t, reason = decision
            self._decide(trigger_t, reason, now)
        actions, self._actions = self._actions, []
        return actions

    def wake_at(self) -> float | None:
        """When to hand the core a :class:`Tick` if no event comes first (None: never)."""
        times = [
            self.context.deadline,
            self._rule_expiry,
            self.policy.wake_at(self._views(), self._now),
        ]
        return min((t for t in times if t is not None), default=None)

    # -- handlers: each updates the state and says whether (and why) to decide --------------
    def _on_start(self, _event: Start, now: float) -> tuple[float, str]:
        self._evaluate_rules(now)
        self.applied.clear()  # containers start from Docker's defaults: write everything
        return now, "start"

    def _on_sensor(self, event: Any, now: float) -> tuple[float, str] | None:
        # The context first: the reading that makes a task critical is critical work too.
        decision = self._context_changed(self.context.on_event(event))
        if not isinstance(event, _SAMPLE_SUMMARIES):
            return decision
        for task in self._readers.get(event.source, ()):
            directive = self._directives.get(task)
            if directive is not None and directive.critical:
                self._critical_until[task] = max(self._critical_until.get(task, event.t), event.t)
                self._critical_directive[task] = directive
            unfinished = self._unfinished[task]
            # Several summaries of one reading (odometry and scan) are one sample.
            if not unfinished or unfinished[-1] != event.t:
                unfinished.append(event.t)
                if len(unfinished) == 1 and self._is_critical(task):
                    decision = decision or (event.t, "backlog")
        return decision

    def _on_result(self, event: TaskResult, now: float) -> tuple[float, str] | None:
        feedback = self._record_result(event)
        done = self._work_done(event.task, event.t_sensor)
        context = self._context_changed(self.context.on_event(event))
        if context is not None:
            return context
        if done:
            return event.t_end, "work-done"
        if feedback:
            return event.t_end, "feedback"
        return None

    def _on_dropped(self, event: SampleDropped, now: float) -> tuple[float, str] | None:
        if event.t_sensor is not None and self._work_done(event.task, event.t_sensor):
            return event.t, "work-done"
        return None

    def _on_task_state(self, event: TaskStateChanged, now: float) -> tuple[float, str] | None:
        task = self.tasks.get(event.task)
        running = event.state == "running"
        if task is None or (event.task in self.running) == running:
            return None
        if running:
            self.running.add(event.task)
        else:
            self.running.discard(event.task)
        # A (re)started container starts from Docker's defaults, not from what we wrote; a
        # stopped one is no longer frozen, and its unfinished samples are gone with it.
        self.applied.pop(event.task, None)
        self.tasks[event.task] = replace(task, frozen_since=None)
        self._critical_until.pop(event.task, None)
        self._unfinished[event.task].clear()
        return event.t, f"task-{event.state}"

    def _on_usage(self, event: UsageSampled, now: float) -> tuple[float, str] | None:
        moved = False
        for name, used in event.used.items():
            task = self.tasks.get(name)
            if task is not None and task.demand != used:
                self.tasks[name] = replace(task, demand=used)
                moved = True
        return (event.t, "demand") if moved else None

    def _on_tick(self, _event: Tick, now: float) -> tuple[float, str] | None:
        decision = None
        for change in self.context.on_time(now):
            decision = decision or self._context_changed(change)
        if self._rule_expiry is not None and now >= self._rule_expiry:
            self._evaluate_rules(now)
            decision = decision or (now, "rule-expiry")
        # Asked from just before now: a wake-up due exactly now is still pending then.
        wake = self.policy.wake_at(self._views(), self._previous_now)
        if wake is not None and now >= wake:
            decision = decision or (now, "wake")
        return decision

    def _on_override(self, event: OverrideSignals, now: float) -> tuple[float, str] | None:
        if event.signals is None:
            change = self.context.clear_overrides(now)
        else:
            change = self.context.override(event.signals, now)
        return self._context_changed(change)

    def _on_reload(self, event: ReloadRules, now: float) -> tuple[float, str]:
        self._rulebook = RuleBook(event.rules)
        self._evaluate_rules(now)
        return now, "reload"

    # -- shared steps ---------------------------------------------------------------------
    def _context_changed(self, change: ContextChanged | None) -> tuple[float, str] | None:
        if change is None:
            return None
        self._actions.append(Publish("context", change))
        self._evaluate_rules(change.t)
        return change.t, "context"

    def _evaluate_rules(self, t: float) -> None:
        outcome = self._rulebook.evaluate(self.context.signals, t)
        before, after = set(self.active_rules), set(outcome.active)
        # Diff against what was published, not outcome.fired: after a reload the new book's
        # "fired" includes rules that were already active under the old one.
        for rule in outcome.active:
            if rule not in before:
                self._actions.append(Publish("rule", RuleChanged(t, rule, True)))
        for rule in self.active_rules:
            if rule not in after:
                self._actions.append(Publish("rule", RuleChanged(t, rule, False)))
        self.active_rules = list(outcome.active)
        self._directives = outcome.directives
        self._rule_expiry = outcome.expires_at

    def _record_result(self, event: TaskResult) -> bool:
        """Add a result to its task's feedback window; True if the verdict changed."""
        task = self.tasks.get(event.task)
        if task is None or task.deadline_s is None or "shed" in event.result:
            return False
        window = self._results[event.task]
        window.append((event.t_end, event.latency_s))
        # The window slides with the task's own results: a task that stopped producing keeps
        # its last verdict instead of looking healthy because its misses aged out.
        while window[0][0] <= event.t_end - self._window_s:
            window.popleft()
        deadline = task.deadline_s
        updated = replace(
            task,
            results=len(window),
            misses=sum(1 for _, latency in window if latency > deadline),
            worst_slack=min(1.0 - latency / deadline for _, latency in window),
        )
        self.tasks[event.task] = updated
        return feedback_direction(updated) != feedback_direction(task)

    def _is_critical(self, task: str) -> bool:
        return self._effective_directive(task).critical

    def _work_done(self, task: str, t_sensor: float) -> bool:
        """Record that ``task`` finished with a sample; True when that changes what it is
        owed: its critical work is over (every sample sensed while it was critical is
        processed or dropped), or a critical task has caught up with its input."""
        unfinished = self._unfinished.get(task)
        if unfinished is None:
            return False
        waiting = bool(unfinished)
        while unfinished and unfinished[0] <= t_sensor:
            unfinished.popleft()
        caught_up = waiting and not unfinished and self._is_critical(task)
        self._done_until[task] = max(self._done_until.get(task, t_sensor), t_sensor)
        until = self._critical_until.get(task)
        if until is None or self._done_until[task] < until:
            return caught_up
        del self._critical_until[task]
        directive = self._directives.get(task)
        return caught_up or directive is None or not directive.critical

    def _effective_directive(self, task: str) -> TaskDirective:
        """The rules' directive, or the critical one the task's unfinished work still has."""
        directive = self._directives.get(task, TaskDirective())
        if directive.critical or task not in self._critical_until:
            return directive
        held = self._critical_directive[task]
        return replace(held, rate_hz=directive.rate_hz)

    def _views(self) -> dict[str, TaskState]:
        """What the policy allocates among: the running tasks, directives applied."""
        return {name: self._view(name, t) for name, t in self.tasks.items() if name in self.running}

    def _view(self, name: str, task: TaskState) -> TaskState:
        # Asked after every input (`wake_at`), while most inputs change no task: a view is
        # rebuilt only when one of the three things it is made of has changed.
        directive = self._effective_directive(name)
        unfinished = self._unfinished[name]
        backlog_since = unfinished[0] if unfinished else None
        memo = self._view_memo.get(name)
        if (
            memo is not None
            and memo[0] is task
            and memo[1] == directive
            and memo[2] == backlog_since
        ):
            return memo[3]
        view = replace(
            task,
            directive=directive,
            backlog_since=backlog_since,
            feeds_context=name in self._feeders,
        )
        self._view_memo[name] = (task, directive, backlog_since, view)
        return view

    def _decide(self, trigger_t: float, reason: str, now: float) -> None:
        allocation = self.policy.allocate(self.context.signals, self._views(), now)
        if self._unanswered is None or trigger_t < self._unanswered:
            self._unanswered = trigger_t
        if self._unanswered > self.policy.decided_at(now):
            return  # a polling policy has not looked at this input yet
        trigger_t, self._unanswered = self._unanswered, None
        diff = changed(self.applied, allocation)
        writes: dict[str, tuple[TaskAllocation | None, TaskAllocation]] = {}
        for task, alloc in diff.items():
            before = self.applied.get(task)
            if before is None or before.cgroup_fields() != alloc.cgroup_fields():
                writes[task] = (before, alloc)
            if before is None or before.dispatch_fields() != alloc.dispatch_fields():
                self._actions.append(SetDispatch(task, alloc.rate_hz, alloc.stale_after_s))
        if writes:
            self._actions.append(
                ApplyAllocation(writes, dict(allocation), trigger_t, reason, self.policy.name)
            )
        self._mark_applied(diff, now)

    def _mark_applied(self, diff: Mapping[str, TaskAllocation], now: float) -> None:
        """Remember what was written at ``now`` and when freezes began and ended."""
        for name, alloc in diff.items():
            before = self.applied.get(name)
            self.applied[name] = alloc
            task = self.tasks[name]
            if alloc.frozen and task.frozen_since is None:
                self.tasks[name] = replace(task, frozen_since=now)
            elif not alloc.frozen and before is not None and before.frozen:
                self.tasks[name] = replace(task, frozen_since=None, thawed_at=now)


_Handler = Callable[[SchedulerState, Any, float], "tuple[float, str] | None"]

#: Event type → the handler that applies it (the module doc's table, as code).
TRANSITIONS: Mapping[type, _Handler] = {
    Start: SchedulerState._on_start,
    Odometry: SchedulerState._on_sensor,
    LaserScan: SchedulerState._on_sensor,
    AudioLevel: SchedulerState._on_sensor,
    CameraFrame: SchedulerState._on_sensor,
    HostReading: SchedulerState._on_sensor,
    TaskResult: SchedulerState._on_result,
    SampleDropped: SchedulerState._on_dropped,
    TaskStateChanged: SchedulerState._on_task_state,
    UsageSampled: SchedulerState._on_usage,
    Tick: SchedulerState._on_tick,
    OverrideSignals: SchedulerState._on_override,
    ReloadRules: SchedulerState._on_reload,
}
