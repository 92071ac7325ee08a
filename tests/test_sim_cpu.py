"""The simulator's CPU model on tiny cases worked out by hand: an envelope quota throttles
per period, weights split one CPU but not two, a task's own cap, writing a quota refills
it, freezing, SCHED_IDLE groups, cpusets, multi-threaded jobs."""

from __future__ import annotations

import pytest

from ctxrobot.bench.sim.cpu import Bandwidth, Claim, Cpus, Limits, fair_rates

ALL2 = frozenset({0, 1})
MS = 1e-3


def run_until_done(cpus: Cpus, until: float = 10.0) -> dict[str, float]:
    """When each job ends (virtual seconds)."""
    ended: dict[str, float] = {}
    while cpus.now < until:
        for task in cpus.advance(until):
            ended[task] = cpus.now
        if cpus.next_event() is None:
            break
    return ended


def test_an_envelope_quota_stalls_everything_for_the_rest_of_its_period() -> None:
    # 0.3 CPU as 3 ms per 10 ms: a 6 ms job runs 0-3 ms, stalls to 10 ms, runs 10-13 ms.
    # A CPU 0.3× as fast would take 20 ms: the quota is not a slower CPU.
    cpus = Cpus(2, ["a"], Bandwidth(3 * MS, 10 * MS))
    cpus.start("a", 6 * MS)
    assert run_until_done(cpus) == {"a": pytest.approx(13 * MS)}
    # Two tasks on two CPUs spend the quota together, in half the time.
    cpus = Cpus(2, ["a", "b"], Bandwidth(3 * MS, 10 * MS))
    cpus.start("a", 3 * MS)
    cpus.start("b", 3 * MS)
    assert run_until_done(cpus) == {"a": pytest.approx(11.5 * MS), "b": pytest.approx(11.5 * MS)}


def test_an_unused_quota_is_lost_at_the_end_of_its_period() -> None:
    cpus = Cpus(1, ["a"], Bandwidth(3 * MS, 10 * MS))
    cpus.advance(25 * MS)  # idle through two periods and half of a third
    cpus.start("a", 4 * MS)
    # 3 ms left of the period 20-30 ms (unused budgets do not pile up), then 1 ms at 30 ms.
    assert run_until_done(cpus) == {"a": pytest.approx(31 * MS)}


def test_weights_split_one_cpu_but_not_two() -> None:
    for ncpus, expected in ((1, {"a": 15 * MS, "b": 20 * MS}), (2, {"a": 10 * MS, "b": 10 * MS})):
        cpus = Cpus(ncpus, ["a", "b"])
        cpus.set_limits("a", Limits(shares=2048))
        cpus.set_limits("b", Limits(shares=1024))
        cpus.start("a", 10 * MS)
        cpus.start("b", 10 * MS)
        # One CPU: a at 2/3 until done at 15 ms (b has 5 ms), then b alone until 20 ms.
        assert run_until_done(cpus) == pytest.approx(expected), ncpus


def test_a_task_cap_is_its_own_quota_on_its_own_period() -> None:
    cpus = Cpus(2, ["a"], task_period_s=0.1)
    cpus.set_limits("a", Limits(cap_cpus=0.2))  # 20 ms per 100 ms
    cpus.start("a", 50 * MS)
    assert run_until_done(cpus) == {"a": pytest.approx(0.21)}


def test_writing_a_quota_refills_it_at_once() -> None:
    cpus = Cpus(2, ["a"], task_period_s=0.1)
    cpus.set_limits("a", Limits(cap_cpus=0.2))
    cpus.start("a", 50 * MS)
    cpus.advance(0.05)  # ran 0-20 ms, throttled since
    cpus.set_limits("a", Limits(cap_cpus=0.3))  # a new quota: 30 ms now, not at 100 ms
    assert run_until_done(cpus) == {"a": pytest.approx(0.08)}


def test_a_frozen_task_keeps_its_work_and_resumes_when_thawed() -> None:
    cpus = Cpus(1, ["a", "b"])
    cpus.start("a", 10 * MS)
    cpus.start("b", 10 * MS)
    cpus.advance(4 * MS)  # each has had 2 ms
    cpus.set_limits("a", Limits(frozen=True))
    assert cpus.advance(1.0) == ["b"] and cpus.now == pytest.approx(12 * MS)
    cpus.advance(50 * MS)
    cpus.set_limits("a", Limits(frozen=False))
    assert run_until_done(cpus) == {"a": pytest.approx(58 * MS)}


def test_an_idle_group_runs_only_on_a_cpu_nobody_else_wants() -> None:
    for ncpus, expected in ((1, {"b": 10 * MS, "a": 20 * MS}), (2, {"a": 10 * MS, "b": 10 * MS})):
        cpus = Cpus(ncpus, ["a", "b"])
        cpus.set_limits("a", Limits(idle=True, shares=262144))  # weight does not help it
        cpus.start("a", 10 * MS)
        cpus.start("b", 10 * MS)
        assert run_until_done(cpus) == pytest.approx(expected), ncpus


def test_cpusets_confine_tasks_to_their_cpus() -> None:
    cpus = Cpus(2, ["a", "b", "c"])
    for task in ("a", "b"):
        cpus.set_limits(task, Limits(cpuset=frozenset({0})))
        cpus.start(task, 10 * MS)
    cpus.start("c", 10 * MS)
    # a and b share CPU 0, c has CPU 1 to itself (unpinned, the three would get 2/3 each).
    assert cpus.rates() == {"a": 0.5, "b": 0.5, "c": 1.0}
    assert run_until_done(cpus) == pytest.approx({"c": 10 * MS, "a": 20 * MS, "b": 20 * MS})


def test_a_two_thread_job_uses_two_cpus_and_spends_a_quota_twice_as_fast() -> None:
    cpus = Cpus(2, ["a"])
    cpus.start("a", 20 * MS, width=2.0)
    assert run_until_done(cpus) == {"a": pytest.approx(10 * MS)}
    cpus = Cpus(2, ["a"], Bandwidth(4 * MS, 10 * MS))
    cpus.start("a", 8 * MS, width=2.0)
    assert run_until_done(cpus) == {"a": pytest.approx(12 * MS)}  # 2 ms, stall, 2 ms


def test_fair_rates_is_weighted_max_min() -> None:
    claims = [
        Claim("heavy", 1000, 1.0, ALL2),
        Claim("light1", 100, 1.0, ALL2),
        Claim("light2", 100, 1.0, ALL2),
    ]
    # Three on two CPUs: the heavy one is held at one CPU, the others share the second.
    assert fair_rates(claims, 2) == {"heavy": 1.0, "light1": 0.5, "light2": 0.5}
    equal = [Claim(n, 100, 1.0, ALL2) for n in "abc"]
    assert fair_rates(equal, 2) == pytest.approx(dict.fromkeys("abc", 2 / 3))
    assert fair_rates([Claim("a", 100, 1.0, ALL2)], 2) == {"a": 1.0}
    with pytest.raises(ValueError, match="outside CPUs 0-1"):
        fair_rates([Claim("a", 100, 1.0, frozenset({2}))], 2)


def test_a_bandwidth_grid_starts_at_zero_whenever_it_is_made() -> None:
    budget = Bandwidth(3 * MS, 10 * MS, now=0.025)
    assert budget.next_refill() == pytest.approx(0.03)
    budget.left = 0.0
    budget.refill(0.0299)
    assert budget.spent
    budget.refill(0.03)
    assert budget.left == pytest.approx(3 * MS)
