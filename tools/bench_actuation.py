#!/usr/bin/env python3
"""Micro-benchmark: one CPU re-allocation through the cgroup fast path vs the Docker API.

Starts burner containers (``ctxrobot/burner``, built by ``tools/setup``) under a temporary
parent cgroup, then times, on the same containers:

- ``allocation``: one whole allocation change (every task's weight and quota) applied by the
  :class:`~ctxrobot.actuate.actuator.Actuator`, alternating between two allocations so that every
  apply really writes; once with fast-path controllers, once with the Docker-API fallback
  (``container.update`` per field, what the published prototype's ``docker update`` did);
- ``one weight``: a single weight change on one container (one file write vs one
  ``container.update``);
- ``freeze+thaw``: ``freezer.state`` FROZEN then THAWED vs ``pause()`` + ``unpause()``.

Prints median and p99 in milliseconds. No asserts: the numbers depend on the machine's load.

    .venv/bin/python tools/bench_actuation.py [--fast-iterations 2000] [--api-iterations 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctxrobot.actuate.actuator import Actuator
from ctxrobot.actuate.cgroups import CgroupV1Controller, CgroupV2Controller, ParentCgroup
from ctxrobot.actuate.docker import (
    ContainerError,
    ContainerSpec,
    CpuController,
    DockerApiController,
    DockerBackend,
)
from ctxrobot.model.allocation import Machine, TaskAllocation

ALLOCATIONS = (
    {"t0": TaskAllocation(weight=300, share_cap=0.5), "t1": TaskAllocation(weight=100)},
    {"t0": TaskAllocation(weight=100), "t1": TaskAllocation(weight=300, share_cap=0.25)},
)


def time_ms(action: Callable[[int], object], iterations: int) -> np.ndarray:
    """Wall time of ``action(i)`` for i in range(iterations), in milliseconds."""
    samples = np.empty(iterations)
    for i in range(iterations):
        start = time.perf_counter_ns()
        action(i)
        samples[i] = (time.perf_counter_ns() - start) / 1e6
    return samples


def bench_path(controllers: dict[str, CpuController], iterations: int) -> dict[str, np.ndarray]:
    actuator = Actuator(controllers, Machine(2))
    changes = [
        {t: (ALLOCATIONS[1 - k][t], ALLOCATIONS[k][t]) for t in ALLOCATIONS[k]} for k in (0, 1)
    ]
    actuator.apply({t: (None, a) for t, a in ALLOCATIONS[1].items()})
    first = next(iter(controllers.values()))
    first.thaw()
    return {
        # Alternating: every change writes every task's weight and cap.
        "allocation": time_ms(lambda i: actuator.apply(changes[i % 2]), iterations),
        "one weight": time_ms(lambda i: first.set_weight(200 if i % 2 else 150), iterations),
        "freeze+thaw": time_ms(lambda _i: (first.freeze(), first.thaw()), iterations),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast-iterations", type=int, default=2000)
    parser.add_argument("--api-iterations", type=int, default=100)
    parser.add_argument("--image", default="ctxrobot/burner")
    args = parser.parse_args(argv)

    backend = DockerBackend()
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    parent = ParentCgroup(f"ctxrobot-bench-{os.getpid()}")
    parent.create()
    try:
        fast: dict[str, CpuController] = {}
        api: dict[str, CpuController] = {}
        for task in ("t0", "t1"):
            container = backend.create_and_start(
                ContainerSpec(
                    name=f"ctxrobot-{run_id}-{task}",
                    image=args.image,
                    task=task,
                    run_id=run_id,
                    cgroup_parent=parent.docker_parent,
                )
            )
            controller = backend.controller_for(container)
            if not isinstance(controller, CgroupV1Controller | CgroupV2Controller):
                print(f"no fast path here ({controller!r}); run as root", file=sys.stderr)
                return 1
            fast[task] = controller
            api[task] = DockerApiController(container)
        results = {
            "fast path (cgroup files)": bench_path(fast, args.fast_iterations),
            "Docker API (update, pause)": bench_path(api, args.api_iterations),
        }
    except ContainerError as err:
        print(err, file=sys.stderr)
        return 1
    finally:
        backend.cleanup(run_id)
        parent.remove()

    print(f"{'change':<13} {'path':<28} {'n':>5} {'median ms':>10} {'p99 ms':>9}")
    for change in ("allocation", "one weight", "freeze+thaw"):
        for path, samples in results.items():
            row = samples[change]
            median, p99 = np.median(row), np.percentile(row, 99)
            print(f"{change:<13} {path:<28} {len(row):>5} {median:>10.3f} {p99:>9.3f}")
    fast_alloc = np.median(results["fast path (cgroup files)"]["allocation"])
    api_alloc = np.median(results["Docker API (update, pause)"]["allocation"])
    print(f"allocation change: fast path is {api_alloc / fast_alloc:.0f}x faster (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
