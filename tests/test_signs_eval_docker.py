"""The road-sign task in its container: the evaluator on the shared data, a folder in no
known layout, and the task under `ctxrobot run` scored in the loop.

Accuracy targets are asserted on what the container computes; speed is printed, never
asserted (this is a shared 2-core machine).
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import docker
import pytest

from ctxrobot.actuate.docker import LABEL_RUN
from ctxtask.datasets.signs import score_run
from tests.conftest import REPO, ctxrobot, require_data, require_image

pytestmark = pytest.mark.docker

IMAGE = "ctxrobot/signs"
PHOTOS = "signs/road-sign-detection-subset"


def last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def test_signs_in_container() -> None:
    require_image(IMAGE)
    proc = ctxrobot("eval", "signs", str(require_data("signs")), "--json", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    m = last_json(proc.stdout)
    print(f"\nsigns in the container: {json.dumps(m)}")
    assert m["stop_precision"] >= 0.95
    assert m["stop_recall"] >= 0.95
    assert m["accuracy"] >= 0.95
    assert m["ms_per_frame"] > 0
    for figure in ("stop_precision", "stop_recall", "accuracy", "ms_per_frame"):
        low, high = m[f"{figure}_ci95"]
        assert low <= m[figure] <= high, figure


def test_eval_of_a_folder_in_no_known_layout(tmp_path: Path) -> None:
    require_image(IMAGE)
    (tmp_path / "something.txt").write_text("not a dataset")
    subprocess.run(["chmod", "-R", "o+rX", str(tmp_path)], check=True)
    proc = ctxrobot("eval", "signs", str(tmp_path), timeout=300)
    assert proc.returncode == 2
    assert "images/" in proc.stderr or "Images/" in proc.stderr
    assert tmp_path.name in proc.stderr, "the error names the user's folder"


def test_eval_mounts_a_folder_of_the_host_named_after_the_double_dash(tmp_path: Path) -> None:
    """`-- --models DIR` names a folder of the host: the evaluator in its container reads it
    under /host, read-only (the container sees nothing else of the host)."""
    require_image(IMAGE)
    signs = require_data("signs")
    models = tmp_path / "my-models"
    for part in ("cascades", "classifier-tflite"):
        shutil.copytree(signs / part, models / part)
    subprocess.run(["chmod", "-R", "o+rX", str(tmp_path)], check=True)
    crops = str(signs / "gtsrb-test-subset")

    def evaluate() -> subprocess.CompletedProcess[str]:
        return ctxrobot("eval", "signs", crops, "--json", "--", "--models", str(models))

    proc = evaluate()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert last_json(proc.stdout)["accuracy"] >= 0.95
    # It read the copy, not the data root's models: without the copy's labels it stops.
    (models / "classifier-tflite" / "labels.csv").unlink()
    proc = evaluate()
    assert proc.returncode != 0
    assert f"/host{models}/classifier-tflite/labels.csv" in proc.stderr


def test_run_scored_in_the_loop(tmp_path: Path) -> None:
    """Street photos replayed as a 5 fps camera into the real task; its results, read back
    from the run database, scored per frame against the photos' annotations."""
    require_image(IMAGE)
    data = require_data(PHOTOS)
    (tmp_path / "scenario.yaml").write_text(
        textwrap.dedent(f"""\
            version: 1
            duration_s: 12
            sources:
              camera:
                kind: camera_replay
                fps: 5
                size: [640, 480]
                idle: {{dir: {PHOTOS}/images, pattern: "road1*.png"}}
                show:
                  - {{at_s: 2.0, image: {PHOTOS}/images/road22.png, hold_s: 2.0}}
                  - {{at_s: 7.0, image: {PHOTOS}/images/road55.png, hold_s: 2.0}}
            """)
    )
    (tmp_path / "robot.yaml").write_text(
        textwrap.dedent(f"""\
            version: 1
            robot: {{name: signs-only}}
            data_dir: {data.parent.parent}
            scenario: scenario.yaml
            tasks:
              - name: signs
                image: {IMAGE}
                input: camera
                resources: {{memory: 512Mi}}
                deadline_ms: 1000
                queue: {{depth: 64, overflow: block}}
            scheduler: {{policy: cfs}}
            """)
    )
    out = tmp_path / "run"
    proc = ctxrobot("run", "--config", str(tmp_path / "robot.yaml"), "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with sqlite3.connect(out / "run.db") as db:
        rows = db.execute(
            "SELECT result_json FROM samples WHERE task = 'signs' ORDER BY sample_id"
        ).fetchall()
    results = [json.loads(row[0]) for row in rows]
    score = score_run(results, data)
    print(f"\nin the loop: {score} over {len(results)} results")
    assert score["frames"] == len(results) > 40
    assert 15 <= score["stop_frames"] <= 25  # two photos held 2 s each at 5 fps
    assert score["stop_recall"] >= 0.95 and score["stop_precision"] >= 0.95


def test_sigterm_during_eval_removes_its_container() -> None:
    """systemd, `kill` or a CI timeout stop an evaluation: its container goes with it."""
    require_image(IMAGE)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctxrobot", "eval", "signs", str(require_data("signs"))],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = docker.from_env()
    label = {"label": f"{LABEL_RUN}=eval-{proc.pid}"}
    try:
        deadline = time.monotonic() + 120
        while not client.containers.list(filters=label):
            assert proc.poll() is None and time.monotonic() < deadline, "no eval container"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert client.containers.list(all=True, filters=label) == []
