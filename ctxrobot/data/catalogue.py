"""Every folder of the shared data root that `ctxrobot data fetch` can rebuild."""

from __future__ import annotations

from collections.abc import Iterable

from ctxrobot.data.signs import SIGNS_DATASETS
from ctxrobot.data.slam import SLAM_DATASETS
from ctxrobot.data.spec import Dataset
from ctxrobot.data.speech import SPEECH_DATASETS

CATALOGUE: tuple[Dataset, ...] = (*SLAM_DATASETS, *SIGNS_DATASETS, *SPEECH_DATASETS)
GROUPS = ("slam", "signs", "speech")


class UnknownDataset(ValueError):
    """A name that is neither a group nor a folder of the catalogue."""


def select(names: Iterable[str] | None, catalogue: Iterable[Dataset] = CATALOGUE) -> list[Dataset]:
    """Catalogue entries for group names (`slam`) or folders (`slam/intel`); None = all."""
    entries = list(catalogue)
    if names is None:
        return entries
    chosen: list[Dataset] = []
    for item in names:
        key = item.strip().strip("/")
        matches = [d for d in entries if key in (d.group, d.folder)]
        if not matches:
            choices = ", ".join([*GROUPS, *(d.folder for d in entries)])
            raise UnknownDataset(f"unknown dataset {item!r}; choose from: {choices}")
        chosen.extend(d for d in matches if d not in chosen)
    return chosen
