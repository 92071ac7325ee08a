"""Task quality in the loop: what each task produced in a run, scored against ground truth.

Each task is scored by the scorer of the kind of source it reads (``score_run(results,
dataset_dir)`` in ``ctxtask.datasets``), on the dataset that source replays:

- a **laser log** (SLAM): the Freiburg relation error over the scans it posed —
  ``slam_trans_error_m``, ``slam_rot_error_deg``; the log folder holds the ``*.relations``;
- **camera stills** (sign detection): Stop-sign recall over the frames a Stop photo was shown
  on, precision over the frames it was not — ``stop_recall``, ``stop_precision`` — scored on
  *every frame shown*, shed ones included, with what the robot believed then (the task's
  last report): shedding frames costs exactly the recall it loses. The dataset is the
  detection folder (``images/`` + ``annotations/``) the photos come from;
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
from ctxrobot.streams.replay import CameraReplay, build_sources

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
SCORED_COUNTS = ("relations", "frames", "stop_frames", "processed", "utterances")


@dataclasses.dataclass(frozen=True)
class Scorer:
    """How to score one task: the `ctxtask.datasets` module whose ``score_run`` applies,
    and the dataset folder the task's source replays."""

    module: str
    dataset: Path
    #: For a replayed camera: the photo each frame shows (frame k = sample id k), so every
    #: frame is scored, shed ones included (``ctxtask.datasets.signs.score_shown``).
    shown: tuple[str, ...] | None = None

    def score(self, results: list[dict[str, Any]], ids: list[int]) -> dict[str, Any]:
        """The scorer's document (NaN as None), or ``{"error": …}`` saying why there is none.

        A failing scorer must not cost a bench of many runs: its message is kept instead.
        """
        module = importlib.import_module(self.module)
        try:
            if self.shown is not None:
                by_id = dict(zip(ids, results, strict=True))
                doc = module.score_shown(self.shown, by_id, self.dataset)
            else:
                doc = module.score_run(results, self.dataset)
        except (ValueError, OSError, KeyError, TypeError) as err:
            return {"error": f"{self.module}: {type(err).__name__}: {err}"}
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


def _scorer_for(source: Any, root: Path, frames: list[Path] | None) -> Scorer | None:
    """The scorer of a replayed source, or None when it replays nothing with ground truth;
    ``frames``: a camera's photo per frame."""
    if source.kind == "laser_replay":
        has_relations = any(Path(source.log).glob("*.relations"))
        return Scorer("ctxtask.datasets.laser", Path(source.log)) if has_relations else None
    if source.kind == "camera_replay":
        shown = [Path(s.image).parent for s in source.show]
        if source.idle is not None:
            shown.append(Path(source.idle.dir))
        found = {_ancestor(p, _signs_dataset, root) for p in shown}
        folder = found.pop() if len(found) == 1 else None  # one dataset, or no single truth
        names = None if frames is None else tuple(p.name for p in frames)
        return None if folder is None else Scorer("ctxtask.datasets.signs", folder, names)
    if source.kind == "audio_replay":
        found = {_ancestor(Path(p.file).parent, _speech_dataset, root) for p in source.play}
        folder = found.pop() if len(found) == 1 else None
        return None if folder is None else Scorer("ctxtask.datasets.speech", folder)
    return None  # a live sensor: nothing to compare with


def scorers(manifest: Any) -> dict[str, Scorer]:
    """Task → its scorer, for the tasks whose input replays a dataset with ground truth."""
    scenario = manifest.scenario
    cameras = {
        s.name: s.shown(scenario.duration_s)
        for s in build_sources(scenario, Path(scenario.data_dir)).replay
        if isinstance(s, CameraReplay)
    }
    out: dict[str, Scorer] = {}
    for task in manifest.tasks:
        source = scenario.sources.get(task.input)
        shown = cameras.get(task.input)
        scorer = None if source is None else _scorer_for(source, Path(scenario.data_dir), shown)
        if scorer is not None:
            out[task.name] = scorer
    return out


def score_run(result: RunResult, by_task: Mapping[str, Scorer]) -> None:
    """Score every task of ``result`` that has a scorer, into ``result.quality``."""
    for task, tr in result.tasks.items():
        scorer = by_task.get(task)
        result.quality[task] = None if scorer is None else scorer.score(tr.results, tr.result_ids)


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
