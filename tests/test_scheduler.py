"""The event-driven scheduler in virtual time, driving a recording actuator."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from reactivex.abc import SchedulerBase
from reactivex.scheduler import VirtualTimeScheduler

from ctxrobot.actuate.actuator import Allocation, TaskAllocation
from ctxrobot.manifest.schema import load_manifest
from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import (
    AllocationApplied,
    AudioLevel,
    ContextChanged,
    RuleChanged,
    TaskResult,
    TaskStateChanged,
)
from ctxrobot.sched.context import ContextTracker, voice_signals
from ctxrobot.sched.policy import (
    CfsPolicy,
    CtxPolicy,
    Policy,
    StaticPolicy,
    TaskState,
    WeightsPolicy,
)
from ctxrobot.sched.rules import RuleSpec
from ctxrobot.sched.scheduler import ContextScheduler, build_scheduler
from tests.conftest import REPO, require_data

WRITE_S = 0.0005  # what one apply "costs" on the virtual clock


def rule(name: str, when: str, hold_s: float = 0.0, **settings: dict[str, Any]) -> RuleSpec:
    return RuleSpec.model_validate({"name": name, "when": when, "hold_s": hold_s, "set": settings})


VOICE = rule("voice", "voice_active", speech={"critical": True, "share": 0.6, "rate_hz": 10.0})


class RecordingActuator:
    """Records each apply; each one takes WRITE_S of virtual time."""

    def __init__(self, vts: VirtualTimeScheduler) -> None:
        self.vts = vts
        self.applied: list[tuple[float, dict[str, TaskAllocation]]] = []
        self.thaws = 0

    def apply(self, allocation: Allocation) -> None:
        self.applied.append((self.vts.clock, dict(allocation)))
        self.vts.sleep(WRITE_S)  # moves the clock without running what falls due meanwhile

    def thaw_all(self) -> list[str]:
        self.thaws += 1
        return []


class Rig:
    def __init__(
        self,
        policy: Policy,
        rules: Sequence[RuleSpec] = (VOICE,),
        tasks: Sequence[TaskState] | None = None,
        **kw: Any,
    ) -> None:
        self.bus = EventBus()
        self.vts = VirtualTimeScheduler(0.0)
        self.actuator = RecordingActuator(self.vts)
        self.events: list[object] = []
        for topic in ("allocation", "rule"):
            self.bus.subscribe(topic, self.events.append, name=topic, inline=True)
        if tasks is None:
            tasks = [
                TaskState("slam", cpu_min=0.1, cpu_max=1.0, deadline_s=0.5),
                TaskState("speech", cpu_min=0.05, cpu_max=1.0, deadline_s=0.1),
            ]
        self.scheduler = ContextScheduler(
            self.bus,
            policy,
            self.actuator,
            tasks,
            rules,
            scheduler=self.vts,
            clock=lambda: self.vts.clock,
            **kw,
        )

    def context(self, t: float, **signals: object) -> None:
        event = ContextChanged(t, signals, tuple(signals))
        self.vts.schedule_absolute(t, lambda _s, _st: self.bus.publish("context", event))

    def result(self, task: str, t_end: float, latency: float) -> None:
        event = TaskResult(task, 0, t_end - latency, t_end - latency / 2, t_end)
        self.vts.schedule_absolute(t_end, lambda _s, _st: self.bus.publish("task.result", event))

    def allocations(self) -> list[AllocationApplied]:
        return [e for e in self.events if isinstance(e, AllocationApplied)]

    def rules(self) -> list[tuple[float, str, bool]]:
        return [(e.t, e.rule, e.active) for e in self.events if isinstance(e, RuleChanged)]


def test_ctx_applies_once_per_context_change_and_never_on_a_timer() -> None:
    rig = Rig(CtxPolicy())
    rig.scheduler.start()
    rig.context(1.0, voice_active=True)
    rig.context(1.5, voice_active=True, speed=0.3)  # the rules do not care: no write
    rig.context(3.0, voice_active=False, speed=0.3)
    rig.vts.advance_to(60.0)
    applied = rig.allocations()
    assert [(a.reason, a.trigger_t) for a in applied] == [
        ("start", 0.0),
        ("context", 1.0),
        ("context", 3.0),
    ]
    assert [t for t, _ in rig.actuator.applied] == [0.0, 1.0, 3.0]
    # Measured on the injected clock from the context event's time to after the write.
    assert all(a.actuation_ms == pytest.approx(WRITE_S * 1000) for a in applied)
    during = applied[1].allocation
    assert during["speech"].rate_hz == 10.0
    assert during["slam"].share_cap == pytest.approx(0.4, abs=1e-3)
    assert applied[2].allocation["slam"].share_cap is None
    assert rig.rules() == [(1.0, "voice", True), (3.0, "voice", False)]


def test_weights_reapplies_every_period_and_reports_the_context_trigger() -> None:
    loud = rule("voice", "voice_active", speech={"weight": 300})
    rig = Rig(WeightsPolicy(period_s=0.1), rules=[loud])
    rig.scheduler.start()
    rig.context(0.25, voice_active=True)
    rig.vts.advance_to(1.01)
    applied = rig.allocations()
    assert len(applied) == 11  # at start, then every 100 ms whether or not anything changed
    assert [a.reason for a in applied[1:]] == ["period"] * 10
    ticks = [t for t, _ in rig.actuator.applied[1:]]
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert gaps == pytest.approx([0.1] * 9)
    # The context change at 0.25 s waits for the next tick (≈ 0.3 s) to be written.
    late = applied[3]
    assert late.trigger_t == 0.25
    assert late.actuation_ms == pytest.approx((ticks[2] + WRITE_S - 0.25) * 1000)
    assert late.actuation_ms > 50.0
    assert late.allocation["speech"].share_cap == 0.75
    assert applied[2].allocation["speech"].share_cap == 0.5


@pytest.mark.parametrize("policy", [StaticPolicy(), CfsPolicy()], ids=["static", "cfs"])
def test_static_and_cfs_ignore_context(policy: Policy) -> None:
    rig = Rig(policy)
    rig.scheduler.start()
    rig.context(1.0, voice_active=True)
    rig.vts.advance_to(5.0)
    expected = 1 if isinstance(policy, StaticPolicy) else 0
    assert len(rig.actuator.applied) == expected
    assert rig.rules() == [(1.0, "voice", True)]  # rules are still tracked and reported


def test_a_rule_hold_expiring_is_applied_without_a_context_event() -> None:
    held = rule("voice", "voice_active", hold_s=1.0, speech={"critical": True, "share": 0.6})
    rig = Rig(CtxPolicy(), rules=[held])
    rig.scheduler.start()
    rig.context(1.0, voice_active=True)
    rig.context(2.0, voice_active=False)
    rig.vts.advance_to(10.0)
    assert [(a.reason, round(a.trigger_t, 6)) for a in rig.allocations()] == [
        ("start", 0.0),
        ("context", 1.0),
        ("rule-expiry", 3.0),
    ]
    assert rig.rules() == [(1.0, "voice", True), (3.0, "voice", False)]


def test_freeze_guard_thaws_after_max_freeze_and_refreezes_after_the_window() -> None:
    tasks = [
        TaskState("slam", cpu_min=0.1, cpu_max=1.0, max_freeze_s=2.0),
        TaskState("speech", cpu_min=0.05, cpu_max=1.0),
    ]
    greedy = rule("voice", "voice_active", speech={"critical": True, "share": 0.95})
    rig = Rig(CtxPolicy(thaw_s=0.5), rules=[greedy], tasks=tasks)
    rig.scheduler.start()
    rig.context(1.0, voice_active=True)
    rig.context(6.0, voice_active=False)
    rig.vts.advance_to(10.0)
    timeline = [
        (round(a.trigger_t, 4), a.reason, a.allocation["slam"].frozen) for a in rig.allocations()
    ]
    # Freeze and thaw times count from after each write (WRITE_S = 0.5 ms): frozen at
    # 1.0005, thawed 2 s later, refrozen 0.5 s after the thaw's write, thawed 2 s later.
    assert timeline == [
        (0.0, "start", False),
        (1.0, "context", True),
        (3.0005, "freeze-guard", False),
        (3.501, "freeze-guard", True),
        (5.5015, "freeze-guard", False),
        (6.0, "context", False),
    ]
    assert rig.scheduler.state.tasks["slam"].frozen_since is None


def test_deadline_feedback_boosts_on_misses_and_releases_on_slack() -> None:
    rig = Rig(CtxPolicy(miss_boost=0.1, slack_release=0.05), feedback_window_s=1.0)
    rig.scheduler.start()
    rig.context(0.5, voice_active=True)
    for i in range(5):  # speech's deadline is 100 ms: 150 ms misses it
        rig.result("speech", 1.0 + i * 0.1, 0.15)
    for i in range(30):  # then 20 ms: ample slack once the misses leave the 1 s window
        rig.result("speech", 1.5 + i * 0.1, 0.02)
    rig.vts.advance_to(5.0)
    steps = [
        (a.reason, round(a.trigger_t, 6), a.allocation["slam"].share_cap) for a in rig.allocations()
    ]
    assert steps == [
        ("start", 0.0, None),
        ("context", 0.5, 0.4),
        ("feedback", 1.0, 0.3),  # first miss: speech gets 0.7
        ("feedback", 2.4, 0.45),  # last miss left the (1.4, 2.4] window: speech gives 0.05 back
    ]


def test_stop_thaws_everything_and_stops_deciding() -> None:
    tasks = [
        TaskState("slam", cpu_min=0.1, cpu_max=1.0),
        TaskState("speech", cpu_min=0.05, cpu_max=1.0),
    ]
    greedy = rule("voice", "voice_active", speech={"critical": True, "share": 0.95})
    rig = Rig(CtxPolicy(), rules=[greedy], tasks=tasks)
    rig.scheduler.start()
    rig.context(1.0, voice_active=True)
    rig.vts.advance_to(1.5)
    assert rig.actuator.applied[-1][1]["slam"].frozen
    rig.scheduler.stop()
    assert rig.actuator.thaws == 1
    assert rig.scheduler.state.tasks["slam"].frozen_since is None
    assert not rig.scheduler.state.applied["slam"].frozen
    rig.context(2.0, voice_active=False)
    rig.vts.advance_to(10.0)
    assert len(rig.actuator.applied) == 2


def test_reload_swaps_rules_without_a_context_event() -> None:
    rig = Rig(CtxPolicy())
    rig.scheduler.start()
    rig.context(1.0, voice_active=True, motion="moving")
    rig.vts.advance_to(2.0)
    drive = rule("drive", 'motion == "moving"', slam={"critical": True, "share": 0.7})
    rig.vts.schedule_absolute(2.0, lambda _s, _st: rig.scheduler.reload([VOICE, drive]))
    rig.vts.schedule_absolute(3.0, lambda _s, _st: rig.scheduler.reload([drive]))
    rig.vts.advance_to(4.0)
    assert rig.rules() == [(1.0, "voice", True), (2.0, "drive", True), (3.0, "voice", False)]
    last = rig.allocations()[-1]
    assert last.reason == "reload"
    assert last.allocation["speech"].share_cap == pytest.approx(0.3, abs=1e-3)
    assert rig.scheduler.active_rules == ["drive"]


def test_demand_is_measured_from_cumulative_usage() -> None:
    usage: dict[str, int] = {"slam": 0, "speech": 0}

    def sample() -> Mapping[str, int]:
        usage["slam"] += 500_000_000  # half a CPU-second per 1 s sample
        usage["speech"] += 100_000_000
        return dict(usage)

    rig = Rig(CtxPolicy(), ncpus=2)
    rig.scheduler.start()
    for t in (1.0, 2.0, 3.0):  # the runtime's usage sampler, once a second
        rig.vts.schedule_absolute(t, lambda _s, _st, t=t: rig.scheduler.record_usage(sample(), t))
    rig.vts.advance_to(3.0)
    tasks = rig.scheduler.state.tasks
    assert tasks["slam"].demand == pytest.approx(0.25, rel=1e-3)  # of a 2-CPU machine
    assert tasks["speech"].demand == pytest.approx(0.05, rel=1e-3)
    assert len(rig.actuator.applied) == 1  # sampling demand decides nothing by itself


def test_build_scheduler_runs_the_default_robot_from_microphone_to_allocation() -> None:
    """The whole chain of config/robot.yaml in virtual time: audio levels on the bus →
    voice signal → rule → ctx policy → actuator, and back after the rule's hold."""
    require_data()  # the manifest's scenario names data files
    manifest = load_manifest(REPO / "config" / "robot.yaml")
    bus = EventBus()
    vts = VirtualTimeScheduler(0.0)
    actuator = RecordingActuator(vts)
    applied: list[AllocationApplied] = []
    bus.subscribe("allocation", applied.append, name="test", inline=True)
    names = [t.name for t in manifest.tasks]
    scheduler = build_scheduler(
        manifest,
        "ctx",
        bus,
        actuator,
        tasks=names,
        ncpus=manifest.robot.cpus,
        scheduler=vts,
        clock=lambda: vts.clock,
    )
    scheduler.start()
    for i in range(20):  # 2 s of audio, one loud chunk at 0.5 s
        t = i / 10
        level = AudioLevel("mic", t, -12.0 if t == 0.5 else -60.0)
        vts.schedule_absolute(t, lambda _s, _st, ev=level: bus.publish("sensor.audio", ev))
    vts.advance_to(10.0)
    scheduler.stop()
    assert [a.reason for a in applied] == ["start", "context", "rule-expiry"]
    voice = applied[1]  # voice_active → speech critical with share 0.6
    assert voice.trigger_t == 0.5 and not voice.allocation["speech"].frozen
    others = voice.allocation["slam"].share_cap + voice.allocation["signs"].share_cap
    assert others == pytest.approx(0.4, abs=1e-3)
    # Voice ends 0.3 s after the chunk (hangover); the rule holds it 2 s more.
    released = applied[2]
    assert released.trigger_t == pytest.approx(2.8, abs=2e-3)
    assert released.allocation["slam"].share_cap is None
    assert released.allocation["signs"].share_cap is None


def test_build_scheduler_builds_the_named_policy() -> None:
    require_data()
    manifest = load_manifest(REPO / "config" / "robot.yaml")
    vts = VirtualTimeScheduler(0.0)
    built = build_scheduler(
        manifest,
        "weights",
        EventBus(),
        RecordingActuator(vts),
        tasks=["slam"],
        ncpus=2,
        scheduler=vts,
    )
    assert built.policy.name == "weights" and built.policy.period_s == 0.1
    assert list(built.state.tasks) == ["slam"]
    assert built.state.tasks["slam"].deadline_s == 0.25


def test_a_stopped_task_leaves_the_allocation_and_a_restarted_one_gets_it_back() -> None:
    tasks = [
        TaskState("slam", cpu_min=0.1, cpu_max=1.0),
        TaskState("signs", cpu_min=0.1, cpu_max=1.0),
        TaskState("speech", cpu_min=0.05, cpu_max=1.0),
    ]
    rig = Rig(CtxPolicy(), tasks=tasks)
    rig.scheduler.start()
    rig.context(1.0, voice_active=True)

    def state(t: float, task: str, what: str) -> None:
        event = TaskStateChanged(t, task, what)
        rig.vts.schedule_absolute(t, lambda _s, _st: rig.bus.publish("task.state", event))

    state(2.0, "signs", "stopped")
    state(3.0, "signs", "starting")  # still not running: nothing to decide
    state(4.0, "signs", "running")
    rig.vts.advance_to(5.0)
    steps = [(a.reason, sorted(a.allocation)) for a in rig.allocations()]
    assert steps == [
        ("start", ["signs", "slam", "speech"]),
        ("context", ["signs", "slam", "speech"]),
        ("task-stopped", ["slam", "speech"]),
        ("task-running", ["signs", "slam", "speech"]),
    ]
    caps = [a.allocation["slam"].share_cap for a in rig.allocations()[1:]]
    assert caps == pytest.approx([0.2, 0.4, 0.2], abs=1e-3)  # signs' part goes to slam


def test_real_time_timers_decide_on_their_own_thread_under_the_bus_lock() -> None:
    """Default (real-time) scheduler: the voice hangover ends on the event-loop thread and
    the release is decided there, holding the bus lock like an inline delivery would."""
    bus = EventBus()
    released = threading.Event()
    seen: list[tuple[str, bool]] = []

    def bus_locked() -> bool:
        """Whether the bus lock is held (by the caller: nothing else runs meanwhile)."""
        lock = bus.delivery_lock
        held: list[bool] = []

        def probe() -> None:
            free = lock.acquire(blocking=False)  # type: ignore[attr-defined]
            if free:
                lock.release()  # type: ignore[attr-defined]
            held.append(not free)

        prober = threading.Thread(target=probe)
        prober.start()
        prober.join()
        return held[0]

    class Actuator:
        def apply(self, allocation: Allocation) -> None:
            seen.append((threading.current_thread().name, bus_locked()))
            if len(seen) == 3:
                released.set()

        def thaw_all(self) -> list[str]:
            return []

    def tracker(rx: SchedulerBase) -> ContextTracker:
        voice = voice_signals(bus.stream("sensor.audio"), rx, threshold_db=-35, hangover_s=0.05)
        return ContextTracker(bus, [voice])

    tasks = [TaskState("slam", cpu_min=0.1, cpu_max=1.0), TaskState("speech", 0.05, 1.0)]
    scheduler = ContextScheduler(bus, CtxPolicy(), Actuator(), tasks, [VOICE], tracker=tracker)
    scheduler.start()
    try:
        bus.publish("sensor.audio", AudioLevel("mic", time.monotonic(), -10.0))
        assert released.wait(10.0), "the hangover timer never released the voice rule"
    finally:
        scheduler.stop()
    main = threading.current_thread().name
    assert [who == main for who, _ in seen] == [True, True, False]
    assert [locked for _, locked in seen] == [False, True, True]  # start is not a delivery
