"""`ctxrobot eval`: each task's evaluator in its own container, on the shared data.

These are the accuracy targets of the tasks, asserted on what the container computes;
speed figures are printed, never asserted (this is a shared 2-core machine).
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ctxrobot, require_image

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
    (`ctxrobot eval --cpu`): one worker per usable CPU takes the next dataset, in the order
    given (longest first keeps the CPUs evenly busy). Same figures, a fraction of the wait.
    ``evaluator_args`` gives a dataset's evaluation arguments for the evaluator itself (after
    ``--``). Returns the metrics of each dataset evaluated, and the output of each that failed.
    """
    require_image(f"ctxrobot/{task}")
    todo: queue.Queue[str] = queue.Queue()
    for name in datasets:
        todo.put(name)
    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}

    def worker(cpu: int) -> None:
        while True:
            try:
                name = todo.get_nowait()
            except queue.Empty:
                return
            own = (evaluator_args or {}).get(name, ())
            args = ("eval", task, str(datasets[name]), "--json", "--cpu", str(cpu), "--", *own)
            proc = ctxrobot(*args, timeout=timeout)
            if proc.returncode != 0:
                failures[name] = proc.stdout[-2000:] + proc.stderr[-2000:]
                continue
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"\n{task} on {name} (cpu {cpu}): {json.dumps(results[name])}")

    cpus = sorted(os.sched_getaffinity(0))[: len(datasets)]
    threads = [threading.Thread(target=worker, args=(cpu,)) for cpu in cpus]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, failures
