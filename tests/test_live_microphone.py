"""The live ``microphone`` source through a real audio stack with no sound card: PortAudio's
ALSA ``pulse`` device recording a private PulseAudio server's null sink, which ``paplay``
plays the shared recordings into. The speech task hears the same words live as from the file.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from ctxrobot.manifest.live import Microphone
from ctxrobot.model.bus import EventBus
from ctxrobot.model.events import AudioLevel, SourceStateChanged
from ctxrobot.streams.source import Fired
from ctxtask.datasets.speech import SAMPLE_RATE, read_wav
from tests.conftest import require_data, require_image
from tests.test_live_support import (
    live_threads,
    play,
    pulse_server,
    results,
    start_run,
    task_entry,
    wait_until,
    write_live_manifest,
)
from tests.test_run_docker import orphans

RECORDINGS = ("ps_goforward.wav", "ps_librivox_sense_and_sensibility_01_austen_64kb-0880.wav")


@pytest.fixture
def pulse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    with pulse_server(tmp_path / "pulse") as env:
        monkeypatch.setenv("PULSE_SERVER", env["PULSE_SERVER"])
        yield env


def microphone(device: str | int | None, chunk_ms: int = 100):  # type: ignore[no-untyped-def]
    from ctxrobot.streams.live.microphone import MicrophoneSource

    return MicrophoneSource(
        "mic",
        Microphone.model_validate({"kind": "microphone", "device": device, "chunk_ms": chunk_ms}),
    )


def listen(source) -> tuple[list[Fired], list[SourceStateChanged], EventBus]:  # type: ignore[no-untyped-def]
    fired: list[Fired] = []
    states: list[SourceStateChanged] = []
    bus = EventBus()
    bus.subscribe("source.state", states.append, name="test-states", inline=True)
    source.attach(bus)
    source.start(lambda _name, f: fired.append(f))
    return fired, states, bus


def test_live_chunks_carry_the_played_recording(pulse: dict[str, str]) -> None:
    data = require_data("speech/audio")
    source = microphone("pulse")
    fired, states, bus = listen(source)
    try:
        wait_until(lambda: len(fired) >= 5, 20, "the first chunks")
        play(data / RECORDINGS[0], pulse)
        time.sleep(1.0)
    finally:
        source.stop()
        bus.close()
    assert states[0].state == "open" and "16000 Hz mono" in states[0].detail
    chunks = [f.sample for f in fired]
    assert all(c.kind == "audio" and len(c.payload) == 2 * SAMPLE_RATE // 10 for c in chunks)
    assert [c.id for c in chunks] == list(range(len(chunks)))
    stamps = np.array([c.t_sensor for c in chunks])
    steps = np.diff(stamps)
    print(
        f"chunk stamps: step median {np.median(steps) * 1e3:.2f} ms, max {steps.max() * 1e3:.1f} ms"
    )
    assert abs(np.median(steps) - 0.1) < 0.002
    heard = np.concatenate([c.array() for c in chunks]).astype(np.float64)
    sent = read_wav(data / RECORDINGS[0]).astype(np.float64)
    # Where the recording sits in what the microphone heard, and how alike the two are.
    from scipy.signal import correlate

    lag = int(np.argmax(correlate(heard, sent, mode="valid", method="fft")))
    segment = heard[lag : lag + len(sent)]
    likeness = float(np.dot(segment, sent) / np.sqrt(np.dot(segment, segment) * np.dot(sent, sent)))
    print(f"the recording is heard {lag / SAMPLE_RATE:.2f} s in; correlation {likeness:.3f}")
    levels = [e.rms_db for f in fired for _, e in f.events if isinstance(e, AudioLevel)]
    assert max(levels) > -35.0 > min(levels), "speech is loud, the null sink's silence is not"


def test_missing_microphone_is_one_clear_state() -> None:
    source = microphone("no-such-microphone")
    fired, states, bus = listen(source)
    try:
        wait_until(lambda: len(states) >= 2, 20, "a failed state")
    finally:
        source.stop()
        bus.close()
    assert states[0].state == "failed" and not fired
    assert "no microphone 'no-such-microphone'" in states[0].detail
    assert "input devices:" in states[0].detail
    print(states[0].detail)


def test_sound_server_gone_mid_run_is_an_event_then_reconnects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads_before = live_threads()
    source = microphone("pulse")
    with pulse_server(tmp_path / "pulse") as env:
        monkeypatch.setenv("PULSE_SERVER", env["PULSE_SERVER"])
        fired, states, bus = listen(source)
        wait_until(lambda: len(fired) >= 10, 20, "chunks before the server goes")
    # The server is gone (as a USB microphone pulled out): the source says so and retries.
    try:
        wait_until(lambda: any(s.state == "failed" for s in states), 20, "a failed state")
        before = len(fired)
        with pulse_server(tmp_path / "pulse"):  # back, at the same address
            wait_until(lambda: len(fired) >= before + 10, 60, "chunks after the reconnect")
    finally:
        source.stop()
        bus.close()
    sequence = [s.state for s in states]
    print("microphone states:", [(s.state, s.detail[:70]) for s in states][:6])
    failed = sequence.index("failed")
    assert sequence[0] == "open" and "open" in sequence[failed:] and sequence[-1] == "closed"
    time.sleep(0.2)
    assert live_threads() - threads_before <= {"bus:test-states"}


def utterances(rows: list[tuple[int, float, dict[str, object]]]) -> list[str]:
    return [str(r["utterance"]) for _, _, r in rows if r.get("utterance")]


def test_speech_transcript_of_the_live_stream_equals_that_of_the_file(
    tmp_path: Path, pulse: dict[str, str]
) -> None:
    """One run, two speech tasks: one on the live microphone while ``paplay`` plays the
    recordings into the sound server, one on the replay of the same files."""
    require_image("ctxrobot/speech")
    data = require_data()
    gap_s = 4.0
    plays = [
        {"at_s": 1.0 + k * 12.0, "file": f"speech/audio/{name}"}
        for k, name in enumerate(RECORDINGS)
    ]
    manifest = write_live_manifest(
        tmp_path,
        data,
        {
            "mic": {"kind": "microphone", "device": "pulse", "chunk_ms": 100},
            "wav": {"kind": "audio_replay", "chunk_ms": 100, "play": plays},
        },
        task_entry("speech_live", "ctxrobot/speech", "mic", depth=64, overflow="block")
        + task_entry("speech_wav", "ctxrobot/speech", "wav", depth=64, overflow="block"),
    )
    out = tmp_path / "run"
    before = orphans()
    proc = start_run(manifest, out, duration_s=12.0 * len(RECORDINGS) + gap_s, env=pulse)
    try:
        wait_until(lambda: len(results(out, "speech_live")) >= 5, 180, "the live stream")
        for name in RECORDINGS:
            play(data / "speech" / "audio" / name, pulse)
            time.sleep(gap_s)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    live = utterances(results(out, "speech_live"))
    recorded = utterances(results(out, "speech_wav"))
    print(f"live: {live}\nfile: {recorded}")
    assert recorded, "the replay was recognised"
    assert " ".join(live) == " ".join(recorded)
    assert orphans() - before == set()
