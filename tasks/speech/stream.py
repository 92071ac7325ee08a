"""Streaming recognition: microphone chunks in, finished utterances out.

This is the one path audio takes through the speech task; the task (``speech.task``) and the
evaluator (``speech.evaluate``) both drive it, so the numbers the evaluator reports are the
numbers the robot gets. Audio the voice-activity detector judges unvoiced never reaches the
recogniser: a chunk of silence costs the VAD's 30 ms frame decisions and nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from speech.recognizer import Recognizer, Transcript
from speech.vad import Segmenter, VadEvent


@dataclass(frozen=True)
class Step:
    """What one chunk did."""

    #: utterances that ended in this chunk (usually none), in order
    transcripts: list[Transcript] = field(default_factory=list)
    #: some of this chunk's audio, or an utterance's end, reached the recogniser; False means
    #: the VAD held the chunk back as unvoiced and no decoding work was done for it
    decoded: bool = False


class StreamingRecognizer:
    """Glue a ``Segmenter`` (where are the utterances?) to a ``Recognizer`` (what was said?)."""

    def __init__(self, recognizer: Recognizer, segmenter: Segmenter) -> None:
        self.recognizer = recognizer
        self.segmenter = segmenter
        self.utterances = 0  #: utterances closed so far, including empty ones

    @property
    def speaking(self) -> bool:
        """True while an utterance is open (its text is not known yet)."""
        return self.segmenter.speaking

    def push(self, pcm: np.ndarray | bytes) -> Step:
        """Process one chunk of int16 mono 16 kHz audio."""
        return self._apply(self.segmenter.push(pcm))

    def flush(self) -> Step:
        """End of stream: close an open utterance and return its transcript."""
        return self._apply(self.segmenter.flush())

    def _apply(self, events: list[VadEvent]) -> Step:
        transcripts: list[Transcript] = []
        for event in events:
            if event.start:
                self.recognizer.start_utterance()
            if event.pcm:
                self.recognizer.feed(event.pcm)
            if event.end:
                self.utterances += 1
                transcripts.append(self.recognizer.end_utterance())
        return Step(transcripts, decoded=bool(events))
