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
#: Within each axis the cheaper search comes first, so grid order breaks ties towards less CPU.
DECODER_GRID: Mapping[str, Sequence[object]] = {
    "lw": (5.0, 6.5, 8.0, 10.0),
    "wip": (0.2, 0.65),
    "topn": (4, 8),
    "fwdflat": (False, True),
    "bestpath": (False, True),
}
#: Every VAD value tried: the window is also the hangover that ends an utterance, the
#: pre-roll the audio kept from before its onset.
VAD_GRID: Mapping[str, Sequence[object]] = {"window_s": (0.3, 0.5), "pre_roll_s": (0.2, 0.4)}

#: Selection rules, as errors charged per setting changed from its default. ``plain`` picks
#: the fewest errors outright. On a half of 37-59 words one error is one word of one file,
#: noise, and ``plain`` turned three knobs for a one-error win on half B that cost three
#: errors on half A; ``penalised`` makes every knob turned pay for itself with at least one
#: error less on the tuning half (a complexity penalty, as AIC's). The shipped setting is
#: ``penalised`` run on all recordings.
PENALTIES: Mapping[str, int] = {"plain": 0, "penalised": 1}

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
    measurements: Measurements,
    settings: Sequence[Setting],
    items: Sequence[SpeechItem],
    penalty: int,
) -> Setting:
    """The setting with the lowest errors on ``items`` plus ``penalty`` per changed default;
    ties to fewer changes, then to grid order."""

    def cost(indexed: tuple[int, Setting]) -> tuple[int, int, int]:
        index, setting = indexed
        rows = measurements.rows(setting)
        errors = sum(rows[item.name]["errors"] for item in items)
        return errors + penalty * changes(setting), changes(setting), index

    return min(enumerate(settings), key=cost)[1]


def tune(measurements: Measurements, items: Sequence[SpeechItem], penalty: int) -> Setting:
    """The tuning procedure, using ``items`` only: decoder first, then VAD boundaries.

    Two stages instead of one joint grid: the VAD settings barely interact with the
    decoder's, and the joint grid would cost four times the CPU.
    """
    decoder = best(measurements, grid(DECODER_GRID, VAD_DEFAULTS), items, penalty)
    return best(measurements, grid(VAD_GRID, decoder), items, penalty)


def cross_validate(measurements: Measurements, compare: Mapping[str, Setting]) -> dict[str, Any]:
    """Both folds, for each procedure in ``PENALTIES``: tuned on one half, reported on the
    other; the ``compare`` settings on both halves; and each procedure run on everything."""
    half_a, half_b = halves(measurements.dataset)
    report: dict[str, Any] = {
        "halves": {"A": [i.name for i in half_a], "B": [i.name for i in half_b]}
    }
    for tuned_on, tested_on, name in ((half_a, half_b, "B"), (half_b, half_a, "A")):
        fold: dict[str, Any] = {}
        for procedure, penalty in PENALTIES.items():
            chosen = tune(measurements, tuned_on, penalty)
            fold[procedure] = {"chosen": dict(chosen), **measurements.figure(chosen, tested_on)}
        for label, setting in compare.items():
            fold[label] = measurements.figure(setting, tested_on)
        report[f"tested_on_{name}"] = fold
    report["chosen_on_all"] = {}
    for procedure, penalty in PENALTIES.items():
        everything = tune(measurements, measurements.dataset, penalty)
        report["chosen_on_all"][procedure] = {
            "chosen": dict(everything),
            **measurements.figure(everything, measurements.dataset),
        }
    return report


def _print_report(report: Mapping[str, Any], labels: Sequence[str]) -> None:
    def line(label: str, figure: Mapping[str, Any]) -> str:
        low, high = figure["wer_ci95"]
        chosen = f"  chosen {figure['chosen']}" if "chosen" in figure else ""
        return (
            f"  {label:9s} WER {figure['wer']:.3f} [{low:.3f}-{high:.3f}] "
            f"({figure['errors']}/{figure['words']}){chosen}"
        )

    for name in ("A", "B"):
        print(f"tested on half {name} (tuned on the other): {report['halves'][name]}")
        for label in labels:
            print(line(label, report[f"tested_on_{name}"][label]))
    print("chosen on all recordings:")
    for procedure, figure in report["chosen_on_all"].items():
        print(line(procedure, figure))


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
    _print_report(report, [*PENALTIES, *compare])
    if args.json:
        print(json.dumps(report, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
