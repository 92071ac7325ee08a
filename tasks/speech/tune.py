"""Choose the dictation settings by two-fold cross-validation, and say how well that works.

    python -m speech.tune DATASET_DIR [--json] [--cache FILE]

The recordings are split into two halves (every other file in name order, so each source's
recordings fall on both sides). The tuning procedure (``tune``) sees one half only: it picks
the PocketSphinx decoder options (``DECODER_GRID``) with the fewest errors on that half,
then the VAD boundaries (``VAD_GRID``) likewise; every candidate is measured through the
task's own streaming path (``speech.evaluate``). The chosen setting's WER is reported **on
the other half**, which it never saw; then the halves swap. That pair of figures estimates
what tuning gives on new recordings of the same kind, unlike the WER of a setting picked on
all recordings. Ties go to the setting that changes fewer defaults (then to grid order), so
a lucky tie never adds a knob. The procedure run on all recordings gives the shipped setting.

``--cache FILE`` keeps per-recording results between runs (about 70 settings, an hour of CPU
on a loaded 2-core machine); delete it when the audio, the engine or the code changes.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ctxtask.datasets.speech import SpeechDataset, SpeechDatasetError, SpeechItem
from ctxtask.stats import bootstrap_ci
from speech.evaluate import evaluate, pooled_wer
from speech.pocketsphinx_engine import DICTATION_OPTIONS
from speech.recognizer import RecognizerError, create_recognizer
from speech.vad import Segmenter

#: The microphone chunk the evaluator streams in (as the replayed microphone delivers it).
CHUNK_MS = 100

#: PocketSphinx's own defaults for the options searched (pocketsphinx 5.1).
DECODER_DEFAULTS: Mapping[str, object] = {
    "lw": 6.5,
    "wip": 0.65,
    "topn": 4,
    "fwdflat": True,
    "bestpath": True,
}
#: The VAD boundary settings the task had before this search (``speech.vad.Segmenter``).
VAD_DEFAULTS: Mapping[str, object] = {"window_s": 0.3, "pre_roll_s": 0.2}

#: Every decoder value tried. Language weight and word insertion penalty trade the language
#: model against the acoustics; ``topn`` is how many Gaussians of the shared codebook are
#: scored per frame; ``fwdflat`` and ``bestpath`` are the second and third search passes.
DECODER_GRID: Mapping[str, Sequence[object]] = {
    "lw": (5.0, 6.5, 8.0, 10.0),
    "wip": (0.2, 0.65),
    "topn": (4, 8),
    "fwdflat": (True, False),
    "bestpath": (True, False),
}
#: Every VAD value tried: the window is also the hangover that ends an utterance, the
#: pre-roll the audio kept from before its onset.
VAD_GRID: Mapping[str, Sequence[object]] = {"window_s": (0.3, 0.5), "pre_roll_s": (0.2, 0.4)}

Setting = Mapping[str, object]
Rows = Mapping[str, Mapping[str, int]]  # recording name -> {"errors", "words"}


def grid(axes: Mapping[str, Sequence[object]], base: Setting) -> list[dict[str, object]]:
    """``base`` with every combination of ``axes`` in turn, in grid order."""
    return [
        {**base, **dict(zip(axes, values, strict=True))}
        for values in itertools.product(*axes.values())
    ]


def changes(setting: Setting) -> int:
    """How many settings differ from the engine's and the VAD's defaults."""
    defaults = {**DECODER_DEFAULTS, **VAD_DEFAULTS}
    return sum(setting[name] != defaults[name] for name in setting)


def key(setting: Setting) -> str:
    return json.dumps(setting, sort_keys=True)


def halves(dataset: Sequence[SpeechItem]) -> tuple[list[SpeechItem], list[SpeechItem]]:
    """Every other recording in name order: A gets the 1st, 3rd, …; B the 2nd, 4th, …"""
    ordered = sorted(dataset, key=lambda item: item.name)
    return ordered[0::2], ordered[1::2]


class Measurements:
    """Per-recording errors of each setting on the whole dataset, measured when first asked.

    A setting is always run on every recording, in the dataset's order, with a fresh decoder:
    the decoder's noise estimate carries over from one recording to the next, so a reused
    one would make the figures depend on what ran before.
    """

    def __init__(self, dataset: Sequence[SpeechItem], cache: Path | None) -> None:
        self.dataset = dataset
        self.cache = cache
        self.table: dict[str, dict[str, Any]] = {}
        if cache is not None and cache.is_file():
            self.table = json.loads(cache.read_text())

    def rows(self, setting: Setting) -> Rows:
        if key(setting) not in self.table:
            decoder = {name: setting[name] for name in DECODER_DEFAULTS}
            vad = {name: setting[name] for name in VAD_DEFAULTS}
            recognizer = create_recognizer("pocketsphinx", decoder_options=decoder)
            metrics = evaluate(self.dataset, recognizer, CHUNK_MS, vad=vad)
            self.table[key(setting)] = {
                f["file"]: {"errors": f["errors"], "words": f["words"]} for f in metrics["files"]
            }
            print(f"{key(setting)}: {metrics['errors']}/{metrics['ref_words']}", file=sys.stderr)
            if self.cache is not None:
                self.cache.write_text(json.dumps(self.table))
        return self.table[key(setting)]

    def figure(self, setting: Setting, items: Sequence[SpeechItem]) -> dict[str, Any]:
        """WER of ``setting`` on ``items``, with its bootstrap interval over recordings."""
        rows = self.rows(setting)
        files = [rows[item.name] for item in items]
        low, high = bootstrap_ci(files, pooled_wer)
        return {
            "wer": round(pooled_wer(files), 4),
            "wer_ci95": [round(low, 4), round(high, 4)],
            "errors": sum(f["errors"] for f in files),
            "words": sum(f["words"] for f in files),
        }


def best(
    measurements: Measurements, settings: Sequence[Setting], items: Sequence[SpeechItem]
) -> Setting:
    """The setting with the fewest errors on ``items``; ties to fewer changed defaults."""

    def cost(indexed: tuple[int, Setting]) -> tuple[int, int, int]:
        index, setting = indexed
        rows = measurements.rows(setting)
        return sum(rows[item.name]["errors"] for item in items), changes(setting), index

    return min(enumerate(settings), key=cost)[1]


def tune(measurements: Measurements, items: Sequence[SpeechItem]) -> Setting:
    """The tuning procedure, using ``items`` only: decoder first, then VAD boundaries.

    Two stages instead of one joint grid: the VAD settings barely interact with the
    decoder's, and the joint grid would cost four times the CPU.
    """
    decoder = best(measurements, grid(DECODER_GRID, VAD_DEFAULTS), items)
    return best(measurements, grid(VAD_GRID, decoder), items)


def cross_validate(measurements: Measurements, compare: Mapping[str, Setting]) -> dict[str, Any]:
    """Both folds: tuned on one half, reported on the other; ``compare`` settings on both."""
    half_a, half_b = halves(measurements.dataset)
    report: dict[str, Any] = {
        "halves": {"A": [i.name for i in half_a], "B": [i.name for i in half_b]}
    }
    for tuned_on, tested_on, name in ((half_a, half_b, "B"), (half_b, half_a, "A")):
        chosen = tune(measurements, tuned_on)
        report[f"tested_on_{name}"] = {
            "chosen": dict(chosen),
            "tuned": measurements.figure(chosen, tested_on),
            **{label: measurements.figure(s, tested_on) for label, s in compare.items()},
        }
    everything = tune(measurements, measurements.dataset)
    report["chosen_on_all"] = {
        "setting": dict(everything),
        **measurements.figure(everything, measurements.dataset),
    }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m speech.tune", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("dataset", help="folder with audio/*.wav and transcripts.tsv")
    parser.add_argument("--json", action="store_true", help="print a JSON object as last line")
    parser.add_argument("--cache", type=Path, help="JSON file keeping per-recording results")
    args = parser.parse_args(argv)
    segmenter = inspect.signature(Segmenter).parameters
    shipped = {**DECODER_DEFAULTS, **DICTATION_OPTIONS}
    shipped |= {k: segmenter[k].default for k in VAD_DEFAULTS}
    compare = {"defaults": {**DECODER_DEFAULTS, **VAD_DEFAULTS}, "shipped": shipped}
    try:
        measurements = Measurements(SpeechDataset(args.dataset), args.cache)
        report = cross_validate(measurements, compare)
    except (SpeechDatasetError, RecognizerError) as err:
        print(f"speech.tune: {err}", file=sys.stderr)
        return 2
    for name in ("A", "B"):
        fold = report[f"tested_on_{name}"]
        print(f"tested on half {name} (tuned on the other): chosen {fold['chosen']}")
        for label in ("tuned", *compare):
            f = fold[label]
            low, high = f["wer_ci95"]
            print(
                f"  {label:9s} WER {f['wer']:.3f} [{low:.3f}-{high:.3f}] "
                f"({f['errors']}/{f['words']})"
            )
    print(f"chosen on all recordings: {report['chosen_on_all']}")
    if args.json:
        print(json.dumps(report, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
