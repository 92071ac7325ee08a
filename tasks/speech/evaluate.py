"""Measure the speech task on a dataset folder (``audio/*.wav`` + ``transcripts.tsv``).

    python -m speech.evaluate DATASET_DIR [--json] [--engine pocketsphinx|vosk]
                              [--vosk-model DIR] [--mode dictation|command] [--chunk-ms 100]

Each WAV is streamed through exactly the task's path (``speech.stream``: VAD, then the engine)
in ``--chunk-ms`` chunks, as the microphone would deliver it; the texts of all utterances the
VAD finds in a file are joined and scored against its transcript. Reported:

* ``wer``: overall word error rate (total errors / total reference words);
* ``realtime_factor``: CPU seconds of this process (``time.process_time``, VAD + decoding,
  model loading excluded) per second of audio. CPU time, unlike wall time, does not depend on
  what else the machine runs; ``wall_s`` is reported alongside for comparison;
* ``max_chunk_cpu_s``: the largest CPU time of a single chunk, i.e. the decode burst when an
  utterance closes, which bounds the latency added after the speaker stops.

With ``--json`` the last stdout line is one JSON object. Exit status: 0 after measuring
(whatever the numbers), 2 when the folder, its audio or the engine's model is unusable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ctxtask.datasets.speech import (
    SAMPLE_RATE,
    SpeechDataset,
    SpeechDatasetError,
    iter_chunks,
    normalise_text,
    word_errors,
)
from speech.recognizer import ENGINES, MODES, Recognizer, RecognizerError, create_recognizer
from speech.stream import StreamingRecognizer
from speech.vad import Segmenter


def evaluate(dataset: SpeechDataset, recognizer: Recognizer, chunk_ms: int) -> dict[str, Any]:
    """Stream every utterance of ``dataset`` through ``recognizer``; return the metrics."""
    chunk = SAMPLE_RATE * chunk_ms // 1000
    files: list[dict[str, Any]] = []
    errors = ref_words = segments = exact = 0
    audio_s = cpu_s = wall_s = max_chunk_cpu_s = 0.0
    for item in dataset:
        pcm = item.load()
        stream = StreamingRecognizer(recognizer, Segmenter())
        texts: list[str] = []
        wall0 = time.perf_counter()
        for piece in [*iter_chunks(pcm, chunk), None]:
            cpu0 = time.process_time()
            texts += stream.flush() if piece is None else stream.push(piece)
            spent = time.process_time() - cpu0
            cpu_s += spent
            max_chunk_cpu_s = max(max_chunk_cpu_s, spent)
        wall_s += time.perf_counter() - wall0
        hypothesis = " ".join(t for t in texts if t)
        n_errors = word_errors(item.text, hypothesis)
        n_words = len(normalise_text(item.text))
        errors += n_errors
        ref_words += n_words
        segments += stream.utterances
        exact += normalise_text(hypothesis) == normalise_text(item.text)
        audio_s += len(pcm) / SAMPLE_RATE
        files.append(
            {
                "file": item.name,
                "reference": item.text,
                "hypothesis": hypothesis,
                "errors": n_errors,
                "words": n_words,
                "segments": stream.utterances,
            }
        )
    return {
        "engine": recognizer.engine,
        "mode": recognizer.mode,
        "wer": errors / ref_words,
        "errors": errors,
        "ref_words": ref_words,
        "utterances": len(files),
        "exact": exact,
        "segments": segments,
        "audio_s": round(audio_s, 3),
        "cpu_s": round(cpu_s, 3),
        "wall_s": round(wall_s, 3),
        "realtime_factor": round(cpu_s / audio_s, 4),
        "max_chunk_cpu_s": round(max_chunk_cpu_s, 4),
        "chunk_ms": chunk_ms,
        "files": files,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m speech.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("dataset", help="folder with audio/*.wav and transcripts.tsv")
    parser.add_argument("--json", action="store_true", help="print a JSON object as last line")
    parser.add_argument("--engine", choices=ENGINES, default="pocketsphinx")
    parser.add_argument(
        "--vosk-model",
        help="Vosk model directory (engine vosk; default $CTXROBOT_VOSK_MODEL, else "
        "speech/model/vosk-model-small-en-us-0.15 under the data root)",
    )
    parser.add_argument("--mode", choices=MODES, default="dictation")
    parser.add_argument("--chunk-ms", type=int, default=100, help="microphone chunk length")
    args = parser.parse_args(argv)
    if args.chunk_ms <= 0:
        parser.error("--chunk-ms must be positive")
    try:
        dataset = SpeechDataset(args.dataset)
        recognizer = create_recognizer(args.engine, args.mode, args.vosk_model)
        metrics = evaluate(dataset, recognizer, args.chunk_ms)
    except (SpeechDatasetError, RecognizerError) as err:
        print(f"speech.evaluate: {err}", file=sys.stderr)
        return 2
    for f in metrics["files"]:
        print(f"{f['file']}: {f['errors']}/{f['words']} errors, {f['segments']} segment(s)")
        print(f"  ref: {f['reference']}")
        print(f"  hyp: {f['hypothesis']}")
    print(
        f"{metrics['engine']} {metrics['mode']}: WER {metrics['wer']:.3f} "
        f"({metrics['errors']}/{metrics['ref_words']}), exact {metrics['exact']}/"
        f"{metrics['utterances']}, real-time factor {metrics['realtime_factor']:.3f} "
        f"(CPU {metrics['cpu_s']:.2f} s / audio {metrics['audio_s']:.2f} s; wall "
        f"{metrics['wall_s']:.2f} s), largest chunk {metrics['max_chunk_cpu_s']:.3f} s CPU"
    )
    if args.json:
        print(json.dumps(metrics, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
