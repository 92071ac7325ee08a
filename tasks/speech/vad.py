"""Voice-activity detection: split a continuous microphone stream into utterances.

Frames (30 ms) are classified by PocketSphinx's ``Vad``, which wraps the WebRTC detector (a
small GMM over sub-band energies). Unlike a plain energy threshold it needs no calibrated
noise floor, which matters on a robot whose motors change the background level, and it costs
well under 1 % of one core. It is engine-independent: the same segments feed PocketSphinx or
Vosk.

Per-frame decisions flicker, so utterances are delimited with hysteresis over a sliding window
(the scheme of the classic py-webrtcvad "collector"):

* an utterance **starts** when at least ``ratio`` of the last ``window_s`` is voiced;
* it **ends** when at least ``ratio`` of the last ``window_s`` is unvoiced. Those unvoiced
  frames have already been passed on, so the window doubles as the hangover: short pauses
  between words stay inside one utterance and trailing weak sounds (final "s", "th") are kept;
* at the start, the window that triggered it **plus** ``pre_roll_s`` of older audio is handed
  over. The detector needs several voiced frames to trigger, and weak onsets ("h", "f") are
  often classified unvoiced; without the pre-roll the first word is clipped;
* an utterance longer than ``max_utterance_s`` is cut there (a new one starts at once if the
  voice goes on). Steady machine noise can look voiced for minutes; the cut bounds the memory
  an engine buffers and the decode burst, hence the latency, at the utterance's end.

We do not use PocketSphinx's ``Endpointer`` (the same idea, packaged): its start-up and
flush behaviour drop up to a quarter second of leading and trailing speech, which on the
shared test set deleted the first and last words of utterances.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from pocketsphinx import Vad

from ctxtask.datasets.speech import SAMPLE_RATE

#: Aggressiveness levels of the WebRTC detector, loosest (most audio counted as speech) first.
VAD_MODES: dict[str, int] = {
    "loose": Vad.LOOSE,
    "medium_loose": Vad.MEDIUM_LOOSE,
    "medium_strict": Vad.MEDIUM_STRICT,
    "strict": Vad.STRICT,
}


@dataclass(frozen=True)
class VadEvent:
    """A piece of speech audio and where it sits in its utterance."""

    pcm: bytes  #: int16 little-endian speech samples (may be empty when only ``end`` is set)
    start: bool  #: this is the first audio of a new utterance
    end: bool  #: the utterance is over after ``pcm``


class Segmenter:
    """Turn arbitrary-sized PCM chunks into utterance start / audio / end events.

    Microphone chunks (e.g. 100 ms) do not line up with the detector's 30 ms frames, so the
    remainder of each chunk is kept for the next call.
    """

    def __init__(
        self,
        window_s: float = 0.3,
        ratio: float = 0.9,
        pre_roll_s: float = 0.2,
        max_utterance_s: float = 15.0,
        mode: str = "loose",
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        if mode not in VAD_MODES:
            raise ValueError(f"unknown VAD mode {mode!r}; choose one of {sorted(VAD_MODES)}")
        if not 0.5 < ratio <= 1.0:
            # At or below one half, "start" and "end" could both hold for the same window.
            raise ValueError(f"ratio must be in (0.5, 1], got {ratio}")
        self._vad = Vad(mode=VAD_MODES[mode], sample_rate=sample_rate)
        self._frame_bytes: int = self._vad.frame_bytes
        frame_s: float = self._vad.frame_length
        self._window = max(1, round(window_s / frame_s))
        self._needed = max(1, round(ratio * self._window))
        self._max_frames = max(self._window, round(max_utterance_s / frame_s))
        self._frames_in_utterance = 0
        # Frames kept while idle: the trigger window plus the pre-roll.
        self._history: deque[bytes] = deque(maxlen=self._window + round(pre_roll_s / frame_s))
        self._decisions: deque[bool] = deque(maxlen=self._window)
        self._speaking = False
        self._pending = b""

    @property
    def speaking(self) -> bool:
        """True while inside an utterance."""
        return self._speaking

    def push(self, pcm: np.ndarray | bytes) -> list[VadEvent]:
        """Process one chunk of int16 mono audio; returns the speech events it completed."""
        data = pcm if isinstance(pcm, bytes) else np.asarray(pcm, dtype="<i2").tobytes()
        self._pending += data
        usable = len(self._pending) - len(self._pending) % self._frame_bytes
        events = [
            event
            for offset in range(0, usable, self._frame_bytes)
            if (event := self._frame(self._pending[offset : offset + self._frame_bytes]))
        ]
        self._pending = self._pending[usable:]
        return _merge(events)

    def flush(self) -> list[VadEvent]:
        """End of stream: close an utterance that is still open, with its last partial frame.

        Audio that never reached the start threshold is dropped: by definition not speech.
        """
        pending, self._pending = self._pending, b""
        self._history.clear()
        self._decisions.clear()
        if not self._speaking:
            return []
        self._speaking = False
        return [VadEvent(pcm=pending, start=False, end=True)]

    def _frame(self, frame: bytes) -> VadEvent | None:
        voiced = bool(self._vad.is_speech(frame))
        self._decisions.append(voiced)
        if self._speaking:
            self._frames_in_utterance += 1
            silent = len(self._decisions) == self._window and (
                self._decisions.count(False) >= self._needed
            )
            if silent or self._frames_in_utterance >= self._max_frames:
                self._speaking = False
                self._decisions.clear()  # the next start needs a full window of new evidence
                return VadEvent(pcm=frame, start=False, end=True)
            return VadEvent(pcm=frame, start=False, end=False)
        self._history.append(frame)
        if self._decisions.count(True) >= self._needed:
            self._speaking = True
            self._decisions.clear()
            self._frames_in_utterance = len(self._history)
            audio = b"".join(self._history)
            self._history.clear()
            return VadEvent(pcm=audio, start=True, end=False)
        return None


def _merge(events: list[VadEvent]) -> list[VadEvent]:
    """Coalesce consecutive frames of one utterance so a 100 ms chunk gives one event, not 3."""
    merged: list[VadEvent] = []
    for event in events:
        last = merged[-1] if merged else None
        if last is not None and not last.end and not event.start:
            merged[-1] = VadEvent(pcm=last.pcm + event.pcm, start=last.start, end=event.end)
        else:
            merged.append(event)
    return merged
