"""Task quality in the loop: what each task produced in a run, scored against ground truth.

Each task is scored by the scorer of the kind of source it reads (``score_run(results,
dataset_dir)`` in ``ctxtask.datasets``), on the dataset that source replays:

- a **laser log** (SLAM): the Freiburg relation error over the scans it posed —
  ``slam_trans_error_m``, ``slam_rot_error_deg``; the log folder holds the ``*.relations``;
- **camera stills** (sign detection): Stop-sign recall over the frames a Stop photo was shown
  on, precision over the frames it was not — ``stop_recall``, ``stop_precision``; the
  dataset is the detection folder (``images/`` + ``annotations/``) the photos come from;
- a **microphone** (speech): word error rate over the utterances played — ``wer``; the
  dataset is the folder whose ``transcripts.tsv`` the recordings are listed in.

Shedding work is allowed; losing quality is what it costs, so every policy's quality is
reported beside what each task reached alone (``isolated``) in the same envelope.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ctxrobot.bench.rundata import RunResult

#: The headline metrics, and which way is better (+1: higher, −1: lower).
QUALITY_METRICS: dict[str, int] = {
    "slam_trans_error_m": -1,
    "slam_rot_error_deg": -1,
    "stop_recall": +1,
    "stop_precision": +1,
    "wer": -1,
}
#: Counts the scorers report beside their metrics: how much of a run could be scored. A
#: policy that sheds work is scored on what it processed (e.g. sign detection on the
#: frames it looked at), so these say how much that was.
SCORED_COUNTS = ("relations", "frames", "stop_frames", "utterances")


@dataclasses.dataclass(frozen=True)
class Scorer:
    """How to score one task: the `ctxtask.datasets` module whose ``score_run`` applies,
    and the dataset folder the task's source replays."""

    module: str
    dataset: Path

    def score(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """The scorer's document (NaN as None), or ``{"error": …}`` saying why there is none.

        A failing scorer must not cost a bench of many runs: its message is kept instead.
        """
        score_run = getattr(importlib.import_module(self.module), "score_run", None)
        if score_run is None:
            return {"error": f"{self.module} has no score_run yet"}
        try:
            doc = score_run(results, self.dataset)
        except (ValueError, OSError, KeyError, TypeError) as err:
            return {"error": f"{self.module}.score_run: {type(err).__name__}: {err}"}
        return {k: _finite(v) for k, v in doc.items()}


def _finite(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _ancestor(path: Path, is_dataset: Callable[[Path], bool], root: Path) -> Path | None:
    """The nearest folder at or above ``path`` (not above ``root``) that is a dataset."""
    for folder in (path, *path.parents):
        if is_dataset(folder):
            return folder
        if folder == root or folder == folder.parent:
            return None
    return None


def _signs_dataset(folder: Path) -> bool:
    return (folder / "images").is_dir() and (folder / "annotations").is_dir()


def _speech_dataset(folder: Path) -> bool:
    return (folder / "transcripts.tsv").is_file()


def _scorer_for(source: Any, root: Path) -> Scorer | None:
    """The scorer of a replayed source, or None when it replays nothing with ground truth."""
    if source.kind == "laser_replay":
        has_relations = any(Path(source.log).glob("*.relations"))
        return Scorer("ctxtask.datasets.laser", Path(source.log)) if has_relations else None
    if source.kind == "camera_replay":
        shown = [Path(s.image).parent for s in source.show]
        if source.idle is not None:
            shown.append(Path(source.idle.dir))
        found = {_ancestor(p, _signs_dataset, root) for p in shown}
        folder = found.pop() if len(found) == 1 else None  # one dataset, or no single truth
        return None if folder is None else Scorer("ctxtask.datasets.signs", folder)
    if source.kind == "audio_replay":
        found = {_ancestor(Path(p.file).parent, _speech_dataset, root) for p in source.play}
        folder = found.pop() if len(found) == 1 else None
        return None if folder is None else Scorer("ctxtask.datasets.speech", folder)
    return None  # a live sensor: nothing to compare with


def scorers(manifest: Any) -> dict[str, Scorer]:
    """Task → its scorer, for the tasks whose input replays a dataset with ground truth."""
    scenario = manifest.scenario
    out: dict[str, Scorer] = {}
    for task in manifest.tasks:
        source = scenario.sources.get(task.input)
        scorer = None if source is None else _scorer_for(source, Path(scenario.data_dir))
        if scorer is not None:
            out[task.name] = scorer
    return out


def score_run(result: RunResult, by_task: Mapping[str, Scorer]) -> None:
    """Score every task of ``result`` that has a scorer, into ``result.quality``."""
    for task, tr in result.tasks.items():
        scorer = by_task.get(task)
        result.quality[task] = None if scorer is None else scorer.score(tr.results)


def metrics_of(result: RunResult) -> dict[str, float | None]:
    """The headline metrics this run produced (from any of its tasks)."""
    out: dict[str, float | None] = {}
    for doc in result.quality.values():
        for metric in QUALITY_METRICS:
            if doc is not None and metric in doc:
                out[metric] = doc[metric]
    return out


def scored_of(result: RunResult) -> dict[str, dict[str, float]]:
    """Per scored task, the counts of what its scorer could score in this run."""
    return {
        task: {k: doc[k] for k in SCORED_COUNTS if doc.get(k) is not None}
        for task, doc in result.quality.items()
        if doc is not None and "error" not in doc
    }


def relative_change(value: float | None, reference: float | None) -> float | None:
    """(value − reference) / reference; None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return (value - reference) / abs(reference)


def worst_loss(changes: Mapping[str, float | None]) -> float | None:
    """The largest relative *loss* among metric changes (positive: worse than the
    reference; a higher error or a lower recall), None when nothing compares."""
    losses = [-QUALITY_METRICS[m] * c for m, c in changes.items() if c is not None]
    return max(losses, default=None)
