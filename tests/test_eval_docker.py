"""`ctxrobot eval`: each task's evaluator in its own container, on the shared data.

These are the accuracy targets of the tasks, asserted on what the container computes;
speed figures are printed, never asserted (this is a shared 2-core machine).
"""

from __future__ import annotations

import json
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
