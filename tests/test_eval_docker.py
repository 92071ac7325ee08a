"""`ctxrobot eval`: each task's evaluator in its own container, on the shared data.

These are the accuracy targets of the tasks, asserted on what the container computes;
speed figures are printed, never asserted (this is a shared 2-core machine).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ctxrobot, require_image, side_by_side

pytestmark = pytest.mark.docker


def evaluate(task: str, dataset: Path, *extra: str, timeout: float = 1800) -> dict[str, Any]:
    require_image(f"ctxrobot/{task}")
    proc = ctxrobot("eval", task, str(dataset), "--json", *extra, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n{task} on {dataset.name}: {json.dumps(metrics)}")
    return metrics


def evaluate_side_by_side(
    task: str,
    datasets: Mapping[str, Path],
    evaluator_args: Mapping[str, Sequence[str]] | None = None,
    timeout: float = 1800,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """`evaluate` on several datasets at once, each evaluation pinned to a CPU of its own
    (`ctxrobot eval --cpu`), in the order given. Same figures, a fraction of the wait.
    ``evaluator_args`` gives a dataset's evaluation arguments for the evaluator itself (after
    ``--``). Returns the metrics of each dataset evaluated, and the output of each that failed.
    """
    require_image(f"ctxrobot/{task}")

    def job(name: str) -> Callable[[int], subprocess.CompletedProcess[str]]:
        own = (evaluator_args or {}).get(name, ())
        dataset = str(datasets[name])
        return lambda cpu: ctxrobot(
            "eval", task, dataset, "--json", "--cpu", str(cpu), "--", *own, timeout=timeout
        )

    procs = side_by_side({name: job(name) for name in datasets})
    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    for name, proc in procs.items():
        if proc.returncode != 0:
            failures[name] = proc.stdout[-2000:] + proc.stderr[-2000:]
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"\n{task} on {name}: {json.dumps(results[name])}")
    return results, failures
