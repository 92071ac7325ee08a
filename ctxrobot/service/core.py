"""A manifest, translated into the scheduler core's terms: task bounds, signal machines,
rules and the policy. The one place the core meets the manifest's schema."""

from __future__ import annotations

from collections.abc import Sequence

from ctxrobot.manifest.schema import ContextSpec, Manifest, TaskSpec
from ctxrobot.sched.policy import Policy, make_policy
from ctxrobot.sched.signals import Host, Motion, Obstacle, Sign, SignalMachine, Voice
from ctxrobot.sched.state import SchedulerState, TaskConfig

__all__ = ["build_core", "signal_machines", "task_config"]


def task_config(spec: TaskSpec) -> TaskConfig:
    """A task's manifest entry as the core sees it."""
    r = spec.resources
    return TaskConfig(
        name=spec.name,
        cpu_min=r.cpu_min,
        cpu_max=r.cpu_max,
        weight=r.weight,
        max_freeze_s=r.max_freeze_s,
        deadline_s=spec.deadline_ms / 1000.0,
        input=spec.input,
        stale_after_s=spec.deadline_ms / 1000.0 if spec.stale == "skip" else None,
    )


def signal_machines(context: ContextSpec) -> list[SignalMachine]:
    """The signal machines a manifest's ``context:`` section asks for."""
    machines: list[SignalMachine] = []
    if (m := context.motion) is not None:
        machines.append(
            Motion(
                m.source,
                moving_speed=m.moving_speed,
                turning_rate=m.turning_rate,
                window_s=m.window_s,
            )
        )
    if (v := context.voice) is not None:
        machines.append(Voice(v.source, threshold_db=v.threshold_db, hangover_s=v.hangover_s))
    if (s := context.sign) is not None:
        machines.append(Sign(s.task, hold_s=s.hold_s))
    if (o := context.obstacle) is not None:
        machines.append(Obstacle(o.source, near_m=o.near_m))
    if (h := context.host) is not None:
        machines.append(Host(hot_c=h.hot_c))
    return machines


def build_policy(manifest: Manifest, name: str) -> Policy:
    cfg = manifest.scheduler
    return make_policy(
        name,
        period_ms=cfg.period_ms,
        miss_boost=cfg.feedback.miss_boost,
        slack_release=cfg.feedback.slack_release,
    )


def build_core(manifest: Manifest, policy_name: str, tasks: Sequence[str]) -> SchedulerState:
    """The core of a run of ``manifest`` over ``tasks`` (a subset for `--only` runs)."""
    wanted = set(tasks)
    return SchedulerState(
        [task_config(spec) for spec in manifest.tasks if spec.name in wanted],
        policy=build_policy(manifest, policy_name),
        rules=manifest.rules,
        signals=signal_machines(manifest.context),
        feedback_window_s=manifest.scheduler.feedback.window_s,
    )
