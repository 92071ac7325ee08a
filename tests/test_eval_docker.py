"""`ctxrobot eval`: each task's evaluator in its own container, on the shared data.

These are the accuracy targets of the tasks, asserted on what the container computes;
speed figures are printed, never asserted (this is a shared 2-core machine).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ctxrobot, require_data, require_image

pytestmark = pytest.mark.docker


def evaluate(task: str, dataset: Path, *extra: str, timeout: float = 1800) -> dict[str, Any]:
    require_image(f"ctxrobot/{task}")
    proc = ctxrobot("eval", task, str(dataset), "--json", *extra, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n{task} on {dataset.name}: {json.dumps(metrics)}")
    return metrics


@pytest.mark.parametrize("log", ["intel", "aces"])
def test_slam_in_container(log: str) -> None:
    m = evaluate("slam", require_data(f"slam/{log}"))
    assert m["trans_error_m"] <= 0.10
    assert m["rot_error_deg"] <= 1.5
    assert m["realtime_factor"] < 1.0, "faster than the log's real time on one core"
    assert m["scans"] > 1000
