"""The scenario as the simulator plays it: each source's readings in order, each with the
content key its processing cost is looked up by in a trace.

The readings are the replay sources' own ticks (``ctxrobot.streams.replay``): firing one
gives exactly the sensor events and the sample a run produces, so the simulated context
is the real scenario's. A sample's *key* names its content rather than its place in one
scenario, so that a cost measured in one run applies to the same content in another (a
different frame rate, a scenario cut differently from the same recordings):

- a camera frame: its image (``frame:road22.png``);
- a laser scan: its time in the log (``scan:123.456``);
- an audio chunk: the utterance it belongs to and its index in it, counting on through
  the silence after it for :data:`AUDIO_TAIL_S` (``audio:ps_cards_001.wav#17``), where the
  end-of-utterance decode happens; other silence is ``audio:silence``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctxrobot.model.errors import UserError
from ctxrobot.streams.replay import build_sources
from ctxrobot.streams.source import Fired
from ctxtask.protocol import Sample

__all__ = ["AUDIO_TAIL_S", "Reading", "SampleKeyer", "Workload", "load_workload"]

#: How long after an utterance's last chunk the following chunks still count as its own:
#: long enough for the voice detector's hangover and the final decode it triggers.
AUDIO_TAIL_S = 2.0


@dataclass(frozen=True, slots=True)
class Reading:
    """One tick of a source: due ``offset_s`` after playback starts."""

    offset_s: float
    fire: Callable[[float, int], Fired]  # (time, sample id) -> sensor events and sample
    kind: str  # the sample's kind: scan, frame, audio
    key: str  # what its content is (see the module doc)


@dataclass(frozen=True)
class Workload:
    """A scenario's readings per source, in order."""

    duration_s: float
    sources: Mapping[str, list[Reading]]


class SampleKeyer:
    """Names the samples of one source by their content, in stream order."""

    def __init__(self) -> None:
        self._utterance: str | None = None
        self._index = 0
        self._silent = 0  # chunks since the utterance's last one

    def key(self, sample: Sample) -> str:
        meta = sample.meta
        if sample.kind == "frame":
            return f"frame:{meta['name']}"
        if sample.kind == "scan":
            return f"scan:{float(meta['t_log']):.3f}"
        if sample.kind == "audio":
            return self._audio(sample)
        return sample.kind

    def _audio(self, sample: Sample) -> str:
        label = sample.meta.get("utterance")
        if label is not None:
            if label != self._utterance or self._silent > 0:
                self._utterance, self._index = label, 0
            else:
                self._index += 1
            self._silent = 0
            return f"audio:{label}#{self._index}"
        chunk_s = len(sample.payload) / 2 / float(sample.meta.get("rate", 16000))
        tail = math.ceil(AUDIO_TAIL_S / chunk_s) if chunk_s > 0 else 0
        if self._utterance is not None and self._silent < tail:
            self._silent += 1
            self._index += 1
            return f"audio:{self._utterance}#{self._index}"
        return "audio:silence"


def load_workload(scenario: Any, data_dir: Path, duration_s: float | None = None) -> Workload:
    """Read and decode a scenario's replay sources (a few seconds: images, logs, audio)."""
    sources = build_sources(scenario, data_dir)
    if sources.live:
        names = ", ".join(s.name for s in sources.live)
        raise UserError(
            f"scenario {scenario.path} has live sources ({names}): the simulator replays "
            "recordings only; give a scenario of replayed sources"
        )
    duration = scenario.duration_s if duration_s is None else duration_s
    readings: dict[str, list[Reading]] = {}
    for source in sources.replay:
        keyer = SampleKeyer()
        out = readings[source.name] = []
        for i, tick in enumerate(source.timeline(duration)):
            sample = tick.fire(tick.offset_s, i).sample
            out.append(Reading(tick.offset_s, tick.fire, sample.kind, keyer.key(sample)))
    return Workload(duration, readings)
