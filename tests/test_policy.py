"""The allocation policies as pure functions: state in, decisions out."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from ctxrobot.model.allocation import TaskAllocation
from ctxrobot.sched.policy import (
    CfsPolicy,
    CtxPolicy,
    StaticPolicy,
    TaskState,
    WeightsPolicy,
    feedback_direction,
    make_policy,
)
from ctxrobot.sched.rules import TaskDirective

CRITICAL = TaskDirective(critical=True, share=0.6)


def task(name: str, **kw: object) -> TaskState:
    fields: dict[str, object] = {"cpu_min": 0.05, "cpu_max": 1.0, "weight": 100}
    fields.update(kw)
    return TaskState(name=name, **fields)  # type: ignore[arg-type]


def states(*tasks: TaskState) -> dict[str, TaskState]:
    return {t.name: t for t in tasks}


def test_cfs_touches_nothing() -> None:
    policy = CfsPolicy()
    assert policy.wake_at({}, 0.0) is None and policy.decided_at(3.0) == 3.0
    assert policy.allocate({}, states(task("a", directive=CRITICAL)), 0.0) == {}


def test_static_uses_manifest_weights_and_caps_whatever_the_context() -> None:
    tasks = states(task("a", weight=300, cpu_max=0.5), task("b", directive=CRITICAL))
    got = StaticPolicy().allocate({"voice_active": True}, tasks, 0.0)
    assert got == {
        "a": TaskAllocation(weight=300, share_cap=0.5),
        "b": TaskAllocation(weight=100, share_cap=None),
    }


def test_weights_normalises_context_weights_to_fractions_every_period() -> None:
    policy = WeightsPolicy(period_s=0.1)
    tasks = states(
        task("slam", weight=100),
        task("signs", weight=100, directive=TaskDirective(weight=200)),
        task("speech", weight=100),
    )
    got = policy.allocate({}, tasks, 0.0)
    assert got == {
        "slam": TaskAllocation(weight=250, share_cap=0.25),
        "signs": TaskAllocation(weight=500, share_cap=0.5),
        "speech": TaskAllocation(weight=250, share_cap=0.25),
    }
    # It polls: until the next period boundary the answer stays what it computed.
    assert policy.wake_at(tasks, 0.0) == pytest.approx(0.1) and policy.decided_at(0.05) == 0.0
    louder = {**tasks, "speech": task("speech", weight=100, directive=TaskDirective(weight=900))}
    assert policy.allocate({}, louder, 0.05) == got
    assert policy.allocate({}, louder, 0.1)["speech"].share_cap == 0.75
    assert policy.decided_at(0.1) == 0.1 and policy.wake_at(tasks, 0.1) == pytest.approx(0.2)


def test_weights_gives_rule_shares_and_splits_the_rest_by_weight() -> None:
    tasks = states(
        task("slam", weight=300),
        task("signs", weight=100),
        task("speech", directive=TaskDirective(critical=True, share=0.6)),
    )
    got = WeightsPolicy().allocate({}, tasks, 0.0)
    assert {n: a.share_cap for n, a in got.items()} == {"slam": 0.3, "signs": 0.1, "speech": 0.6}
    assert got["speech"].weight == 600 and not any(a.frozen for a in got.values())
    # Shares that exceed the machine are scaled down together; the others keep a floor.
    tasks["slam"] = replace(tasks["slam"], directive=TaskDirective(share=0.9))
    got = WeightsPolicy().allocate({}, tasks, 0.0)
    assert got["slam"].share_cap == 0.6 and got["speech"].share_cap == 0.4
    assert got["signs"] == TaskAllocation(weight=10, share_cap=0.01)


def test_ctx_without_critical_tasks_applies_weights_caps_and_rates() -> None:
    tasks = states(
        task("slam", cpu_max=0.8, directive=TaskDirective(cpu_max=0.5, rate_hz=2.0)),
        task("signs", weight=250),
    )
    got = CtxPolicy().allocate({}, tasks, 0.0)
    assert got == {
        "slam": TaskAllocation(weight=100, share_cap=0.5, rate_hz=2.0),
        "signs": TaskAllocation(weight=250, share_cap=None),
    }


def test_ctx_grants_the_critical_share_by_capping_the_others() -> None:
    tasks = states(
        task("speech", directive=CRITICAL),
        task("slam", weight=300, cpu_min=0.1),
        task("signs", weight=100, cpu_min=0.05),
    )
    got = CtxPolicy().allocate({}, tasks, 0.0)
    others = [got["slam"], got["signs"]]
    assert sum(a.share_cap or 1.0 for a in others) == pytest.approx(0.4, abs=1e-3)
    # The rest is split by weight (3:1) above each task's minimum.
    assert got["slam"].share_cap == pytest.approx(0.3, abs=1e-3)
    assert got["signs"].share_cap == pytest.approx(0.1, abs=1e-3)
    # The critical task is uncapped and its weight wins 60 % of contended CPU.
    speech = got["speech"]
    assert speech.share_cap is None and not speech.frozen
    assert speech.weight / (speech.weight + 300 + 100) >= 0.6


def test_ctx_squeezes_others_to_their_minimum_when_the_guarantee_is_large() -> None:
    tasks = states(
        task("speech", directive=TaskDirective(critical=True, share=0.8)),
        task("slam", cpu_min=0.1, weight=500),
        task("signs", cpu_min=0.1),
    )
    got = CtxPolicy().allocate({}, tasks, 0.0)
    assert got["slam"] == TaskAllocation(weight=500, share_cap=0.1)
    assert got["signs"] == TaskAllocation(weight=100, share_cap=0.1)


def test_ctx_freezes_the_least_important_when_even_minimums_do_not_fit() -> None:
    tasks = states(
        task("speech", directive=TaskDirective(critical=True, share=0.8)),
        task("slam", cpu_min=0.1, weight=500),
        task("signs", cpu_min=0.1, weight=200),
        task("logger", cpu_min=0.1, weight=50),
    )
    got = CtxPolicy().allocate({}, tasks, 0.0)
    assert [n for n, a in got.items() if a.frozen] == ["logger"]
    assert got["slam"].share_cap == got["signs"].share_cap == 0.1
    assert not got["speech"].frozen


def test_ctx_starvation_guard_thaws_after_max_freeze_then_allows_refreezing() -> None:
    policy = CtxPolicy(thaw_s=0.5)
    speech = task("speech", directive=TaskDirective(critical=True, share=0.95))
    slam = task("slam", cpu_min=0.1, max_freeze_s=2.0)
    fresh = policy.allocate({}, states(speech, slam), 10.0)
    assert fresh["slam"].frozen

    frozen = replace(slam, frozen_since=10.0)
    assert policy.wake_at(states(speech, frozen), 10.0) == 12.0
    assert policy.allocate({}, states(speech, frozen), 11.9)["slam"].frozen
    # Frozen for max_freeze_s: it runs at its minimum, and the guarantee yields the room.
    window = policy.allocate({}, states(speech, frozen), 12.0)
    assert window["slam"] == TaskAllocation(weight=100, share_cap=0.1)

    thawed = replace(slam, thawed_at=12.0)
    assert policy.wake_at(states(speech, thawed), 12.0) == 12.5
    assert not policy.allocate({}, states(speech, thawed), 12.4)["slam"].frozen
    assert policy.allocate({}, states(speech, thawed), 12.5)["slam"].frozen


def test_ctx_guard_freezes_another_task_before_shrinking_the_guarantee() -> None:
    speech = task("speech", directive=TaskDirective(critical=True, share=0.8))
    starved = task("slam", cpu_min=0.15, weight=50, frozen_since=0.0, max_freeze_s=1.0)
    spare = task("signs", cpu_min=0.15, weight=100)
    got = CtxPolicy().allocate({}, states(speech, starved, spare), 5.0)
    assert not got["slam"].frozen and got["slam"].share_cap == pytest.approx(0.2, abs=1e-3)
    assert got["signs"].frozen


def test_feedback_direction() -> None:
    base = task("x", deadline_s=0.1)
    assert feedback_direction(base) == 0  # no results yet
    assert feedback_direction(replace(base, results=5, misses=1, worst_slack=-0.2)) == 1
    assert feedback_direction(replace(base, results=5, worst_slack=0.6)) == -1
    assert feedback_direction(replace(base, results=5, worst_slack=0.2)) == 0
    assert feedback_direction(replace(base, deadline_s=None, results=5, misses=2)) == 0


@pytest.mark.parametrize(
    ("misses", "worst_slack", "expected"),
    [(0, 0.1, 0.5), (2, -0.5, 0.6), (0, 0.7, 0.45)],
    ids=["thin-margin", "missing", "ample-slack"],
)
def test_ctx_deadline_feedback_moves_the_guarantee(
    misses: int, worst_slack: float, expected: float
) -> None:
    policy = CtxPolicy(miss_boost=0.1, slack_release=0.05)
    speech = task(
        "speech",
        deadline_s=0.2,
        results=10,
        misses=misses,
        worst_slack=worst_slack,
        directive=TaskDirective(critical=True, share=0.5),
    )
    assert policy.guarantee(speech) == pytest.approx(expected)
    got = policy.allocate({}, states(speech, task("slam", cpu_min=0.05)), 0.0)
    assert got["slam"].share_cap == pytest.approx(1.0 - expected, abs=1e-3)


def test_ctx_weights_critical_tasks_by_guarantee_when_all_are_critical() -> None:
    """The default robot with every rule active: shares 0.6 + 0.5 + 0.4 exceed the machine,
    so each guarantee shrinks in proportion to its excess over cpu_min, and the weights
    split the CPU in the ratio of the guarantees."""
    policy = CtxPolicy()
    tasks = states(
        task("speech", cpu_min=0.1, directive=TaskDirective(critical=True, share=0.6)),
        task("slam", cpu_min=0.15, directive=TaskDirective(critical=True, share=0.5)),
        task("signs", cpu_min=0.1, directive=TaskDirective(critical=True, share=0.4)),
    )
    got = policy.allocate({}, tasks, 0.0)
    keep = 1 - 0.5 / (0.5 + 0.35 + 0.3)
    expected = {"speech": 0.1 + 0.5 * keep, "slam": 0.15 + 0.35 * keep, "signs": 0.1 + 0.3 * keep}
    assert sum(expected.values()) == pytest.approx(1.0)
    for name, share in expected.items():
        assert got[name].weight == math.ceil(share * 1000)
        assert got[name].share_cap is None and not got[name].frozen


def test_ctx_feedback_stays_within_bounds() -> None:
    policy = CtxPolicy(miss_boost=0.3, slack_release=0.3)
    missing = task(
        "a",
        cpu_min=0.2,
        cpu_max=0.7,
        deadline_s=0.1,
        results=3,
        misses=3,
        worst_slack=-1.0,
        directive=TaskDirective(critical=True, share=0.6),
    )
    assert policy.guarantee(missing) == 0.7
    idle = replace(missing, misses=0, worst_slack=0.9, directive=TaskDirective(critical=True))
    assert policy.guarantee(idle) == 0.2


def test_ctx_passes_context_rates_through_to_every_task() -> None:
    tasks = states(
        task("speech", directive=TaskDirective(critical=True, share=0.5, rate_hz=20.0)),
        task("signs", directive=TaskDirective(rate_hz=1.0)),
        task("slam"),
    )
    got = CtxPolicy().allocate({}, tasks, 0.0)
    assert {n: a.rate_hz for n, a in got.items()} == {
        "speech": 20.0,
        "signs": 1.0,
        "slam": None,
    }


def test_ctx_invariants_on_random_states() -> None:
    """No running task below its minimum; running others fit beside the guarantees
    whenever the guard leaves room; caps never above the task's ceiling."""
    rng = random.Random(7)
    policy = CtxPolicy()
    for _ in range(500):
        tasks = {}
        for i in range(rng.randint(1, 5)):
            lo = rng.choice([0.02, 0.05, 0.1, 0.2])
            hi = rng.choice([lo, 0.5, 0.8, 1.0])
            crit = rng.random() < 0.4
            directive = TaskDirective(
                critical=crit, share=rng.choice([None, 0.3, 0.6, 0.9]) if crit else None
            )
            tasks[f"t{i}"] = task(
                f"t{i}",
                cpu_min=lo,
                cpu_max=max(lo, hi),
                weight=rng.randint(1, 500),
                directive=directive,
            )
        got = policy.allocate({}, tasks, 0.0)
        assert set(got) == set(tasks)
        for name, alloc in got.items():
            t = tasks[name]
            cap = 1.0 if alloc.share_cap is None else alloc.share_cap
            assert alloc.frozen or cap >= t.cpu_min - 1e-4
            assert cap <= t.ceiling + 1e-4
            assert 1 <= alloc.weight <= 10_000
        criticals = [t for t in tasks.values() if t.directive.critical]
        if criticals:
            guaranteed = sum(policy.guarantee(t) for t in criticals)
            others = sum(
                got[n].share_cap or 1.0
                for n, t in tasks.items()
                if not t.directive.critical and not got[n].frozen
            )
            if guaranteed <= 1.0:
                assert guaranteed + others <= 1.0 + 1e-3


def test_make_policy_by_name() -> None:
    weights = make_policy("weights", period_ms=50)
    assert isinstance(weights, WeightsPolicy) and weights.period_s == 0.05
    assert isinstance(make_policy("ctx"), CtxPolicy)
    with pytest.raises(ValueError, match="unknown policy 'fifo'"):
        make_policy("fifo")


def test_ctx_a_critical_task_with_work_waiting_takes_all_above_the_others_minimums() -> None:
    tasks = states(
        task("speech", directive=CRITICAL, backlog_since=1.0),
        task("signs", cpu_min=0.1),
        task("slam", cpu_min=0.15),
    )
    got = CtxPolicy().allocate({}, tasks, 2.0)
    assert got["speech"].share_cap is None  # the others' caps leave it the rest: 0.75
    assert (got["signs"].share_cap, got["slam"].share_cap) == (0.1, 0.15)
    # Caught up: the others share what its 0.6 guarantee leaves.
    caught_up = {**tasks, "speech": replace(tasks["speech"], backlog_since=None)}
    idle = CtxPolicy().allocate({}, caught_up, 2.0)
    assert idle["signs"].share_cap + idle["slam"].share_cap == pytest.approx(0.4, abs=1e-3)


def test_ctx_several_waiting_critical_tasks_are_split_by_caps_not_weights() -> None:
    tasks = states(
        task("speech", directive=TaskDirective(critical=True, share=0.6), backlog_since=1.0),
        task("slam", directive=TaskDirective(critical=True, share=0.3), backlog_since=1.5),
        task("signs", cpu_min=0.1),
    )
    got = CtxPolicy().allocate({}, tasks, 2.0)
    # 0.9 above signs' minimum, split 2:1 and enforced as quotas.
    assert got["speech"].share_cap == pytest.approx(0.6, abs=1e-3)
    assert got["slam"].share_cap == pytest.approx(0.3, abs=1e-3)
    assert got["signs"].share_cap == 0.1
    # Only one of them waiting: it may use the other's part too; the other keeps its own.
    slam_idle = {**tasks, "slam": replace(tasks["slam"], backlog_since=None)}
    got = CtxPolicy().allocate({}, slam_idle, 2.0)
    assert got["speech"].share_cap is None and got["slam"].share_cap == pytest.approx(0.3)


def test_ctx_never_freezes_a_task_whose_results_make_a_context_signal() -> None:
    greedy = TaskDirective(critical=True, share=0.95)
    tasks = states(
        task("speech", directive=greedy),
        task("signs", cpu_min=0.1, feeds_context=True),
        task("slam", cpu_min=0.1),
    )
    got = CtxPolicy().allocate({}, tasks, 0.0)
    assert not got["signs"].frozen and got["slam"].frozen
    assert got["signs"].share_cap == 0.1


def test_ctx_without_contention_waiting_work_caps_nobody() -> None:
    tasks = states(
        task("speech", directive=CRITICAL, backlog_since=1.0, demand=0.2),
        task("signs", cpu_min=0.1, demand=0.1),
    )
    got = CtxPolicy(contended_above=0.5).allocate({}, tasks, 2.0)
    assert got["signs"].share_cap is None and got["speech"].share_cap is None
