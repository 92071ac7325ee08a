"""The scheduler's core in virtual time: events in, actions out, no thread, socket or clock.

A :class:`Rig` plays timed events into ``SchedulerState.handle`` and, between them, hands
the core a ``Tick`` at every time it asked to be woken (``wake_at``) — what the decision
thread does in a run, with the clock replaced by the events' own times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest

from ctxrobot.manifest.schema import load_manifest
from ctxrobot.model.actions import Action, ApplyAllocation, Publish, SetDispatch
from ctxrobot.model.allocation import TaskAllocation
from ctxrobot.model.events import (
    TOPICS,
    AudioLevel,
    ContextChanged,
    RuleChanged,
    SampleDropped,
    TaskResult,
    TaskStateChanged,
    UsageSampled,
)
from ctxrobot.sched.policy import CfsPolicy, CtxPolicy, Policy, StaticPolicy, WeightsPolicy
from ctxrobot.sched.rules import RuleSpec
from ctxrobot.sched.signals import Voice
from ctxrobot.sched.state import (
    TRANSITIONS,
    OverrideSignals,
    ReloadRules,
    SchedulerState,
    Start,
    TaskConfig,
    Tick,
)
from ctxrobot.service.core import build_core
from ctxrobot.service.loop import CORE_TOPICS
from tests.conftest import REPO, require_data


def rule(name: str, when: str, hold_s: float = 0.0, **settings: dict[str, Any]) -> RuleSpec:
    return RuleSpec.model_validate({"name": name, "when": when, "hold_s": hold_s, "set": settings})


VOICE = rule("voice", "voice_active", speech={"critical": True, "share": 0.6, "rate_hz": 10.0})
TWO_TASKS = [
    TaskConfig("slam", cpu_min=0.1, cpu_max=1.0, deadline_s=0.5, input="lidar"),
    TaskConfig("speech", cpu_min=0.05, cpu_max=1.0, deadline_s=0.1, input="mic"),
]


class Rig:
    """A core, a timeline of events, and every action it answered with, timed."""

    def __init__(
        self,
        policy: Policy,
        rules: Sequence[RuleSpec] = (VOICE,),
        tasks: Sequence[TaskConfig] = TWO_TASKS,
        **kw: Any,
    ) -> None:
        self.core = SchedulerState(tasks, policy=policy, rules=rules, **kw)
        self.timeline: list[tuple[float, int, object]] = []
        self.actions: list[tuple[float, Action]] = []
        self.now = 0.0

    def at(self, t: float, event: object) -> None:
        self.timeline.append((t, len(self.timeline), event))

    def context(self, t: float, **signals: object) -> None:
        """The context becomes ``signals`` at ``t`` (as operator pins: one change)."""
        self.at(t, OverrideSignals(signals))

    def result(self, task: str, t_end: float, latency: float, **result: object) -> None:
        self.at(t_end, TaskResult(task, 0, t_end - latency, t_end - latency / 2, t_end, result))

    def run(self, until: float) -> None:
        events = sorted(self.timeline, key=lambda e: (e[0], e[1]))
        self.timeline.clear()
        for t, _, event in [*events, (until, -1, None)]:
            while (wake := self.core.wake_at()) is not None and self.now <= wake < t:
                self._handle(wake, Tick())
            if event is not None:
                self._handle(t, event)
        self.now = max(self.now, until)

    def _handle(self, t: float, event: object) -> None:
        self.now = t
        self.actions += [(t, a) for a in self.core.handle(event, t)]

    def writes(self) -> list[tuple[float, ApplyAllocation]]:
        return [(t, a) for t, a in self.actions if isinstance(a, ApplyAllocation)]

    def published(self, kind: type) -> list[Any]:
        return [
            a.event for _, a in self.actions if isinstance(a, Publish) and isinstance(a.event, kind)
        ]

    def rules(self) -> list[tuple[float, str, bool]]:
        return [(round(e.t, 6), e.rule, e.active) for e in self.published(RuleChanged)]

    def allocation(self, task: str) -> TaskAllocation:
        return self.core.applied[task]


def test_every_topic_the_core_reads_has_a_transition() -> None:
    for topic in CORE_TOPICS:
        assert TOPICS[topic] in TRANSITIONS, topic
    with pytest.raises(TypeError, match="takes no str events"):
        SchedulerState(TWO_TASKS, policy=CtxPolicy()).handle("hello", 0.0)


def test_ctx_applies_once_per_context_change_and_never_on_a_timer() -> None:
    rig = Rig(CtxPolicy())
    rig.at(0.0, Start())
    rig.context(1.0, voice_active=True)
    rig.context(1.5, voice_active=True, speed=0.3)  # the rules do not care: no write
    rig.context(3.0, voice_active=False, speed=0.3)
    rig.run(60.0)
    writes = rig.writes()
    assert [(t, a.reason, a.trigger_t) for t, a in writes] == [
        (0.0, "start", 0.0),
        (1.0, "context", 1.0),
        (3.0, "context", 3.0),
    ]
    during = writes[1][1].allocation
    assert during["speech"].rate_hz == 10.0
    assert during["slam"].share_cap == pytest.approx(0.4, abs=1e-3)
    assert writes[2][1].allocation["slam"].share_cap is None
    assert rig.rules() == [(1.0, "voice", True), (3.0, "voice", False)]
    rates = [(t, a.task, a.rate_hz) for t, a in rig.actions if isinstance(a, SetDispatch)]
    assert rates == [
        (0.0, "slam", None),
        (0.0, "speech", None),
        (1.0, "speech", 10.0),
        (3.0, "speech", None),
    ]


def test_only_the_fields_that_changed_are_handed_to_the_writer() -> None:
    rig = Rig(CtxPolicy())
    rig.at(0.0, Start())
    rig.context(1.0, voice_active=True)
    rig.run(2.0)
    first, second = (a for _, a in rig.writes())
    assert all(before is None for before, _ in first.changes.values())  # a fresh container
    slam_before, slam_after = second.changes["slam"]
    assert slam_before == TaskAllocation() and slam_after.share_cap == pytest.approx(0.4, 1e-3)


def test_weights_polls_and_reports_the_context_trigger() -> None:
    loud = rule("voice", "voice_active", speech={"weight": 300})
    rig = Rig(WeightsPolicy(period_s=0.1), rules=[loud])
    rig.at(0.0, Start())
    rig.context(0.25, voice_active=True)
    rig.run(1.01)
    writes = rig.writes()
    # Written at start and when a poll saw the change: the one at 0.25 s waits for 0.3 s.
    assert [(round(t, 6), a.reason, a.trigger_t) for t, a in writes] == [
        (0.0, "start", 0.0),
        (0.3, "wake", 0.25),
    ]
    assert writes[1][1].allocation["speech"].share_cap == 0.75
    assert writes[0][1].allocation["speech"].share_cap == 0.5
    assert rig.core.wake_at() == pytest.approx(1.1)  # it keeps polling


@pytest.mark.parametrize("policy", [StaticPolicy(), CfsPolicy()], ids=["static", "cfs"])
def test_static_and_cfs_ignore_context(policy: Policy) -> None:
    rig = Rig(policy)
    rig.at(0.0, Start())
    rig.context(1.0, voice_active=True)
    rig.run(5.0)
    assert len(rig.writes()) == (1 if isinstance(policy, StaticPolicy) else 0)
    assert rig.rules() == [(1.0, "voice", True)]  # rules are still tracked and reported


def test_a_rule_hold_expiring_is_applied_without_a_context_event() -> None:
    held = rule("voice", "voice_active", hold_s=1.0, speech={"critical": True, "share": 0.6})
    rig = Rig(CtxPolicy(), rules=[held])
    rig.at(0.0, Start())
    rig.context(1.0, voice_active=True)
    rig.context(2.0, voice_active=False)
    rig.run(10.0)
    assert [(a.reason, round(a.trigger_t, 6)) for _, a in rig.writes()] == [
        ("start", 0.0),
        ("context", 1.0),
        ("rule-expiry", 3.0),
    ]
    assert rig.rules() == [(1.0, "voice", True), (3.0, "voice", False)]


def test_freeze_guard_thaws_after_max_freeze_and_refreezes_after_the_window() -> None:
    tasks = [
        TaskConfig("slam", cpu_min=0.1, cpu_max=1.0, max_freeze_s=2.0),
        TaskConfig("speech", cpu_min=0.05, cpu_max=1.0),
    ]
    greedy = rule("voice", "voice_active", speech={"critical": True, "share": 0.95})
    rig = Rig(CtxPolicy(thaw_s=0.5), rules=[greedy], tasks=tasks)
    rig.at(0.0, Start())
    rig.context(1.0, voice_active=True)
    rig.context(6.0, voice_active=False)
    rig.run(10.0)
    timeline = [(round(t, 4), a.reason, a.allocation["slam"].frozen) for t, a in rig.writes()]
    # Frozen at 1.0, thawed 2 s later, refrozen 0.5 s after the thaw, thawed 2 s later.
    assert timeline == [
        (0.0, "start", False),
        (1.0, "context", True),
        (3.0, "wake", False),
        (3.5, "wake", True),
        (5.5, "wake", False),
        (6.0, "context", False),
    ]
    assert rig.core.tasks["slam"].frozen_since is None


def test_deadline_feedback_boosts_on_misses_and_releases_on_slack() -> None:
    rig = Rig(CtxPolicy(miss_boost=0.1, slack_release=0.05), feedback_window_s=1.0)
    rig.at(0.0, Start())
    rig.context(0.5, voice_active=True)
    for i in range(5):  # speech's deadline is 100 ms: 150 ms misses it
        rig.result("speech", 1.0 + i * 0.1, 0.15)
    for i in range(30):  # then 20 ms: ample slack once the misses leave the 1 s window
        rig.result("speech", 1.5 + i * 0.1, 0.02)
    rig.run(5.0)
    steps = [
        (a.reason, round(a.trigger_t, 6), a.allocation["slam"].share_cap) for _, a in rig.writes()
    ]
    assert steps == [
        ("start", 0.0, None),
        ("context", 0.5, 0.4),
        ("feedback", 1.0, 0.3),  # first miss: speech gets 0.7
        ("feedback", 2.4, 0.45),  # last miss left the (1.4, 2.4] window: speech gives 0.05 back
    ]


def test_reload_swaps_rules_without_a_context_event() -> None:
    rig = Rig(CtxPolicy())
    rig.at(0.0, Start())
    rig.context(1.0, voice_active=True, motion="moving")
    drive = rule("drive", 'motion == "moving"', slam={"critical": True, "share": 0.7})
    rig.at(2.0, ReloadRules([VOICE, drive]))
    rig.at(3.0, ReloadRules([drive]))
    rig.run(4.0)
    assert rig.rules() == [(1.0, "voice", True), (2.0, "drive", True), (3.0, "voice", False)]
    _, last = rig.writes()[-1]
    assert last.reason == "reload"
    assert last.allocation["speech"].share_cap == pytest.approx(0.3, abs=1e-3)
    assert rig.core.active_rules == ["drive"]


def test_demand_comes_from_usage_readings() -> None:
    rig = Rig(CtxPolicy())
    rig.at(0.0, Start())
    for t in (1.0, 2.0, 3.0):
        rig.at(t, UsageSampled(t, {"slam": 0.25, "speech": 0.05}))
    rig.run(3.0)
    assert rig.core.tasks["slam"].demand == 0.25
    assert rig.core.tasks["speech"].demand == 0.05
    assert len(rig.writes()) == 1  # measured demand alone changes nothing here


def test_a_stopped_task_leaves_the_allocation_and_a_restarted_one_gets_it_back() -> None:
    tasks = [*TWO_TASKS, TaskConfig("signs", cpu_min=0.1, cpu_max=1.0)]
    rig = Rig(CtxPolicy(), tasks=tasks)
    rig.at(0.0, Start())
    rig.context(1.0, voice_active=True)
    rig.at(2.0, TaskStateChanged(2.0, "signs", "stopped"))
    rig.at(3.0, TaskStateChanged(3.0, "signs", "starting"))  # still not running: no decision
    rig.at(4.0, TaskStateChanged(4.0, "signs", "running"))
    rig.run(5.0)
    steps = [(a.reason, sorted(a.allocation)) for _, a in rig.writes()]
    assert steps == [
        ("start", ["signs", "slam", "speech"]),
        ("context", ["signs", "slam", "speech"]),
        ("task-stopped", ["slam", "speech"]),
        ("task-running", ["signs", "slam", "speech"]),
    ]
    caps = [a.allocation["slam"].share_cap for _, a in rig.writes()[1:]]
    assert caps == pytest.approx([0.2, 0.4, 0.2], abs=1e-3)  # signs' part goes to slam
    restarted = rig.writes()[-1][1].changes["signs"]
    assert restarted[0] is None, "a new container gets every field written"


def test_critical_work_outlives_its_rule() -> None:
    """Audio sensed while the voice rule held stays critical until the task has processed
    it: the end-of-utterance decode runs after the voice stopped."""
    tasks = [
        TaskConfig("slam", 0.1, 1.0, input="lidar"),
        TaskConfig("speech", 0.05, 1.0, input="mic"),
    ]
    rig = Rig(CtxPolicy(), tasks=tasks, signals=[Voice("mic", threshold_db=-35, hangover_s=0.3)])
    rig.at(0.0, Start())
    for i in range(30):  # 3 s of audio: loud from 0.5 s to 1.0 s
        t = round(i / 10, 6)
        rig.at(t, AudioLevel("mic", t, -10.0 if 0.5 <= t <= 1.0 else -60.0))
    # The task is behind: its results for chunks up to 1.3 s (the hangover's end) arrive
    # late, the decode of the utterance last.
    for i in range(14):
        t_sensor = round(i / 10, 6)
        rig.at(2.0 + i * 0.1, TaskResult("speech", i, t_sensor, 1.9 + i * 0.1, 2.0 + i * 0.1, {}))
    rig.run(5.0)
    changes = [(round(t, 3), a.reason, a.allocation["slam"].share_cap) for t, a in rig.writes()]
    # Voice on at 0.5, off at 1.3 (hangover; the chunk sensed at that very moment still
    # counts), but speech stays critical until its result for that chunk arrives at 3.3 s.
    # Meanwhile it has work waiting, so slam is held at its minimum.
    assert changes == [
        (0.0, "start", None),
        (0.5, "context", 0.1),
        (3.3, "work-done", None),
    ]
    assert rig.rules() == [(0.5, "voice", True), (1.3, "voice", False)]


def test_a_dropped_sample_ends_critical_work_too() -> None:
    rig = Rig(CtxPolicy(), signals=[Voice("mic", threshold_db=-35, hangover_s=0.1)])
    rig.at(0.0, Start())
    rig.at(0.5, AudioLevel("mic", 0.5, -10.0))
    rig.at(0.6, AudioLevel("mic", 0.6, -60.0))
    rig.at(1.0, SampleDropped("speech", 6, 1.0, "queue_full", t_sensor=0.6))
    rig.run(2.0)
    assert [(round(t, 3), a.reason) for t, a in rig.writes()] == [
        (0.0, "start"),
        (0.5, "context"),
        (1.0, "work-done"),
    ]


def test_overrides_change_the_context_and_are_published() -> None:
    rig = Rig(CtxPolicy())
    rig.at(0.0, Start())
    rig.context(1.0, voice_active=True)
    rig.at(2.0, OverrideSignals(None))
    rig.run(3.0)
    changes = rig.published(ContextChanged)
    assert [(c.t, c.signals) for c in changes] == [(1.0, {"voice_active": True}), (2.0, {})]
    assert [a.reason for _, a in rig.writes()] == ["start", "context", "context"]


def test_build_core_runs_the_default_robot_from_microphone_to_allocation() -> None:
    """The whole chain of config/robot.yaml in virtual time: audio levels → voice signal →
    rule → ctx policy → allocation, and back after the rule's hold."""
    require_data()  # the manifest's scenario names data files
    manifest = load_manifest(REPO / "config" / "robot.yaml")
    rig = Rig(CtxPolicy())
    rig.core = build_core(manifest, "ctx", [t.name for t in manifest.tasks])
    rig.at(0.0, Start())
    for i in range(20):  # 2 s of audio, one loud chunk at 0.5 s, each processed in 300 ms
        t = i / 10
        rig.at(t, AudioLevel("mic", t, -12.0 if t == 0.5 else -60.0))
        rig.at(t + 0.3, TaskResult("speech", i, t, t + 0.2, t + 0.3, {}))
    rig.run(10.0)
    writes = [a for _, a in rig.writes()]
    assert [a.reason for a in writes] == ["start", "context", "work-done", "rule-expiry"]
    voice = writes[1]  # voice_active → speech critical, with audio waiting to be decoded
    assert voice.trigger_t == 0.5 and not voice.allocation["speech"].frozen
    caps = {t: voice.allocation[t].share_cap for t in ("slam", "signs")}
    assert caps == {"slam": 0.15, "signs": 0.1}, "the others at their minimums"
    # Caught up at 2.2 s: the others share what speech's 0.6 guarantee leaves.
    caught_up = writes[2]
    assert caught_up.trigger_t == pytest.approx(2.2)
    assert caught_up.allocation["slam"].share_cap == pytest.approx(0.2, abs=1e-3)
    # Voice ends 0.3 s after the chunk (hangover); the rule holds it 2 s more.
    released = writes[3]
    assert released.trigger_t == pytest.approx(2.8, abs=2e-3)
    assert released.allocation["slam"].share_cap is None
    assert released.allocation["signs"].share_cap is None
    assert math.isclose(rig.core.tasks["slam"].deadline_s or 0, 0.25)
