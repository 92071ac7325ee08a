"""The decision thread: the one owner of the scheduler's core, and the executor at its edge.

Every input the core needs reaches it as an event in one inbox: bus events (sensor readings,
task results, container states, CPU usage) through an inline bus subscription that only
enqueues, and the operator's commands (overrides, rule reloads) through :meth:`submit`.
The thread takes them one at a time, asks :meth:`SchedulerState.handle` for the actions and
hands them to the :class:`Executor`; when the core announces a wake-up
(:meth:`SchedulerState.wake_at`) it waits for the next event only until then, and hands the
core a :class:`~ctxrobot.sched.state.Tick`. So decisions never run on a publisher's thread,
no lock is held while cgroup files are written, and the order of decisions is the order of
the inbox.

**Every input is recorded.** After carrying out an input's actions the thread publishes it,
with the ``now`` it handed the core and its sequence number, as a
:class:`~ctxrobot.model.events.CoreInput` on the ``core.input`` topic; the run store writes
it into run.db's ``core_inputs`` table from the observer pipeline's thread (the decision
thread only publishes, never touches the disk). Replaying those inputs through a fresh core
built from the same manifest reproduces the run's decisions in virtual time. Reads of the
core's state (:meth:`DecisionLoop.call`) are not inputs: they change nothing.

Only this thread runs at real-time priority (``SCHED_FIFO``): a context change must not wait
behind the containers it is about to re-weight, but the SQLite writer, the camera-frame
copies and the sockets have no business above the tasks.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from ctxrobot.actuate.actuator import Actuator
from ctxrobot.model.actions import Action, ApplyAllocation, Publish, SetDispatch
from ctxrobot.model.bus import EventBus
from ctxrobot.model.errors import UserError
from ctxrobot.model.events import AllocationApplied, CoreInput
from ctxrobot.sched.state import SchedulerState, Start, Tick

__all__ = [
    "CORE_TOPICS",
    "DecisionLoop",
    "Executor",
    "Inbox",
    "PeriodicSampler",
    "pin_threads",
    "runtime_cpu",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The bus topics the core reads.
CORE_TOPICS = (
    "sensor.odometry",
    "sensor.scan",
    "sensor.audio",
    "sensor.camera",
    "host",
    "task.result",
    "task.dropped",
    "task.state",
    "usage",
)

#: Priority of the decision thread (0: stay SCHED_OTHER). Below the kernel's own
#: real-time threads (50 and up), above every task.
RT_PRIORITY = int(os.environ.get("CTXROBOT_RT_PRIORITY", "10"))

#: The CPU all the runtime's threads share: a CPU number, ``last`` (the highest this process
#: may use) or ``any`` (no pinning). See :func:`runtime_cpu`.
RUNTIME_CPU = os.environ.get("CTXROBOT_RUNTIME_CPU", "last")


class Executor:
    """Carries out the core's actions: cgroup writes through the fast path, what to send
    through the task channels, events onto the bus. Runs on the decision thread only."""

    def __init__(
        self,
        actuator: Actuator,
        set_dispatch: Callable[[str, float | None, float | None], None],
        bus: EventBus,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.actuator = actuator
        self._set_dispatch = set_dispatch
        self.bus = bus
        self._clock = clock

    def run(self, actions: Iterable[Action]) -> None:
        # The cgroup writes first: they are what the actuation latency measures, and the
        # context and rule changes that caused them only inform the observers.
        actions = sorted(actions, key=lambda a: not isinstance(a, ApplyAllocation))
        for action in actions:
            if isinstance(action, ApplyAllocation):
                self._apply(action)
            elif isinstance(action, SetDispatch):
                self._set_dispatch(action.task, action.rate_hz, action.stale_after_s)
            elif isinstance(action, Publish):
                self.bus.publish(action.topic, action.event)

    def _apply(self, action: ApplyAllocation) -> None:
        # A task being restarted has no container for a moment; it gets its whole
        # allocation when it runs again (the core forgets what it had).
        self.actuator.apply(action.changes)
        done = self._clock()
        self.bus.publish(
            "allocation",
            AllocationApplied(
                t=done,
                trigger_t=action.trigger_t,
                policy=action.policy,
                reason=action.reason,
                allocation=dict(action.allocation),
                actuation_ms=(done - action.trigger_t) * 1000.0,
            ),
        )


_STOP = object()


class Inbox:
    """The decision thread's queue of events, with an eventfd as its doorbell.

    Why not ``queue.SimpleQueue``: the decision thread runs at real-time priority, so a
    publisher's ``put`` wakes it at once, usually on the publisher's own CPU, while the
    publisher still holds the GIL; the woken thread then waits for the GIL in timed steps
    and forces a switch: several context switches per event. Ringing the doorbell is a
    system call made with the GIL released, so the woken thread takes the GIL at once and
    the publisher gets it back when the decision thread sleeps again (default robot, three
    interleaved pairs of 60 s runs: runtime CPU 4.27 against 4.50 % of a core, actuation
    p99 2.6 against 4.3 ms, medians).
    """

    def __init__(self) -> None:
        self._events: collections.deque[object] = collections.deque()
        self._bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._bell, select.POLLIN)
        # Closed with the inbox, not before: a late `put` (a thread still publishing while
        # the run stops) must never write into a descriptor number reused meanwhile.
        weakref.finalize(self, os.close, self._bell)

    def put(self, event: object) -> None:
        """Safe from any thread (deque appends are atomic)."""
        self._events.append(event)
        os.eventfd_write(self._bell, 1)

    def get(self, timeout_s: float | None) -> object | None:
        """The oldest event, waiting up to ``timeout_s`` (None: for ever); None if none came."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._events:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            # Whole milliseconds, rounded up: a wake-up is never early.
            self._poll.poll(None if remaining is None else math.ceil(remaining * 1000.0))
            # Back to zero, so that only a later `put` rings again. The bell may also have
            # rung for events already taken: then the loop waits on.
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._bell)
        return self._events.popleft()


@dataclass(frozen=True, slots=True)
class _Call:
    """Run ``fn`` on the decision thread (a consistent read of the core's state)."""

    fn: Callable[[SchedulerState], Any]
    result: Future[Any]


class DecisionLoop:
    """The thread that owns ``state`` (see the module doc)."""

    def __init__(
        self,
        state: SchedulerState,
        executor: Executor,
        *,
        clock: Callable[[], float] = time.monotonic,
        rt_priority: int = RT_PRIORITY,
    ) -> None:
        self.state = state
        self.executor = executor
        self._clock = clock
        self._rt_priority = rt_priority
        self._inbox = Inbox()
        self._thread = threading.Thread(target=self._run, name="decide", daemon=True)
        self._subscriptions: list[Any] = []
        self._inputs = 0  # inputs handed to the core so far: the next one's `seq`
        self.errors = 0

    def attach(self, bus: EventBus, topics: Sequence[str] = CORE_TOPICS) -> None:
        """Feed the core from ``bus``: each event is enqueued in the publisher's thread."""
        for topic in topics:
            self._subscriptions.append(
                bus.subscribe(topic, self._inbox.put, name=f"decide:{topic}", inline=True)
            )

    def submit(self, event: object) -> None:
        """Hand the core an event that does not travel on the bus. Safe from any thread."""
        self._inbox.put(event)

    def call(self, fn: Callable[[SchedulerState], T], timeout_s: float = 5.0) -> T:
        """``fn(state)`` run on the decision thread, between two events."""
        result: Future[T] = Future()
        self._inbox.put(_Call(fn, result))
        return result.result(timeout_s)

    def start(self) -> None:
        """Apply the first allocation and start deciding."""
        self._inbox.put(Start())
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> list[str]:
        """Stop deciding, then thaw every task: nothing stays frozen after the runtime.
        Returns the tasks that could not be thawed."""
        for subscription in self._subscriptions:
            subscription.dispose()
        self._subscriptions.clear()
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout_s)
        failed = self.executor.actuator.thaw_all()
        if failed:
            log.warning("could not thaw: %s", ", ".join(failed))
        return failed

    def _run(self) -> None:
        become_realtime(self._rt_priority)
        while True:
            wake = self.state.wake_at()
            timeout = None if wake is None else max(0.0, wake - self._clock())
            event = self._inbox.get(timeout)
            if event is None:
                event = Tick()
            if event is _STOP:
                return
            try:
                if isinstance(event, _Call):
                    event.result.set_result(event.fn(self.state))
                else:
                    self._decide(event)
            except Exception as err:  # one bad event must not end scheduling
                self.errors += 1
                log.exception("decision on %r failed", event)
                if isinstance(event, _Call):
                    event.result.set_exception(err)

    def _decide(self, event: object) -> None:
        """Hand ``event`` to the core, carry out its actions, then record the input."""
        now = self._clock()
        try:
            self.executor.run(self.state.handle(event, now))
        finally:
            # Recorded after the actions, so that recording never delays a cgroup write,
            # and also when they failed: the core has taken the input either way.
            seq, self._inputs = self._inputs, self._inputs + 1
            self.executor.bus.publish("core.input", CoreInput(now, seq, event))


def become_realtime(priority: int) -> None:
    """Put the calling thread (only it: Linux schedules threads) on SCHED_FIFO.

    Without CAP_SYS_NICE: one warning, and the thread stays on CFS.
    """
    if priority <= 0:
        return
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except PermissionError:
        log.warning(
            "cannot use real-time priority (needs root or CAP_SYS_NICE); actuation latency "
            "will suffer when the CPU is busy"
        )


def runtime_cpu(setting: str = RUNTIME_CPU) -> int | None:
    """The CPU the runtime's threads are to share (None: no pinning).

    Why one CPU: every input hops between threads (a sensor or channel thread enqueues, the
    decision thread decides, the observer thread records), and on another CPU each hop
    wakes a sleeping core with cold caches. On one CPU the hand-offs stay in its caches and
    need no inter-processor interrupt (default robot, six interleaved pairs of 60 s runs on
    the 2-vCPU dev VM, medians: runtime CPU 2.26 % of a core pinned against 2.53 %
    unpinned, actuation p50 0.53 against 0.64 ms, p99 1.01 against 1.35 ms). ``last``
    because a Raspberry Pi routes every interrupt to CPU 0. The task containers are not
    pinned: they use every CPU.
    """
    if setting == "any":
        return None
    allowed = os.sched_getaffinity(0)
    if setting == "last":
        return max(allowed)
    try:
        cpu = int(setting)
    except ValueError:
        raise UserError(
            f"CTXROBOT_RUNTIME_CPU={setting!r} is not a CPU: give a CPU number, `last` "
            "(the default) or `any` (no pinning)"
        ) from None
    if cpu not in allowed:
        raise UserError(
            f"CTXROBOT_RUNTIME_CPU={cpu}: this process may only use CPUs "
            f"{', '.join(map(str, sorted(allowed)))}; pick one of them, or `any`"
        )
    return cpu


def pin_threads(cpus: set[int]) -> None:
    """Put every thread of this process on ``cpus``; threads started later inherit it
    from the thread that starts them. (Linux schedules threads: ``sched_setaffinity`` of the
    process id alone would move only the main thread.)"""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(int(tid), cpus)


class PeriodicSampler:
    """Edge reads that happen on a period (CPU usage from cgroup accounting, host health
    from sysfs), on one thread of their own: a slow sensor file never delays a decision.
    Each job reads and publishes; the core hears of it like of any other event."""

    def __init__(
        self,
        jobs: Mapping[str, tuple[float, Callable[[float], None]]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``jobs``: name → (period in seconds, read-and-publish function of the time)."""
        self._jobs = dict(jobs)
        self._clock = clock
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sample", daemon=True)

    def start(self) -> None:
        if self._jobs:
            self._thread.start()

    def _run(self) -> None:
        due = {name: self._clock() for name in self._jobs}
        while True:
            name = min(due, key=due.__getitem__)
            if self._halt.wait(max(0.0, due[name] - self._clock())):
                return
            period, job = self._jobs[name]
            now = self._clock()
            try:
                job(now)
            except Exception:
                log.exception("periodic read %s failed", name)
            due[name] = max(due[name] + period, now)

    def stop(self) -> None:
        self._halt.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
